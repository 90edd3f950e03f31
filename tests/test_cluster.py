"""The stages as Ray jobs on a real multi-node cluster on this machine.

One cluster for the module: a head (job server, no CPUs: only drivers run there) and two worker
nodes, each its own `ray start` process (cluster/local_cluster.py). Jobs go through the job server
exactly as jobs/README.md shows (`python jobs/<stage>.py ...` with the checkout as working dir).
The finalizer stops the processes this module started, by pid and by the cluster's own temp folder,
also when a test fails. Token auth is off here only because conftest.py sets RAY_AUTH_MODE=disabled
for the test processes (the shipped configs keep it on).
"""

from __future__ import annotations

import json
import random
import shlex
import time
from collections import Counter
from pathlib import Path

import pytest
from clusters import leftover_pids, local_cluster_module

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
JOB_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Tests only: declare a killed node dead after ~3 s instead of Ray's default ~15-30 s.
NODE_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000"}
JOB_TIMEOUT = 180
WORDS = ("the quick brown fox jumps over the lazy dog speculative decoding drafts tokens and the target "
         "verifies them ray actors count tokens in shards a reducer merges the counts capital of France "
         "Paris haiku sea waves foam def add return 1 2 3 4 5 6 7 8 9 10 ünïcödé 東京 🙂").split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lc = local_cluster_module()
    state = tmp_path_factory.mktemp("ray-cluster")
    c = lc.start(state, workers=2, head_cpus=0, cpus_per_worker=2, env=NODE_ENV, timeout=120)
    try:
        yield lc, c
    finally:
        lc.stop(c)
        left = leftover_pids(lc, c)
        assert not left, f"processes of the test cluster outlived stop(): {left}"


def submit(cluster, argv: list[str], env: dict | None = None) -> str:
    from ray.job_submission import JobSubmissionClient

    _, c = cluster
    client = JobSubmissionClient(c.dashboard_url)
    return client.submit_job(entrypoint=shlex.join(["python", *argv]),
                             runtime_env={"working_dir": str(REPO), "env_vars": {**JOB_ENV, **(env or {})}})


def wait_job(cluster, job_id: str, timeout: float = JOB_TIMEOUT):
    """(status, logs) once the job is finished; stops it and fails after ``timeout`` seconds."""
    from ray.job_submission import JobSubmissionClient

    _, c = cluster
    client = JobSubmissionClient(c.dashboard_url)
    deadline = time.monotonic() + timeout
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job did not finish in {timeout}s; logs:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(0.5)
    return str(status), client.get_job_logs(job_id)


def run_job(cluster, argv: list[str], env: dict | None = None) -> str:
    status, logs = wait_job(cluster, submit(cluster, argv, env))
    assert status == "SUCCEEDED", f"{' '.join(argv)}\n{logs[-4000:]}"
    return logs


# --------------------------------------------------------------------------------------------------
# Data (tmp paths: on one machine every node sees them, as a shared filesystem would on a cluster)
# --------------------------------------------------------------------------------------------------


def _write_corpus(folder: Path, files: int, rows: int, seed: int) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    texts = []
    for f in range(files):
        column = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(rows)]
        column[rng.randrange(rows)] = None  # a null row: skipped, not counted
        pq.write_table(pa.table({"text": pa.array(column, pa.string())}), folder / f"part-{f:03d}.parquet")
        texts += column
    return texts


def _reference_histogram(model_dir: str, texts: list) -> dict[int, int]:
    """What an exact count gives: every id of every row's encoding, no special tokens added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = Counter()
    strings = [t for t in texts if isinstance(t, str)]
    for ids in tokenizer(strings, add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    return dict(counts)


def _read_histogram(out: Path) -> dict[int, int]:
    import pyarrow.parquet as pq

    table = pq.read_table(out / "histogram.parquet")
    ids, counts = table.column("token_id").to_pylist(), table.column("count").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "one row per id, sorted"
    assert all(c > 0 for c in counts), "only non-zero counts"
    return dict(zip(ids, counts))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, tiny_pair_dirs):
    folder = tmp_path_factory.mktemp("corpus-small") / "corpus"
    texts = _write_corpus(folder, files=6, rows=300, seed=1)
    return folder, _reference_histogram(tiny_pair_dirs[1], texts)


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory, tiny_pair_dirs):
    folder = tmp_path_factory.mktemp("corpus-large") / "corpus"
    texts = _write_corpus(folder, files=24, rows=1000, seed=2)
    return folder, _reference_histogram(tiny_pair_dirs[1], texts)


PROMPTS = ["the quick brown fox", "What is the capital of France?", "def add(a, b):", "ray actors count",
           "Write a haiku about the sea.", "1 2 3 4 5", "a small drafter proposes", "speculative decoding"]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("prompts") / "prompts"
    folder.mkdir()
    rows = {}
    for f in range(3):
        ids = [f"f{f}-r{i}" for i in range(10)]
        prompts = [PROMPTS[(f * 10 + i) % len(PROMPTS)] + f" {i}" for i in range(10)]
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), folder / f"prompts-{f}.parquet")
        rows.update(zip(ids, prompts))
    return folder, rows


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_cluster_has_a_head_and_two_worker_nodes(cluster):
    lc, c = cluster
    assert len(lc.alive_node_ids(c.dashboard_url)) == 3
    assert len(c.worker_pids) == 2 and c.head_pid not in c.worker_pids


def test_calibrate_job_counts_exactly(cluster, tiny_pair_dirs, small_corpus, tmp_path):
    corpus, expected = small_corpus
    out = tmp_path / "calib"
    run_job(cluster, ["jobs/calibrate.py", "--drafter", tiny_pair_dirs[1], "--corpus", str(corpus),
                      "--workers", "2", "--cpus-per-worker", "1", "--out", str(out)])
    assert _read_histogram(out) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_tokens"] == sum(expected.values())


def test_generate_job_completes_every_row(cluster, tiny_pair_dirs, prompt_files, tmp_path):
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, rows = prompt_files
    target, drafter = tiny_pair_dirs
    out = tmp_path / "gen"
    max_new = 8
    run_job(cluster, ["jobs/generate.py", "--target", target, "--drafter", drafter, "--prompts", str(folder),
                      "--max-new-tokens", str(max_new), "--temperature", "0", "--gamma", "3", "--chat-template", "never",
                      "--workers", "2", "--cpus-per-worker", "1", "--batch-size", "4", "--out", str(out)])

    outputs = sorted(p.name for p in out.glob("*.parquet"))
    assert outputs == sorted(p.name for p in folder.glob("*.parquet")), "one output per input file"
    table = pq.read_table([out / name for name in outputs]).to_pylist()
    assert sorted(r["id"] for r in table) == sorted(rows), "every row exactly once"
    for r in table:
        assert r["error"] is None and r["finish_reason"] in ("stop", "length"), r
        assert 1 <= r["completion_tokens"] <= max_new and isinstance(r["completion"], str), r
        assert r["finish_reason"] == "stop" or r["completion_tokens"] == max_new, r
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(rows) and summary["errored_rows"] == 0

    # Lossless at temperature 0: each completion is the target's own greedy continuation of the raw string
    # (--chat-template never: the string is fed as it is).
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    for r in table:
        ids = tokenizer(rows[r["id"]], add_special_tokens=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = model.generate(ids, do_sample=False, max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert r["completion_tokens"] == len(greedy), r
        assert r["completion"] in (tokenizer.decode(greedy), tokenizer.decode(greedy, skip_special_tokens=True)), r


def test_gpu_request_on_a_cluster_without_gpus_fails_in_one_line(cluster, tiny_pair_dirs, prompt_files, tmp_path):
    folder, _ = prompt_files
    target, drafter = tiny_pair_dirs
    started = time.monotonic()
    status, logs = wait_job(cluster, submit(cluster, [
        "jobs/generate.py", "--target", target, "--drafter", drafter, "--prompts", str(folder),
        "--gpus-per-worker", "1", "--out", str(tmp_path / "gen")]), timeout=JOB_TIMEOUT)
    assert status == "FAILED", logs[-2000:]
    assert "Traceback" not in logs, logs[-4000:]
    errors = [line for line in logs.splitlines() if line.startswith("vocabtrim generate: error:")]
    assert len(errors) == 1 and "GPU" in errors[0], logs[-2000:]
    # Failed at once: neither waited for an autoscaler nor ran out the actors' start-up timeout (900 s).
    assert "for the autoscaler to add a node" not in logs and time.monotonic() - started < JOB_TIMEOUT, logs[-2000:]


def test_the_three_stages_as_jobs_on_object_storage(cluster, s3, tiny_pair_dirs, small_corpus, prompt_files):
    """Corpus, histogram, head, prompts and outputs all on an S3 store (a local one): nothing on a shared
    disk. The store's endpoint and keys reach the jobs as users pass them, in the runtime env."""
    import pyarrow.parquet as pq

    from vocabtrim import storage

    target, drafter = tiny_pair_dirs
    corpus, expected = small_corpus
    folder, rows = prompt_files
    bucket = s3.bucket()
    for f in sorted(corpus.iterdir()):
        storage.write_bytes(f"{bucket}/corpus/{f.name}", f.read_bytes())
    for f in sorted(folder.iterdir()):
        storage.write_bytes(f"{bucket}/prompts/{f.name}", f.read_bytes())

    run_job(cluster, ["jobs/calibrate.py", "--drafter", drafter, "--corpus", f"{bucket}/corpus/*.parquet",
                      "--workers", "2", "--cpus-per-worker", "1", "--out", f"{bucket}/calib"], env=s3.env)
    with storage.open_input_file(f"{bucket}/calib/histogram.parquet") as f:
        table = pq.read_table(f)
    assert dict(zip(table.column("token_id").to_pylist(), table.column("count").to_pylist())) == expected

    run_job(cluster, ["jobs/build_head.py", "--histogram", f"{bucket}/calib", "--drafter", drafter, "--top-k", "64",
                      "--export", "sglang,eagle", "--out", f"{bucket}/head"], env=s3.env)
    assert {storage.name(p) for p in storage.walk_files(f"{bucket}/head")} >= {"head.safetensors", "manifest.json", "coverage.png"}

    run_job(cluster, ["jobs/generate.py", "--target", target, "--drafter", drafter, "--head", f"{bucket}/head",
                      "--prompts", f"{bucket}/prompts", "--max-new-tokens", "6", "--temperature", "0",
                      "--workers", "2", "--cpus-per-worker", "1", "--batch-size", "4", "--out", f"{bucket}/gen"], env=s3.env)
    outputs = [p for p in storage.walk_files(f"{bucket}/gen") if p.endswith(".parquet")]
    assert sorted(storage.name(p) for p in outputs) == sorted(p.name for p in folder.glob("*.parquet"))
    got = []
    for p in outputs:
        with storage.open_input_file(p) as f:
            got += pq.read_table(f).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(rows), "every row exactly once"
    assert all(r["error"] is None and 1 <= r["completion_tokens"] <= 6 for r in got)
    assert json.loads(storage.read_text(f"{bucket}/gen/summary.json"))["rows"] == len(rows)


def _actor_nodes(dashboard_url: str) -> set[str]:
    """Node ids hosting alive actors other than Ray's own job supervisors."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return {a.node_id for a in actors if a.class_name != "JobSupervisor"}


def test_calibrate_survives_losing_a_worker_node(cluster, tiny_pair_dirs, large_corpus, tmp_path):
    """SIGKILL one worker node (raylet, object store, its actors) mid-calibration: the job still
    succeeds and the histogram is exact (no shard lost, none counted twice). Runs last in the
    module: it leaves the cluster with one worker node."""
    lc, c = cluster
    corpus, expected = large_corpus
    out = tmp_path / "calib"
    job = submit(cluster, ["jobs/calibrate.py", "--drafter", tiny_pair_dirs[1], "--corpus", str(corpus),
                           "--workers", "2", "--cpus-per-worker", "1", "--batch-size", "4", "--out", str(out)])

    # Wait until counting is under way on a worker node, then take that node away.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(c.dashboard_url)
    victim, first_seen, deadline = None, None, time.monotonic() + JOB_TIMEOUT
    while victim is None:
        assert time.monotonic() < deadline, "no actor ever came up on a worker node"
        status = client.get_job_status(job)
        assert not status.is_terminal(), (
            f"calibration ended ({status}) before a node could be removed: make the corpus bigger\n"
            + client.get_job_logs(job)[-3000:])
        on_workers = {n for n in _actor_nodes(c.dashboard_url) if c.pid_of(n) in c.worker_pids}
        if on_workers:
            first_seen = first_seen or time.monotonic()
            ledger = list((out / "shards").glob("*.npz")) if (out / "shards").is_dir() else []
            if ledger or time.monotonic() - first_seen > 3:  # some shards done, or counting for a while
                victim = sorted(on_workers)[0]
        time.sleep(0.2)
    lc.kill_node(c, c.pid_of(victim))
    deadline = time.monotonic() + 30
    while victim in lc.alive_node_ids(c.dashboard_url):  # the GCS declares the node dead
        assert time.monotonic() < deadline, "the killed node is still alive for Ray"
        time.sleep(0.5)
    status, logs = wait_job(cluster, job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert _read_histogram(out) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_tokens"] == sum(expected.values())
    assert manifest["actor_replacements"] >= 1  # the node took work in flight with it
