"""What ``vocabtrim --help`` and each command's ``--help`` tell a user."""

import pytest

from vocabtrim.cli import build_parser, main


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_top_level_help_is_plain_text_and_explains_log_level(capsys):
    text = help_text(capsys)
    assert "``" not in text and "→" not in text
    assert "speculative decoding" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR} how much vocabtrim logs" in text


@pytest.mark.parametrize("command, shown", [
    ("generate", ["or a fixed number (default: auto)", "(default: 6)", "(default: gumbel)", "(default: 8)",
                  "(default: prompt)", "tokens generated per row at most (default: 128)"]),
    ("calibrate", ["(default: corpus)", "(default: text)", "(default: 64)"]),
    ("demo", ["(default 8192)", "(default 32; --quick: 16)"]),
])
def test_defaults_are_shown(capsys, command, shown):
    text = help_text(capsys, command)
    for piece in shown:
        assert piece in text, piece


@pytest.mark.parametrize("command", ["calibrate", "build-head"])
def test_a_required_drafter_does_not_claim_a_default(capsys, command):
    text = help_text(capsys, command)
    drafter = text[text.index("--drafter DRAFTER") : text.index("--drafter-layers DRAFTER_LAYERS drafter")]
    assert "default" not in drafter


def test_log_level_is_checked_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--log-level", "loud", "demo"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv, level", [
    (["demo"], "WARNING"),
    (["--log-level", "info", "demo"], "INFO"),
    (["demo", "--log-level", "debug"], "DEBUG"),  # after the command too (jobs/*.py put the command first)
    (["--log-level", "error", "demo", "--log-level", "info"], "INFO"),
])
def test_log_level_is_taken_before_or_after_the_command(argv, level, monkeypatch):
    monkeypatch.delenv("VOCABTRIM_LOG", raising=False)
    assert build_parser().parse_args(argv).log_level == level


def test_a_fault_of_the_machine_ends_a_command_in_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Any command stopped by a fault of the machine (a dropped object-store connection, memory exhausted) says so
    in one line with exit code 1 (every command resumes on a rerun); any other exception is a bug and is raised."""
    from vocabtrim.commands import build_head

    def fails(error):
        def run(args):
            raise error
        return run

    monkeypatch.setattr(build_head, "main", fails(OSError("AWS Error SERVICE_UNAVAILABLE during PutObject operation: slow down")))
    assert main(["build-head", "--histogram", "h", "--drafter", "d", "--top-k", "8", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vocabtrim build-head: error: a fault of the machine stopped the run "
                                                   "(OSError: AWS Error SERVICE_UNAVAILABLE during PutObject operation")
    assert err.rstrip().endswith("rerun the same command (it resumes from what its --out already holds)")
    monkeypatch.setattr(build_head, "main", fails(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["build-head", "--histogram", "h", "--drafter", "d", "--top-k", "8", "--out", "o"])


def test_generate_table_shows_whole_run_and_engine_throughput():
    from vocabtrim.commands.generate import summary_table

    summary = {"files": 1, "files_generated": 1, "files_resumed": 0, "rows": 8, "errored_rows": 0,
               "generated_tokens": 400, "acceptance_rate": 0.1, "tokens_per_target_pass": 1.1, "drafter_step_ms": 20.0,
               "tokens_per_second": 2.0, "tokens_per_engine_second": 14.0, "wall_seconds": 200.0}
    lines = {line.split("  ")[0]: line for line in summary_table(summary).splitlines()}
    assert lines["tokens/s, whole run"].split()[3] == "2.0" and "model loading included" in lines["tokens/s, whole run"]
    assert lines["tokens/s, engine"].split()[2] == "14.0" and "decoding only" in lines["tokens/s, engine"]


@pytest.mark.parametrize("argv, line", [
    (["generate", "--target", "m", "--drafter", "m", "--prompts", "p.parquet", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["generate", "--target", "m", "--drafter", "m", "--prompts", "p.parquet", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["generate", "--target", "m", "--drafter", "m", "--prompts", "p.parquet", "--gamma", "99"], "--gamma must be 'auto' or between 0 and 64, got 99"),
    (["generate", "--target", "m", "--drafter", "m", "--prompts", "p.parquet", "--max-gamma", "65"], "--max-gamma must be between 0 and 64, got 65"),
    # gamma sets the room a prompt has beside --max-new-tokens, the same with --no-draft (error rows in all runs or none)
    (["generate", "--target", "m", "--no-draft", "--prompts", "p.parquet", "--gamma", "99"], "--gamma must be 'auto' or between 0 and 64, got 99"),
    (["generate", "--target", "m", "--no-draft", "--prompts", "p.parquet", "--max-gamma", "-3"], "--max-gamma must be between 0 and 64, got -3"),
    (["generate", "--target", "m", "--no-draft", "--prompts", "p.parquet", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["calibrate", "--drafter", "m", "--corpus", "c.txt", "--source", "drafter", "--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    (["calibrate", "--drafter", "m", "--corpus", "c.txt", "--cpus-per-worker", "0"], "--cpus-per-worker must be > 0, got 0.0"),
    (["calibrate", "--drafter", "m", "--corpus", "c.txt", "--drafter-layers", "0"], "--drafter-layers must be >= 1, got 0"),
    (["sweep", "--target", "m", "--drafter-layers", "1", "--corpus", "c.txt", "--prompts", "p.parquet", "--calib-temperature", "-1"],
     "--calib-temperature must be >= 0, got -1.0"),
    (["sweep", "--target", "m", "--drafter-layers", "1", "--corpus", "c.txt", "--prompts", "p.parquet", "--gamma", "0"],
     "--gamma must be between 1 and 64, got 0"),
    (["train-drafter", "--target", "m", "--corpus", "c.txt", "--histogram", "h", "--top-k", "8", "--learning-rate", "0"],
     "--learning-rate must be > 0, got 0.0"),
])
def test_a_bad_setting_is_refused_in_one_line_naming_its_flag(capsys, tmp_path, argv, line):
    """Every stage checks its model, pool and sampling settings in ``vocabtrim.validate`` before any model is
    loaded; the CLI names the flag."""
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"vocabtrim {argv[0]}: error: {line}\n"
    assert not out.exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [
    ["generate", "--target", "m", "--no-draft", "--prompts", "p.parquet"],
    ["calibrate", "--drafter", "m", "--corpus", "c.txt"],
    ["train-drafter", "--target", "m", "--corpus", "c.txt", "--histogram", "h", "--top-k", "8"],
    ["sweep", "--target", "m", "--drafter-layers", "1", "--corpus", "c.txt", "--prompts", "p.parquet"],
    ["demo", "--quick"],
])
@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_a_cluster_address_that_does_not_answer_is_refused_in_one_line(capsys, tmp_path, monkeypatch, command, via):
    """Ray's own ``ray.init`` retries a closed port for minutes, printing a warning every few seconds; every
    command that joins a cluster checks the address first."""
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if via == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
        extra = []
    else:
        extra = ["--address", address]
    out = tmp_path / "out"
    assert main([*command, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"vocabtrim {command[0]}: error: cannot reach the Ray cluster at {address} (connection refused): "
                   "check --address (or RAY_ADDRESS) and that the cluster's head node is up\n")
    assert not out.exists()


def test_an_address_that_is_no_ray_cluster_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    """The dashboard's URL (what `ray job submit` takes) made ``ray.init`` raise a traceback; a port that answers
    in another protocol (an HTTP/1 server here, as the dashboard's 8265 is) made it wait for minutes."""
    import http.server
    import threading

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the server's request log would share stderr with the command's line
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    command = ["calibrate", "--drafter", "m", "--corpus", "c.txt", "--out", str(tmp_path / "out")]
    try:
        assert main([*command, "--address", f"http://127.0.0.1:{port}"]) == 2
        assert capsys.readouterr().err == (
            f"vocabtrim calibrate: error: --address http://127.0.0.1:{port} is an HTTP address (Ray's dashboard and jobs API, which "
            "`ray job submit` takes), not a cluster to join: pass the head node's GCS address, host:6379 by default\n")
        # The same address left in RAY_ADDRESS (as `ray job submit` wants it): the message names where it came from.
        monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
        assert main(command) == 2
        assert capsys.readouterr().err.startswith(f"vocabtrim calibrate: error: RAY_ADDRESS http://127.0.0.1:{port} is an HTTP")
        monkeypatch.delenv("RAY_ADDRESS")
        assert main([*command, "--address", f"127.0.0.1:{port}"]) == 2
        assert capsys.readouterr().err == (
            f"vocabtrim calibrate: error: 127.0.0.1:{port} answers but is not a Ray cluster (no gRPC server on port {port}): "
            "pass the head node's GCS address, host:6379 by default (8265 is the dashboard)\n")
        # With TLS a plaintext handshake proves nothing: only the port is checked.
        from vocabtrim.ray_utils import speaks_grpc

        monkeypatch.setenv("RAY_USE_TLS", "1")
        assert speaks_grpc("127.0.0.1", port, timeout_s=1.0)
    finally:
        server.shutdown()
    assert not (tmp_path / "out").exists()


def test_a_cluster_of_other_versions_or_another_token_is_refused_in_one_line(monkeypatch):
    """Joining a cluster whose Ray or Python differs from this machine's, or with a token it refuses: one line each
    (Ray raises a RuntimeError over several lines, and its AuthenticationError), not a traceback."""
    import ray

    from vocabtrim import ray_utils
    from vocabtrim.errors import UserError

    monkeypatch.setattr(ray_utils, "check_reachable", lambda address: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refusing(error):
        def init(*args, **kwargs):
            raise error
        return init

    mismatch = RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.9\n"
                            "This process on node 10.0.0.2 was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n")
    monkeypatch.setattr(ray, "init", refusing(mismatch))
    with pytest.raises(UserError) as raised:
        ray_utils.init_ray("head:6379")
    assert str(raised.value) == ("cannot join the Ray cluster at head:6379: Version mismatch: The cluster was started with: Ray: "
                                 "2.60.0 Python: 3.11.9 This process on node 10.0.0.2 was started with: Ray: 2.60.0 Python: 3.11.7 "
                                 "(this machine's Ray and Python must be the cluster's)")
    monkeypatch.setattr(ray, "init", refusing(ray.exceptions.AuthenticationError("Token mismatch")))
    with pytest.raises(UserError, match=r"^the Ray cluster at head:6379 refused this machine's token \(.*\): set RAY_AUTH_TOKEN") as raised:
        ray_utils.init_ray("head:6379")
    assert "\n" not in str(raised.value)
    monkeypatch.setattr(ray, "init", refusing(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        ray_utils.init_ray("head:6379")
    # A local Ray that cannot start is the machine's fault, not an address of the user's ("the cluster at None").
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", refusing(ConnectionError("raylet did not start")))
    with pytest.raises(ConnectionError, match="raylet did not start"):
        ray_utils.init_ray(None)
    with pytest.raises(UserError, match=r"^cannot reach the Ray cluster at head:6379: raylet did not start$"):
        ray_utils.init_ray("head:6379")
    monkeypatch.setattr(ray, "init", refusing(ValueError("bad RAY_memory value")))
    with pytest.raises(UserError, match=r"^cannot start a local Ray: bad RAY_memory value$"):
        ray_utils.init_ray(None)


def test_a_grpc_server_passes_the_handshake_check():
    """The other side of the check above: a port with a gRPC server (as a Ray GCS is) is taken."""
    from concurrent import futures

    import grpc

    from vocabtrim.ray_utils import speaks_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert speaks_grpc("127.0.0.1", port, timeout_s=5.0)
    finally:
        server.stop(None)


@pytest.mark.parametrize("address, target", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)), ("ray://head:10001", ("head", 10001)), ("[::1]:6379", ("::1", 6379)),
    ("auto", None), ("local", None), ("head", None),
])
def test_the_host_and_port_of_a_ray_address(address, target):
    from vocabtrim.ray_utils import host_and_port

    assert host_and_port(address) == target


@pytest.mark.parametrize("nodes, workers, gpus, cpus, line", [
    ([{"CPU": 2}], 2, 0, 1, None),
    ([{"CPU": 2}], 5, 0, 0.4, None),  # fractional CPUs: 5 x 0.4 fill 2
    ([{"CPU": 2}], 3, 0, 1, "3 workers of 1 CPUs each, but the Ray cluster holds 2 such workers at a time: use --workers 2 "
                            "(or fewer CPUs or GPUs per worker)"),
    ([{"CPU": 8}], 1, 1, 1, "--gpus-per-worker 1 but the Ray cluster has no GPUs: use --gpus-per-worker 0"),
    ([{"CPU": 8, "GPU": 1}], 1, 2, 1, "--gpus-per-worker 2 but no node has more than 1 GPUs"),
    ([{"CPU": 4}], 1, 0, 8, "--cpus-per-worker 8 but no node has more than 4 CPUs"),
    # a CPU-only head and a GPU node with few CPUs: each request fits a node, the pair fits none
    ([{"CPU": 16}, {"CPU": 4, "GPU": 1}], 1, 1, 8, "--gpus-per-worker 1 with --cpus-per-worker 8: no node has both (the nodes "
                                                  "with 1 GPUs have at most 4 CPUs)"),
    ([{"CPU": 16}, {"CPU": 4, "GPU": 2}], 4, 1, 2, "4 workers of 2 CPUs and 1 GPUs each, but the Ray cluster holds 2 such "
                                                  "workers at a time: use --workers 2 (or fewer CPUs or GPUs per worker)"),
    ([{"CPU": 16}, {"CPU": 4, "GPU": 2}], 2, 1, 2, None),
])
def test_a_pool_the_cluster_can_never_hold_is_named_in_one_line(nodes, workers, gpus, cpus, line):
    """Every actor of a pool must start before work begins: a pool the live nodes can never hold at once (no node
    with both its GPUs and CPUs, or too few places in all) is refused instead of waiting out the start timeout."""
    from vocabtrim.ray_utils import placement_shortfall

    assert placement_shortfall(nodes, workers, gpus, cpus) == line


@pytest.mark.parametrize("command", [["generate", "--target", "m", "--no-draft", "--prompts", "p.parquet"],
                                     ["train-drafter", "--target", "m", "--corpus", "c.txt", "--histogram", "h", "--top-k", "8"]])
def test_an_unknown_dtype_is_refused_before_any_model_loads(capsys, command):
    from vocabtrim.commands.common import DTYPES
    from vocabtrim.models import DTYPES as loadable

    assert set(DTYPES) == {"auto", *loadable}
    with pytest.raises(SystemExit) as exc:
        main([*command, "--dtype", "float8", "--out", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --dtype: invalid choice: 'float8'" in err


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"vocabtrim {version('vocabtrim')}\n"


def test_every_command_takes_address():
    """SPEC: every command takes ``--address`` (a script passes it to each; build-head, which starts no Ray, too)."""
    from vocabtrim.cli import COMMANDS

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == set(COMMANDS)
    for name, sub in subparsers.items():
        assert any("--address" in a.option_strings for a in sub._actions), name


def test_build_head_does_not_check_a_cluster_address_it_does_not_use(capsys, tmp_path, monkeypatch):
    """A stale RAY_ADDRESS (a cluster since stopped) refuses the commands that join it, not build-head."""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    argv = ["build-head", "--histogram", str(tmp_path / "none"), "--drafter", "d", "--top-k", "8", "--out", str(tmp_path / "o")]
    for extra in ([], ["--address", f"127.0.0.1:{_closed_port()}"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err == "vocabtrim build-head: error: no such model: d (pass a model folder, a .gguf file, a hub id or smollm2-135m)\n"


def test_a_message_that_quotes_a_newline_is_still_one_line(capsys, monkeypatch):
    from vocabtrim.commands import build_head
    from vocabtrim.errors import UserError

    def run(args):
        raise UserError("the column 'a\nb' is not text")

    monkeypatch.setattr(build_head, "main", run)
    assert main(["build-head", "--histogram", "h", "--drafter", "d", "--top-k", "8", "--out", "o"]) == 2
    assert capsys.readouterr().err == "vocabtrim build-head: error: the column 'a b' is not text\n"


STOPPABLE = """
import signal, sys, time
from vocabtrim import cli, ray_utils

signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (pytest-xdist's workers ignore SIGINT)
from vocabtrim.commands import build_head

def run(args):
    if sys.argv[1] == "ray":  # blocked in ray.get, as a run waiting on its workers is
        import ray
        ray_utils.init_ray()
        ref = ray.remote(num_cpus=0)(lambda: time.sleep(120)).remote()
        try:
            print("ready", flush=True)
            ray.get(ref)
        finally:
            print("finally ran", flush=True)
    else:
        try:
            print("ready", flush=True)
            time.sleep(120)
        finally:
            print("finally ran", flush=True)

build_head.main = run
sys.exit(cli.main(["build-head", "--histogram", "h", "--drafter", "d", "--top-k", "8", "--out", "o"]))
"""


@pytest.mark.parametrize("signum, phase, code, said", [
    (15, "plain", 143, "stopped by SIGTERM"),
    (15, "ray", 143, "stopped by SIGTERM"),  # ray.init replaces the handler: init_ray puts it back
    (2, "plain", 130, "interrupted"),
])
def test_a_stopped_command_unwinds_and_says_so_in_one_line(signum, phase, code, said):
    """SIGTERM (a pod's stop, `ray job stop`) stops a command as Ctrl-C does: its finally blocks run (workers
    stopped, --out released), one line names the signal, and the exit status is 128 + the signal's number. Before,
    SIGTERM killed the process outright, or (once Ray had started) ended it with status 1, a failed run's."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, phase], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code and "finally ran" in out
    assert err.strip().splitlines()[-1] == (f"vocabtrim build-head: {said}; rerun the same command to go on (it resumes from what "
                                            "its --out already holds)")
    if phase == "plain":
        assert err.count("\n") == 1


def test_a_stopped_run_kills_its_workers_without_waiting_on_their_close(monkeypatch):
    """kill_actors asks actors with a close() (a vLLM engine's) to close first, but not while a stop unwinds the run:
    a close queues behind the calls in flight (up to CLOSE_TIMEOUT_S of silence after Ctrl-C), and Ray kills a
    killed actor's child processes."""
    import ray

    from vocabtrim.ray_utils import kill_actors

    calls = []

    class Actor:
        class close:
            @staticmethod
            def remote():
                calls.append("close")
                return "ref"

    monkeypatch.setattr(ray, "wait", lambda *args, **kwargs: calls.append("wait"))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: calls.append("kill"))
    kill_actors([Actor()])
    assert calls == ["close", "wait", "kill"]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            kill_actors([Actor()])
    assert calls == ["kill"]
