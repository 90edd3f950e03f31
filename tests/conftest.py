import os
import shutil
import tempfile

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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (started once, stopped after it, its temp folder removed).

    The temp folder is short: Unix socket paths are limited to ~107 characters.
    """
    import ray

    temp = tempfile.mkdtemp(prefix="vt", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
