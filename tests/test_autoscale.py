"""The autoscaler path of ``check_resources``, on a real autoscaling cluster on this machine.

A GPU request (``--gpus-per-worker 1``) on a cluster whose only node has no GPU fails at once, unless
an autoscaler is running: then the pool waits (``VOCABTRIM_ACTOR_START_TIMEOUT``) for it to add a
node that can hold the actor. Here the autoscaler is Ray's own, with its fake multi-node provider
(what ``ray.cluster_utils.AutoscalingCluster`` uses): a node it "launches" is one more raylet on this
machine, and its GPU is a logical resource, so no GPU is needed.

``AutoscalingCluster`` itself is not used: its ``start()`` and ``shutdown()`` run ``ray stop --force``,
which would end every Ray process on the machine. The head is started here as
``cluster/local_cluster.py`` starts one (a ``ray start --block`` in a session of its own, with a temp
dir of its own) plus ``--autoscaling-config``; the nodes the autoscaler adds are started by its
monitor process, a child of the head, and use the head's temp dir. The finalizer stops all of them by
pid and by that temp dir (``local_cluster.stop``), also when a test fails, and checks none is left.

Both autoscaler versions are run: v2 (what ``ray up`` and KubeRay start with Ray >= 2.50) and v1
(``ray start --head --autoscaling-config`` without ``RAY_enable_autoscaler_v2``). The control is a head
without an autoscaling config: its monitor writes a (read-only) status too, and the same request is
refused at once. The driver is a process of its own, as a job's is.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from clusters import REPO, leftover_pids, local_cluster_module
from tiny import corpus_rows, count_tokens, make_model, make_tokenizer, save_model

pytestmark = pytest.mark.cluster

HEAD_CPUS = 2
GPU_NODE = {"CPU": 2, "GPU": 1, "object_store_memory": 100_000_000}
START_TIMEOUT_S = 240  # VOCABTRIM_ACTOR_START_TIMEOUT here: a broken autoscaler fails the test, not CI


def _autoscaling_config(gcs_address: str, v2: bool) -> dict:
    """Ray's fake multi-node example config: a CPU-only head and one GPU node type, 0 to 1 nodes."""
    provider = {
        # Ray's fake multi-node provider, named as an external one: the wheel lacks the
        # fake_multi_node/example.yaml that type "fake_multinode" reads its defaults from.
        "type": "external",
        "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        "gcs_address": gcs_address,  # else it assumes <this machine's ip>:6379
    }
    if v2:
        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    return {
        "cluster_name": "vocabtrim-autoscale-test",
        "max_workers": 1,
        "provider": provider,
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": dict(GPU_NODE), "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,  # the GPU node stays while the test looks at it
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _gcs(address: str):
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def alive_nodes(address: str) -> list[dict]:
    """[{node_id, resources}] of the cluster's alive nodes, straight from the GCS (no driver needed)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = _gcs(address).get_all_node_info(timeout=5).values()
    return [{"node_id": i.node_id.hex(), "resources": dict(i.resources_total)} for i in infos
            if i.state == GcsNodeInfo.GcsNodeState.ALIVE]


def autoscaling_state(address: str):
    """The autoscaling state the GCS holds (what ``autoscaler_running`` reads)."""
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    return GetClusterStatusReply.FromString(_gcs(address).get_cluster_status(timeout_s=10)).autoscaling_state


def v1_status(address: str) -> dict | None:
    """The v1 monitor's status in the GCS key-value store (None: not written)."""
    from ray._private import ray_constants

    raw = _gcs(address).internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), None, timeout=5)
    return json.loads(raw) if raw else None


def autoscaler_reported(address: str, autoscaler: str | None) -> bool:
    """Whether the head's monitor has reported the head (v2: in the GCS state, else in its v1 KV status)."""
    if autoscaler in ("v2", "v2-plain"):
        return autoscaling_state(address).autoscaler_state_version > 0
    report = (v1_status(address) or {}).get("autoscaler_report") or {}
    return bool(report.get("node_type_mapping"))


def start_head(lc, state_dir: Path, *, autoscaler: str | None, timeout: float = 90):
    """A head (``ray start --block``, own session and temp dir) with HEAD_CPUS CPUs and no GPU.

    ``autoscaler``: "v2" or "v1", the fake-provider autoscaler of that version; None: no autoscaling
    config (the head's monitor then only mirrors the nodes there are, read-only, as on a cluster
    started by hand); "v2-plain": no autoscaling config either, but the v2 monitor
    (``RAY_enable_autoscaler_v2=1``), which reports an autoscaler state all the same.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="vta", dir="/tmp")  # short: Unix socket paths
    port = lc.free_port()
    gcs_address = f"127.0.0.1:{port}"
    args = [lc._ray_executable(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            # no dashboard, but its API server starts anyway: on a free port, not the default 8265
            "--include-dashboard=false", "--dashboard-host=127.0.0.1", f"--dashboard-port={lc.free_port()}",
            f"--ray-client-server-port={lc.free_port()}",
            *lc._common_node_args(temp_dir, HEAD_CPUS, 0, 100_000_000, None)]
    extra = {"RAY_enable_autoscaler_v2": "1" if autoscaler in ("v2", "v2-plain") else "0"}
    if autoscaler in ("v2", "v1"):
        config_path = state_dir / "autoscaling.json"  # JSON is YAML
        config_path.write_text(json.dumps(_autoscaling_config(gcs_address, autoscaler == "v2"), indent=1))
        args.append(f"--autoscaling-config={config_path}")
        extra.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    if autoscaler == "v2":
        extra.update(RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
    env = lc._node_env(extra)
    head_pid = lc._spawn(args, env, state_dir / "head.log")
    cluster = lc.LocalCluster(str(state_dir), temp_dir, gcs_address, "", head_pid, [],
                              {k: env[k] for k in ("RAY_AUTH_MODE",) if k in env})
    cluster.save()
    try:
        lc._wait(lambda: len(alive_nodes(gcs_address)) >= 1, timeout, "the head node", [head_pid])
        # A cluster a user submits to has been up a while: its monitor has reported at least once.
        lc._wait(lambda: autoscaler_reported(gcs_address, autoscaler), timeout, "the monitor's first report", [head_pid])
    except BaseException:
        stop_cluster(lc, cluster)
        raise
    return cluster


def stop_cluster(lc, cluster) -> None:
    """Stop the head, the autoscaler's nodes and their workers (by pid and temp dir); assert none is left."""
    lc.stop(cluster)
    left = leftover_pids(lc, cluster)
    assert not left, f"processes of the autoscaling test cluster outlived stop(): {left}"


@contextlib.contextmanager
def head_cluster(tmp_path: Path, autoscaler: str | None):
    """A head of ``start_head``'s kinds for one test, stopped (and checked) afterwards."""
    lc = local_cluster_module()
    cluster = start_head(lc, tmp_path / "cluster", autoscaler=autoscaler)
    try:
        yield cluster
    finally:
        stop_cluster(lc, cluster)


@pytest.fixture(params=["v2", "v1"])
def autoscaling_cluster(request, tmp_path):
    with head_cluster(tmp_path, request.param) as cluster:
        yield cluster


@pytest.fixture
def plain_cluster(tmp_path):
    with head_cluster(tmp_path, None) as cluster:
        yield cluster


@pytest.fixture
def v2_cluster(tmp_path):
    with head_cluster(tmp_path, "v2") as cluster:
        yield cluster


@pytest.fixture
def v2_plain_cluster(tmp_path):
    with head_cluster(tmp_path, "v2-plain") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model folder (its tokenizer counts) and a small Parquet corpus cut into a few shards."""
    root = tmp_path_factory.mktemp("autoscale")
    tok = make_tokenizer()
    model_dir = save_model(make_model(len(tok), layers=1, seed=5), tok, root / "model")
    rows = corpus_rows(400, seed=1)
    files = root / "corpus"
    files.mkdir()
    pq.write_table(pa.table({"text": rows[:200]}), files / "a.parquet", row_group_size=50)
    pq.write_table(pa.table({"text": rows[200:]}), files / "b.parquet", row_group_size=50)
    return {"model": model_dir, "corpus": str(files), "expected": count_tokens(tok, rows), "rows": len(rows)}

# The driver runs in a process of its own, as a job's does: if the cluster died under it, Ray would end
# that process (not pytest's), and the finalizer above would still clean up.
DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s: %(message)s")
from vocabtrim import ray_utils
from vocabtrim.calibrate import CalibrateConfig, run_calibrate
from vocabtrim.errors import UserError

config = CalibrateConfig(**json.loads(sys.argv[1]))
ray_utils.init_ray(config.address)
print("AUTOSCALER_RUNNING", ray_utils.autoscaler_running(), flush=True)
try:
    manifest = run_calibrate(config)
except UserError as exc:  # what the CLI prints in one line
    print("USER_ERROR", exc, flush=True)
    sys.exit(2)
print("MANIFEST", json.dumps(manifest), flush=True)
"""


def run_driver(config: dict, timeout: float) -> tuple[int, str]:
    """(exit code, stdout + stderr) of DRIVER run with ``config``; killed after ``timeout`` seconds."""
    import os
    import subprocess

    env = {**os.environ, "VOCABTRIM_ACTOR_START_TIMEOUT": str(START_TIMEOUT_S)}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(config)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"the driver did not finish in {timeout:.0f} s:\n{out[-4000:]}")
    return done.returncode, done.stdout


def gpu_calibration(data, cluster, out: Path) -> dict:
    """CalibrateConfig fields: count the corpus with one actor asking for 1 GPU and 1 CPU."""
    return dict(drafter=data["model"], corpus=[data["corpus"]], out=str(out), source="corpus", workers=1,
                gpus_per_worker=1, cpus_per_worker=1, shard_bytes=4000, address=cluster.gcs_address, show_progress=False)


def test_a_gpu_pool_waits_for_the_autoscaler_to_add_a_gpu_node(autoscaling_cluster, data, tmp_path):
    from vocabtrim import histogram

    c = autoscaling_cluster
    nodes = alive_nodes(c.gcs_address)
    assert len(nodes) == 1 and not any(n["resources"].get("GPU") for n in nodes), nodes

    out = tmp_path / "calib"
    started = time.monotonic()
    rc, logs = run_driver(gpu_calibration(data, c, out), timeout=START_TIMEOUT_S + 60)
    took = time.monotonic() - started
    lines = logs.splitlines()
    assert rc == 0, f"exit code {rc}; autoscaling state:\n{autoscaling_state(c.gcs_address)}\n{logs[-4000:]}"
    assert "AUTOSCALER_RUNNING True" in lines, logs[-4000:]
    waits = [line for line in lines if line.startswith("LOG vocabtrim.ray_utils:")]
    assert len(waits) == 1 and "no GPUs" in waits[0] and "waiting up to 240 s for the autoscaler" in waits[0], logs[-4000:]
    manifest = json.loads(next(line for line in lines if line.startswith("MANIFEST "))[len("MANIFEST "):])

    # Exact: the histogram a single process counts.
    assert np.array_equal(histogram.load(str(out / "histogram.parquet"), len(data["expected"])), data["expected"])
    assert manifest["total_tokens"] == int(data["expected"].sum()) and manifest["rows"] == data["rows"]
    assert manifest["gpus_per_worker"] == 1 and manifest["shards_counted"] == manifest["shards"] >= 2

    # The autoscaler added the GPU node the actor ran on: one node became two.
    nodes = alive_nodes(c.gcs_address)
    gpu_nodes = [n for n in nodes if n["resources"].get("GPU", 0) >= 1]
    assert len(nodes) == 2 and len(gpu_nodes) == 1, nodes
    assert gpu_nodes[0]["node_id"] != FAKE_HEAD_NODE_ID
    print(f"calibrate with the autoscaler: {took:.1f} s (actor start-up {manifest['startup_seconds']} s)")


def test_without_an_autoscaler_the_same_request_is_refused_at_once(plain_cluster, data, tmp_path):
    """The control: a head started without an autoscaling config runs a monitor too, and it writes a
    status (its nodes mirrored read-only) where a v1 autoscaler writes its own; that is no autoscaler,
    and the request fails at once in one line. (test_cluster.py checks the same for a generate job.)"""
    c = plain_cluster
    started = time.monotonic()
    rc, logs = run_driver(gpu_calibration(data, c, tmp_path / "calib"), timeout=120)
    lines = logs.splitlines()
    assert rc == 2 and "AUTOSCALER_RUNNING False" in lines, logs[-4000:]
    errors = [line for line in lines if line.startswith("USER_ERROR ")]
    assert errors == ["USER_ERROR --gpus-per-worker 1 but the Ray cluster has no GPUs: use --gpus-per-worker 0"], logs[-4000:]
    assert "for the autoscaler to add a node" not in logs, logs[-4000:]  # it did not wait
    assert "Traceback" not in logs and time.monotonic() - started < START_TIMEOUT_S / 2, logs[-4000:]
    assert len(alive_nodes(c.gcs_address)) == 1


def test_a_request_no_node_type_can_hold_fails_as_soon_as_the_autoscaler_says_so(v2_cluster, data, tmp_path):
    """Two GPUs per actor, but the autoscaler's only GPU node type has one: autoscaler v2 lists the
    request as infeasible, and the pool fails in one line then, not after VOCABTRIM_ACTOR_START_TIMEOUT."""
    c = v2_cluster
    started = time.monotonic()
    rc, logs = run_driver({**gpu_calibration(data, c, tmp_path / "calib"), "gpus_per_worker": 2}, timeout=120)
    lines = logs.splitlines()
    assert rc == 2 and "AUTOSCALER_RUNNING True" in lines, logs[-4000:]
    errors = [line for line in lines if line.startswith("USER_ERROR ")]
    assert len(errors) == 1 and "cannot be placed: the autoscaler has no node type with 1 CPUs and 2 GPUs" in errors[0], logs[-4000:]
    assert "Traceback" not in logs and time.monotonic() - started < START_TIMEOUT_S / 2, logs[-4000:]
    assert len(alive_nodes(c.gcs_address)) == 1, "no node was added for a request no node type can hold"


def test_a_v2_monitor_without_an_autoscaling_config_does_not_make_a_gpu_request_wait(v2_plain_cluster, data, tmp_path):
    """A head started with RAY_enable_autoscaler_v2=1 and no autoscaling config reports an autoscaler
    state, so it passes for an autoscaling one; but it lists the GPU request as infeasible, and the pool
    fails on that in one line instead of waiting out the timeout."""
    c = v2_plain_cluster
    started = time.monotonic()
    rc, logs = run_driver(gpu_calibration(data, c, tmp_path / "calib"), timeout=120)
    lines = logs.splitlines()
    errors = [line for line in lines if line.startswith("USER_ERROR ")]
    assert rc == 2 and len(errors) == 1, logs[-4000:]
    assert "cannot be placed: the autoscaler has no node type with 1 CPUs and 1 GPUs" in errors[0], logs[-4000:]
    assert "Traceback" not in logs and time.monotonic() - started < START_TIMEOUT_S / 2, logs[-4000:]
