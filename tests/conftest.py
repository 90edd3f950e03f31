import os

import pytest

# Tests never fetch anything and never weaken auth outside the test processes themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory):
    """(target_dir, drafter_dir): a 3-layer tiny target and an independent 1-layer drafter, one tokenizer."""
    from tiny import make_pair_dirs

    return make_pair_dirs(tmp_path_factory.mktemp("tiny-models"))
