"""Faults of the machine during ``vocabtrim generate`` on a local Ray: nothing lost, nothing written twice.

An injected device fault (a test-only hook, ``GenerateConfig.fault_injection``) on one chunk is retried on a
fresh worker; the same fault on every try ends the run in one line with no output for that input, and a
rerun completes it; a worker SIGKILLed mid-chunk is replaced and its chunks run again; an out-of-memory on
a batch of 8 completes with fewer rows in flight and identical completions."""

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vocabtrim import cli
from vocabtrim.generate import GenerateConfig, run_generate


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-prompts")
    for f in range(2):
        rows = [f"the quick brown fox {f} {j}" for j in range(8)]
        pq.write_table(pa.table({"id": [f"{f}-{j}" for j in range(8)], "prompt": rows}), root / f"p{f}.parquet")
    return root


@pytest.fixture(scope="module")
def cfg(tiny_pair_dirs, prompts, tmp_path_factory):
    target, drafter = tiny_pair_dirs
    return GenerateConfig(target=target, drafter=drafter, prompts=[str(prompts)], out="", max_new_tokens=16,
                          temperature=0.8, seed=1, batch_size=4, rows_per_task=4, workers=1, progress=False)


@pytest.fixture(scope="module")
def reference(ray_local, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    run_generate(replace(cfg, out=str(out)))
    return outputs(out)


def outputs(out) -> dict:
    """What a row's completion is (draft counts depend on how gamma went, which timing decides)."""
    columns = ["id", "completion", "completion_tokens", "finish_reason", "error"]
    return {n: pq.read_table(Path(out) / n, columns=columns).to_pylist() for n in ("p0.parquet", "p1.parquet")}


def test_a_fault_on_one_chunk_is_retried_and_every_row_comes_out_right(ray_local, cfg, reference, tmp_path):
    marker = tmp_path / "fail-once"
    marker.write_text("")
    out = tmp_path / "out"
    summary = run_generate(replace(cfg, out=str(out), fault_injection=f"once:{marker}"))
    assert not marker.exists()  # the fault did happen
    assert outputs(out) == reference
    assert summary["errored_rows"] == 0 and summary["rows"] == 16


def test_a_fault_on_every_try_ends_the_run_in_one_line_and_a_rerun_completes(ray_local, cfg, reference, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--target", cfg.target, "--drafter", cfg.drafter, "--prompts", *cfg.prompts, "--max-new-tokens", "16",
            "--temperature", "0.8", "--seed", "1", "--batch-size", "4", "--no-progress", "--out", str(out)]
    from vocabtrim import generate

    real = generate.GenerateConfig

    def faulty(**kwargs):
        return real(**{**kwargs, "rows_per_task": 4, "fault_injection": "always"})

    generate.GenerateConfig = faulty
    try:
        code = cli.main(argv)
    finally:
        generate.GenerateConfig = real
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "failed 3 times" in err and "injected device fault" in err, err
    assert "rerun the same command to resume" in err
    assert not list(out.glob("*.parquet"))  # no file whose rows were not all generated
    assert cli.main(argv) == 0
    assert outputs(out) == reference


def test_a_worker_killed_mid_chunk_is_replaced_and_nothing_is_lost(ray_local, cfg, reference, tmp_path):
    """The worker that takes the first chunk SIGKILLs its own process while it holds that chunk."""
    marker = tmp_path / "kill-once"
    marker.write_text("")
    out = tmp_path / "out"
    summary = run_generate(replace(cfg, out=str(out), fault_injection=f"sigkill-once:{marker}"))
    assert not marker.exists()  # a worker died
    assert outputs(out) == reference  # every row exactly once, as a run without the fault makes it
    assert summary["errored_rows"] == 0 and summary["rows"] == 16


def test_out_of_memory_on_a_batch_of_8_completes_with_smaller_batches(ray_local, cfg, reference, tmp_path):
    out = tmp_path / "out"
    summary = run_generate(replace(cfg, out=str(out), batch_size=8, rows_per_task=8, fault_injection="oom-above:3"))
    assert outputs(out) == reference  # completions do not depend on the rows in flight
    assert summary["batch_occupancy"] <= 2 / 8 + 1e-9  # it ran with 2 rows in flight (8 -> 4 -> 2)


# ---------------------------------------------------------------------------------------------
# The actor pool when a replacement cannot start
# ---------------------------------------------------------------------------------------------


def _pool(ray, marker, size: int, replacement: dict):
    """An ActorPool of ``size`` echo actors whose replacements are made with ``replacement`` (options, args). An echo
    actor returns its items; the item "die" kills its process (the first time only: a marker file). The class is
    defined here so that Ray ships it by value (its workers cannot import this test module)."""
    from vocabtrim.ray_utils import ActorPool

    class Echo:
        def __init__(self, marker: str, start_error: str | None = None, die_starting: str | None = None):
            import os

            if die_starting and not os.path.exists(die_starting):  # the first start with this marker dies
                open(die_starting, "w").close()
                os._exit(1)
            self.marker, self.start_error = marker, start_error

        def pid(self) -> int:
            import os

            from vocabtrim.errors import UserError

            if self.start_error:
                raise UserError(self.start_error)
            return os.getpid()

        def run(self, item: str) -> str:
            import os

            if item == "die" and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            return item

    made = []

    def start():
        first = len(made) < size
        cls = ray.remote(Echo).options(num_cpus=0.1, max_restarts=0, **({} if first else replacement.get("options", {})))
        made.append(cls.remote(str(marker), *([] if first else replacement.get("args", []))))
        return made[-1]

    # A replacement no node can place is given up after start_timeout_s: 2 s where that is the case under test, else
    # long enough for a loaded machine to start a worker.
    placeable = "resources" not in replacement.get("options", {})
    return ActorPool(start, lambda actor, item: actor.run.remote(item), size, depth=1, start_timeout_s=300 if placeable else 2)


def test_a_replacement_the_cluster_cannot_place_is_given_up_and_the_others_finish_the_run(ray_local, tmp_path):
    """A worker dies; its replacement asks for a resource no node has (the lost node's): the run neither hangs nor
    fails, the survivor runs every item, each once."""
    pool = _pool(ray_local, tmp_path / "died", 2, {"options": {"resources": {"lost-node": 1}}})
    got = []
    try:
        pool.run(["a", "b", "die", "c", "d", "e"], lambda item, result: got.append(result))
    finally:
        pool.shutdown()
    assert sorted(got) == ["a", "b", "c", "d", "die", "e"]
    assert pool.replacements == 1 and len(pool.actors) == 0  # shutdown emptied it; one was given up


def test_with_no_worker_left_the_run_fails_in_one_line(ray_local, tmp_path):
    from vocabtrim.errors import RunFailed

    pool = _pool(ray_local, tmp_path / "died", 1, {"options": {"resources": {"lost-node": 1}}})
    try:
        with pytest.raises(RunFailed, match=r"^no worker left to run die: the replacements of failed workers did not start within 2 s"):
            pool.run(["die", "a"], lambda item, result: None)
    finally:
        pool.shutdown()


def test_a_replacement_that_dies_starting_is_started_again(ray_local, tmp_path):
    """A machine fault while a replacement starts (out of memory loading, say) is retried with another start: the
    pool keeps its size and every item runs once."""
    pool = _pool(ray_local, tmp_path / "died", 1, {"args": [None, str(tmp_path / "died-starting")]})
    got = []
    try:
        pool.run(["a", "die", "b", "c"], lambda item, result: got.append(result))
        assert sorted(got) == ["a", "b", "c", "die"] and pool.replacements == 2 and len(pool.actors) == 1
    finally:
        pool.shutdown()


def test_a_user_error_a_replacement_meets_starting_ends_the_run_as_that_error(ray_local, tmp_path):
    """The replacement lands on a node that lacks what the first workers had: its start-up error is the run's, in
    one line, not an AttributeError retried three times."""
    from vocabtrim.errors import UserError

    pool = _pool(ray_local, tmp_path / "died", 1, {"args": ["no model folder /data/target on this node"]})
    try:
        with pytest.raises(UserError, match=r"^no model folder /data/target on this node$"):
            pool.run(["die", "a"], lambda item, result: None)
    finally:
        pool.shutdown()


def test_an_actor_that_fails_starting_says_why_while_another_still_waits_to_be_placed(ray_local):
    """One worker's start-up error (a model folder missing on its node) ends the wait with that error, in one line,
    while another worker still waits for a node: not the start-up timeout's message when the wait runs out."""
    from vocabtrim.errors import UserError
    from vocabtrim.ray_utils import wait_ready

    class Starting:
        def __init__(self, start_error: str | None):
            self.start_error = start_error

        def ready(self) -> bool:
            from vocabtrim.errors import UserError

            if self.start_error:
                raise UserError(self.start_error)
            return True

    cls = ray_local.remote(Starting)
    failing = cls.options(num_cpus=0.1, max_restarts=0).remote("no model folder /data/target on this node")
    unplaced = cls.options(num_cpus=0.1, max_restarts=0, resources={"lost-node": 1}).remote(None)
    try:
        with pytest.raises(UserError, match=r"^no model folder /data/target on this node$"):
            wait_ready([unplaced.ready.remote(), failing.ready.remote()], "workers", timeout_s=60)
    finally:
        for actor in (failing, unplaced):
            ray_local.kill(actor)
