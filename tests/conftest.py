import os
import shutil
import tempfile

import pytest

# Tests never fetch anything and never weaken auth outside the test processes themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"

_EXIT_STATUS = pytest.StashKey[int]()


def pytest_configure(config):
    """One compute thread in the test process: the tests' models are tiny, and two threads spin-waiting
    on a busy 2-core machine run many times slower than one."""
    import torch

    torch.set_num_threads(1)


# The slowest files, slowest first (in one serial run of 2026-12-07, their share of the suite's 80 slowest tests:
# 320, 176, 173, 151, 110, 109, 91, 82 and 69 s of the suite's 1,559 s). ``make test`` runs the files in two processes, each file
# whole in one (``--dist loadfile``) and in collection order (``--no-loadscope-reorder``): started first, the
# slow ones do not end the run alone while the other process idles.
SLOWEST_FILES = ("test_vllm.py", "test_demo.py", "test_autoscale.py", "test_eagle3.py", "test_cluster.py",
                 "test_sweep.py", "test_generate.py", "test_faults.py", "test_readme.py")


def pytest_collection_modifyitems(session, config, items):
    """The files in ``SLOWEST_FILES`` first, in its order; the others after them, as collected. A file's tests
    keep their order and stay together (module fixtures, such as ``ray_local``, start once per file)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process here, with pytest's own exit status, once every report is written, when Ray was
    used in it: Ray 2.60's C++ core driver, after the suite's dozens of ``ray.init``/``ray.shutdown`` cycles
    in one process, can crash the interpreter's teardown with a segmentation fault (seen once in CI, after
    "414 passed", preceded by "Failed writing to file .../python-core-driver-*.log: Bad file descriptor"),
    turning a passing run into exit code 139."""
    import sys

    if "ray" not in sys.modules or _EXIT_STATUS not in config.stash:
        return
    import ray

    if ray.is_initialized():  # a test that left its Ray running: stop it as Ray's exit hook would
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory):
    """(target_dir, drafter_dir): a 3-layer tiny target and an independent 1-layer drafter, one tokenizer."""
    from tiny import make_pair_dirs

    return make_pair_dirs(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def ray_local(s3):
    """A local Ray for one test module (started once, stopped after it, its temp folder removed).

    The temp folder is short: Unix socket paths are limited to ~107 characters. It depends on ``s3`` so
    that the test S3 server's variables are in the environment its workers inherit.
    """
    import ray

    temp = tempfile.mkdtemp(prefix="vt", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


class S3Mock:
    """A local S3-compatible server (moto) for one test session.

    ``env``: the variables a process needs to reach it (pyarrow reads ``AWS_ENDPOINT_URL`` and the keys,
    as it would on a real cluster node); ``bucket()`` makes a new empty bucket and returns ``s3://name``.
    """

    def __init__(self, server, endpoint: str):
        self.server = server
        self.endpoint = endpoint
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._n = 0

    def bucket(self) -> str:
        import boto3

        self._n += 1
        name = f"vt-test-{self._n}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 (a thread of this process), its variables set in this process's
    environment so that pyarrow here and the Ray workers started after it (which inherit it) reach it."""
    import logging

    from moto import server as moto_server  # a test dependency: its absence is a failure, not a skip
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mock = S3Mock(server, f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in mock.env}
    os.environ.update(mock.env)
    try:
        yield mock
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
