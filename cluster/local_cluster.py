#!/usr/bin/env python
"""A multi-node Ray cluster on one machine: a head plus N worker nodes, each its own `ray start`.

For trying the jobs in `jobs/` the way they run on a real cluster (job server, several raylets,
resources per node, node loss) without a cloud account:

    python cluster/local_cluster.py start --workers 2 --cpus-per-worker 2 --state /tmp/vt-cluster
    export RAY_ADDRESS=http://127.0.0.1:$(python cluster/local_cluster.py dashboard-port --state /tmp/vt-cluster)
    ray job submit --working-dir . -- python jobs/calibrate.py ...
    python cluster/local_cluster.py stop --state /tmp/vt-cluster

Every node is a `ray start --block` process in a session of its own; `stop` ends those processes
and what they started (found by process id and by this cluster's own temp folder), never other
Ray processes on the machine: no `ray stop`, nothing by name.

Token auth: when RAY_AUTH_MODE is unset, the cluster runs with RAY_AUTH_MODE=token and the token in
~/.ray/auth_token (created if missing, as `ray get-auth-token --generate` does); clients need
`export RAY_AUTH_MODE=token` too. Whatever RAY_AUTH_MODE the caller sets is passed to every node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "cluster.json"


@dataclass
class LocalCluster:
    """What `start` launched; enough for `stop` to end exactly that."""

    state_dir: str
    temp_dir: str  # Ray's --temp-dir for every node: the marker of this cluster's processes
    gcs_address: str
    dashboard_url: str
    head_pid: int
    worker_pids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # RAY_AUTH_MODE etc. the nodes run with
    node_ids: dict[str, str] = field(default_factory=dict)  # str(pid) -> Ray node id

    @property
    def node_pids(self) -> list[int]:
        return [self.head_pid, *self.worker_pids]

    def pid_of(self, node_id: str) -> int | None:
        """The `ray start` pid of the node with this Ray node id (None: not one of ours)."""
        return next((int(pid) for pid, nid in self.node_ids.items() if nid == node_id), None)

    def save(self) -> None:
        Path(self.state_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> "LocalCluster":
        return cls(**json.loads(Path(state_dir, STATE_FILE).read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def _node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a node must not try to join some other cluster
    # job entry points (`python jobs/...`) run with this Python environment, activated or not
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
    if env["RAY_AUTH_MODE"] == "token" and not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        if not (Path.home() / ".ray" / "auth_token").exists():
            subprocess.run([_ray_executable(), "get-auth-token", "--generate"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    env.update(extra or {})
    return env


def _common_node_args(temp_dir: str, cpus: float, gpus: int, object_store_memory: int,
                      resources: dict | None) -> list[str]:
    args = [
        "--block",
        f"--num-cpus={int(cpus)}",
        f"--num-gpus={gpus}",
        f"--object-store-memory={object_store_memory}",
        f"--temp-dir={temp_dir}",
        # fixed defaults of these ports would collide between nodes on one machine
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--disable-usage-stats",
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> int:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _auth_headers() -> dict[str, str]:
    """The header Ray's own clients send when token auth is on (the token itself is never saved here)."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.exists() else None
    return {"authorization": f"Bearer {token}"} if token else {}


def alive_node_ids(dashboard_url: str) -> set[str]:
    """Ray node ids of the cluster's alive nodes, from the dashboard."""
    request = urllib.request.Request(f"{dashboard_url}/nodes?view=summary", headers=_auth_headers())
    with urllib.request.urlopen(request, timeout=5) as r:
        data = json.load(r)
    nodes = [n.get("raylet", {}) for n in data.get("data", {}).get("summary", [])]
    return {n["nodeId"] for n in nodes if n.get("state") == "ALIVE"}


def _alive_nodes(dashboard_url: str) -> int:
    return len(alive_node_ids(dashboard_url))


def _wait(predicate, timeout: float, what: str, pids: list[int]) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for pid in pids:
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                raise RuntimeError(f"a Ray node (pid {pid}) exited while waiting for {what}")
        try:
            if predicate():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def start(
    state_dir: str | os.PathLike | None = None,
    *,
    workers: int = 2,
    head_cpus: float = 1,
    cpus_per_worker: float = 2,
    gpus_per_worker: int = 0,
    worker_resources: dict | None = None,
    object_store_memory: int = 200_000_000,
    env: dict[str, str] | None = None,
    timeout: float = 90,
) -> LocalCluster:
    """Start a head (with the dashboard and job server) and ``workers`` worker nodes; wait until all are alive."""
    state_dir = str(state_dir or tempfile.mkdtemp(prefix="vt-cluster-"))
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    # Unix socket paths under the temp dir are limited to ~107 characters: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="vtc", dir="/tmp")
    node_env = _node_env(env)
    ray = _ray_executable()
    port, dashboard_port = free_port(), free_port()
    gcs_address = f"127.0.0.1:{port}"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"

    head_args = [ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={free_port()}",
                 *_common_node_args(temp_dir, head_cpus, 0, object_store_memory, {"head": 1})]
    head_pid = _spawn(head_args, node_env, Path(state_dir, "head.log"))
    cluster = LocalCluster(state_dir, temp_dir, gcs_address, dashboard_url, head_pid, [],
                           {k: node_env[k] for k in ("RAY_AUTH_MODE",) if k in node_env})
    cluster.save()
    try:
        _wait(lambda: _alive_nodes(dashboard_url) >= 1, timeout, "the head node", [head_pid])
        cluster.node_ids[str(head_pid)] = next(iter(alive_node_ids(dashboard_url)))
        cluster.save()
        for i in range(workers):  # one at a time: nodes started together time out on a small machine
            add_worker(cluster, cpus=cpus_per_worker, gpus=gpus_per_worker, resources=worker_resources,
                       object_store_memory=object_store_memory, wait=True, name=f"worker{i}", timeout=timeout)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def add_worker(cluster: LocalCluster, *, cpus: float = 2, gpus: int = 0, resources: dict | None = None,
               object_store_memory: int = 200_000_000, wait: bool = True, name: str | None = None,
               timeout: float = 60) -> int:
    """Start one more worker node (its own `ray start`); return its pid."""
    before = alive_node_ids(cluster.dashboard_url) if wait else set()
    name = name or f"worker{len(cluster.worker_pids)}"
    args = [_ray_executable(), "start", f"--address={cluster.gcs_address}", "--node-ip-address=127.0.0.1",
            *_common_node_args(cluster.temp_dir, cpus, gpus, object_store_memory, resources)]
    pid = _spawn(args, _node_env(cluster.env), Path(cluster.state_dir, f"{name}.log"))
    cluster.worker_pids.append(pid)
    cluster.save()
    if wait:
        _wait(lambda: alive_node_ids(cluster.dashboard_url) - before, timeout, f"worker node {name}", [pid])
        new = alive_node_ids(cluster.dashboard_url) - before
        if len(new) == 1:
            cluster.node_ids[str(pid)] = new.pop()
            cluster.save()
    return pid


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _marked(temp_dir: str) -> list:
    """Processes whose command line names this cluster's temp dir (orphans re-parented to init)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(arg == temp_dir or temp_dir + "/" in arg or arg.endswith("=" + temp_dir)
                   for arg in p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _terminate(procs: list, grace: float) -> None:
    import psutil

    me = os.getpid()
    procs = [p for p in {p.pid: p for p in procs}.values() if p.pid != me]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def kill_node(cluster: LocalCluster, pid: int, *, grace: float = 0.0) -> None:
    """Take one node away (SIGKILL by default: a crashed machine), with every process it started."""
    _terminate(_tree(pid), grace)
    if pid in cluster.worker_pids:
        cluster.worker_pids.remove(pid)
        cluster.node_ids.pop(str(pid), None)
        cluster.save()


def stop(cluster: LocalCluster, *, grace: float = 3.0) -> None:
    """End every process of this cluster: the nodes, their children, and orphans marked with its temp dir."""
    procs = []
    for pid in cluster.node_pids:
        procs += _tree(pid)
    procs += _marked(cluster.temp_dir)
    _terminate(procs, grace)
    # a second sweep for anything started while the first one ran (a worker that was being spawned)
    _terminate(_marked(cluster.temp_dir), 1.0)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start a head and worker nodes")
    p.add_argument("--state", required=True, help="folder for the cluster's pids and node logs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--head-cpus", type=float, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=2)
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--object-store-memory", type=int, default=200_000_000)
    p.add_argument("--worker-resources", type=json.loads, default=None, help='JSON, e.g. {"worker": 1}')
    for name, help_text in [("stop", "stop the cluster started with --state"),
                            ("status", "print the cluster's addresses and alive nodes"),
                            ("dashboard-port", "print the dashboard (job server) port")]:
        sub.add_parser(name, help=help_text).add_argument("--state", required=True)
    args = parser.parse_args(argv)

    if args.command == "start":
        c = start(args.state, workers=args.workers, head_cpus=args.head_cpus, cpus_per_worker=args.cpus_per_worker,
                  gpus_per_worker=args.gpus_per_worker, worker_resources=args.worker_resources,
                  object_store_memory=args.object_store_memory)
        print(f"head {c.gcs_address} (pid {c.head_pid}), {len(c.worker_pids)} worker nodes (pids {c.worker_pids})")
        print(f"job server: {c.dashboard_url}")
        print(f"  export RAY_ADDRESS={c.dashboard_url}" + (
            f" RAY_AUTH_MODE={c.env['RAY_AUTH_MODE']}" if c.env.get("RAY_AUTH_MODE") else ""))
        print(f"stop with: python {sys.argv[0]} stop --state {args.state}")
    elif args.command == "stop":
        stop(LocalCluster.load(args.state))
    elif args.command == "status":
        c = LocalCluster.load(args.state)
        print(json.dumps({**asdict(c), "alive_nodes": _alive_nodes(c.dashboard_url)}, indent=1))
    elif args.command == "dashboard-port":
        print(LocalCluster.load(args.state).dashboard_url.rsplit(":", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
