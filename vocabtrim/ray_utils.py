"""Starting or joining Ray, and refusing resource requests a cluster can never meet."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

from vocabtrim import validate
from vocabtrim.errors import RunFailed, UserError, first_line, stop_on_signal

log = logging.getLogger(__name__)

# How long to wait for an actor pool to start (model loads included) before failing in one line.
ACTOR_START_TIMEOUT_S = float(os.environ.get("VOCABTRIM_ACTOR_START_TIMEOUT", "900"))
POLL_S = 5.0  # how often a waiting pool asks the autoscaler whether it can place the actors


def cluster_address(address: str | None) -> str | None:
    """The cluster a run joins: ``--address``, else ``RAY_ADDRESS``; None when it starts its own local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray for this run. Idempotent.

    A local Ray keeps Ray's token auth on with a token made for this run (``local_run_token``): no warning
    about it and nothing written to ``~/.ray/auth_token``. Ray's own INFO lines are left out.
    """
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        check_reachable(address)
    ours = signal.getsignal(signal.SIGTERM) is stop_on_signal
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            if local_run_token(os.environ):
                _reload_ray_config()
            ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as exc:  # ValueError: an address Ray cannot parse
        if not address:  # a local Ray that did not start: no address of the user's to blame
            if isinstance(exc, ConnectionError):  # the machine's
                raise
            raise UserError(f"cannot start a local Ray: {first_line(exc)}") from exc
        raise UserError(f"cannot reach the Ray cluster at {address}: {first_line(exc)}") from exc
    except ray.exceptions.AuthenticationError as exc:
        raise UserError(f"the Ray cluster at {address} refused this machine's token ({first_line(exc)}): set RAY_AUTH_TOKEN to "
                        "the cluster's token (`ray get-auth-token` on its head node), with RAY_AUTH_MODE=token") from exc
    except RuntimeError as exc:
        if not str(exc).startswith("Version mismatch"):
            raise
        versions = " ".join(str(exc).split())  # Ray's message spans lines: the cluster's versions, then this process's
        raise UserError(f"cannot join the Ray cluster at {address}: {versions} (this machine's Ray and Python must be the "
                        "cluster's)") from exc
    finally:
        if ours:  # ray.init makes SIGTERM a SystemExit(1), a failed run's status: the command's handler stays
            signal.signal(signal.SIGTERM, stop_on_signal)


def host_and_port(address: str) -> tuple[str, int] | None:
    """The host and port a Ray address names (``host:port``, ``[v6]:port``, ``ray://host:port``); None for
    ``auto`` and ``local`` or an address without a port, which Ray resolves itself."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse in one line a cluster address that is no Ray cluster: an HTTP URL (the dashboard's, which
    ``ray job submit`` takes), a port that does not answer, or one that answers without gRPC (the dashboard's
    8265 given as ``host:port``, a web server).

    Ray's own ``ray.init`` retries a closed or filtered port for minutes, printing a warning every few
    seconds, and waits on a port that answers in another protocol as long; a TCP connect and a gRPC handshake
    find out in at most ``timeout_s`` each.
    """
    import socket

    if address.lower().startswith(("http://", "https://")):
        given = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "--address"  # the ray job submit address, left set
        raise UserError(f"{given} {address} is an HTTP address (Ray's dashboard and jobs API, which `ray job submit` takes), not a "
                        f"cluster to join: pass the head node's GCS address, host:6379 by default")
    target = host_and_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or first_line(exc)).lower()
        raise UserError(f"cannot reach the Ray cluster at {address} ({why}): check --address (or RAY_ADDRESS) and that "
                        f"the cluster's head node is up") from exc
    if not speaks_grpc(*target, timeout_s=timeout_s):
        raise UserError(f"{address} answers but is not a Ray cluster (no gRPC server on port {target[1]}): pass the head "
                        f"node's GCS address, host:6379 by default (8265 is the dashboard)")


def speaks_grpc(host: str, port: int, timeout_s: float = 5.0) -> bool:
    """Whether ``host:port`` completes a plaintext gRPC (HTTP/2) handshake within ``timeout_s``, as a Ray GCS
    and a Ray Client server do. True without trying when Ray runs with TLS (``RAY_USE_TLS``): a plaintext
    handshake cannot tell those apart."""
    import grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true", "yes"):
        return True
    # Through an HTTP proxy only where Ray's own channels go through one (RAY_grpc_enable_http_proxy).
    proxy = int(os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true"))
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                                    options=[("grpc.enable_http_proxy", proxy)])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def local_run_token(env) -> bool:
    """Token auth for a local Ray started for one run, unless the user chose a mode (``RAY_AUTH_MODE``) or token.

    Left to itself, a new local Ray turns token auth on, warns about it on stderr and writes a token to
    ``~/.ray/auth_token``, which later ``ray`` commands then pick up. Setting the mode and a random token
    in the environment (inherited by the Ray processes started here, read by no one else) keeps the
    protection and drops the warning and the file.

    Returns whether it set them.
    """
    import secrets

    if "RAY_AUTH_MODE" in env or "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env:
        return False
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    return True


def _reload_ray_config() -> None:
    """Make this process see a ``RAY_AUTH_MODE`` set after ``ray`` was imported (Ray reads it once, at import;
    its own default-on path reloads the same way)."""
    from ray._raylet import Config

    Config.initialize("")


def autoscaler_running() -> bool:
    """Whether an autoscaler (``ray up`` or KubeRay with autoscaling) can still add nodes to this cluster.

    Autoscaler v2 (``ray up``'s default since Ray 2.50) reports its state to the GCS. Autoscaler v1
    (``RAY_UP_enable_autoscaler_v2=0``, or ``ray start --head --autoscaling-config`` without
    ``RAY_enable_autoscaler_v2=1``) only writes the status ``ray status`` prints to the GCS key-value
    store. Every head without an autoscaling config runs a v1 monitor too, which only mirrors the nodes
    there are, as read-only node types named ``node_<node id>``: that one is no autoscaler.
    (A v2 monitor without an autoscaling config, on a head started with ``RAY_enable_autoscaler_v2=1``,
    reports a state too and passes for an autoscaler here; it then lists a request it cannot place as
    infeasible, which ``wait_ready`` turns into a one-line failure.)
    """
    try:
        gcs = _gcs_client()
    except Exception as exc:  # an older or locked-down cluster: assume no autoscaler
        log.debug("autoscaler state unavailable: %s", exc)
        return False
    try:
        if _cluster_status(gcs).autoscaling_state.autoscaler_state_version > 0:
            return True
    except Exception as exc:
        log.debug("autoscaler v2 state unavailable: %s", exc)
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS

        raw = gcs.internal_kv_get(DEBUG_AUTOSCALING_STATUS.encode(), None, timeout=10)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        return any(node_type != f"node_{node}" for node, node_type in (report.get("node_type_mapping") or {}).items())
    except Exception as exc:
        log.debug("autoscaler v1 status unavailable: %s", exc)
        return False


def check_resources(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> None:
    """Fail in one line, instead of waiting forever, when the cluster can never place the pool.

    A request the live nodes can never hold (``placement_shortfall``) is refused, unless an autoscaler is running
    (it may add a node that can: a GPU worker group scaled to zero, say). Ray Data is not used for the pools, so
    its 30-minute resource wait does not apply; actor start-up waits are bounded by ``ACTOR_START_TIMEOUT_S``
    (env ``VOCABTRIM_ACTOR_START_TIMEOUT``).
    """
    import ray

    validate.pool(workers, gpus_per_worker, cpus_per_worker)
    short = placement_shortfall([n["Resources"] for n in ray.nodes() if n.get("Alive")], workers, gpus_per_worker, cpus_per_worker)
    if short is None:
        return
    if autoscaler_running():
        log.warning("%s now; waiting up to %.0f s for the autoscaler to add a node", short, ACTOR_START_TIMEOUT_S)
        return
    raise UserError(short)


def placement_shortfall(nodes: list[dict], workers: int, gpus: float, cpus: float) -> str | None:
    """Why nodes with these resources (``{"CPU": n, "GPU": m, ...}`` each) can never hold ``workers`` actors of
    ``cpus`` CPUs and ``gpus`` GPUs at once (every actor of a pool must start), or None. Totals are compared, not
    what is free now: what other jobs hold is freed in time."""
    def most(resource: str) -> float:
        return max((n.get(resource, 0.0) for n in nodes), default=0.0)

    if gpus > 0 and gpus > most("GPU"):
        if most("GPU") == 0:
            return f"--gpus-per-worker {gpus:g} but the Ray cluster has no GPUs: use --gpus-per-worker 0"
        return f"--gpus-per-worker {gpus:g} but no node has more than {most('GPU'):g} GPUs"
    if cpus > most("CPU"):
        return f"--cpus-per-worker {cpus:g} but no node has more than {most('CPU'):g} CPUs"

    def holds(node: dict) -> int:  # actors one node can hold at once
        counts = [math.floor(node.get(r, 0.0) / want + 1e-9) for r, want in (("CPU", cpus), ("GPU", gpus)) if want > 0]
        return min(counts) if counts else workers

    fits = [holds(n) for n in nodes]
    if not any(fits):
        gpu_cpus = max((n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) >= gpus), default=0.0)
        return (f"--gpus-per-worker {gpus:g} with --cpus-per-worker {cpus:g}: no node has both (the nodes with {gpus:g} GPUs "
                f"have at most {gpu_cpus:g} CPUs)")
    if sum(fits) < workers:
        each = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus > 0 else "")
        # the pool's size, not --workers as typed: calibrate and train-drafter start no more workers than shards
        return (f"{workers} workers of {each} each, but the Ray cluster holds {sum(fits)} such workers at a time: use "
                f"--workers {sum(fits)} (or fewer CPUs or GPUs per worker)")
    return None


def default_cpus_per_worker(workers: int) -> float:
    """Leave room for Ray's own tasks (readers, the driver's reducer) on small machines."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.05, min(1.0, (cpus * 0.5) / max(1, workers)))


def infeasible(cpus: float, gpus: float) -> bool:
    """Whether the autoscaler (v2) reports an actor asking for ``cpus`` CPUs and ``gpus`` GPUs as
    infeasible: no node type it can launch could ever hold it. False when it says nothing (v1, no
    autoscaler, an older cluster)."""
    want = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    try:
        for request in _cluster_status().autoscaling_state.infeasible_resource_requests:  # ResourceRequest
            bundle = {k: v for k, v in request.resources_bundle.items() if k in ("CPU", "GPU") and v > 0}
            if bundle.keys() == want.keys() and all(abs(bundle[k] - want[k]) < 1e-6 for k in want):
                return True
    except Exception as exc:  # advisory only: on any surprise, keep waiting
        log.debug("autoscaler state unavailable: %s", exc)
    return False


def _gcs_client():
    import ray
    from ray._raylet import GcsClient

    return GcsClient(address=ray.get_runtime_context().gcs_address)


def _cluster_status(gcs=None):
    """The GCS's cluster status (``GetClusterStatusReply``): what autoscaler v2 reports."""
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    return GetClusterStatusReply.FromString((gcs or _gcs_client()).get_cluster_status(timeout_s=10))


def wait_ready(refs: list, what: str, timeout_s: float | None = None, shape: tuple[float, float] | None = None) -> list:
    """``ray.get`` actor start-up refs, failing in one line if they do not come up in time, or as the
    UserError an actor raised while starting, or (an actor died starting: a fault of the machine) as
    RunFailed.

    ``shape``: the actors' ``(cpus, gpus)``. While they wait to be placed, the autoscaler is asked
    every few seconds whether it can ever place them; if it says no, fail at once rather than at the
    timeout.
    """
    import ray

    def get(some: list) -> list:
        try:
            return ray.get(some)
        except ray.exceptions.RayError as exc:
            raise user_error_in(exc) or RunFailed(f"{what} failed to start: {first_line(exc)}") from exc

    timeout_s = ACTOR_START_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(
                f"{what} did not start within {timeout_s:.0f} s: the cluster cannot place them (check --workers, "
                "--gpus-per-worker, --cpus-per-worker against `ray status`), or loading their models takes longer "
                "(VOCABTRIM_ACTOR_START_TIMEOUT sets the limit)"
            )
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(POLL_S, left))
        get(ready)  # an actor that failed starting says why now, not after the others' timeout
        if pending and shape is not None and infeasible(*shape):
            cpus, gpus = shape
            raise UserError(
                f"{what} cannot be placed: the autoscaler has no node type with {cpus:g} CPUs and {gpus:g} GPUs "
                "for one actor (check --gpus-per-worker and --cpus-per-worker against the cluster's node types)"
            )
    return get(refs)


# ---------------------------------------------------------------------------------------------
# One bounded actor pool, one failure policy
# ---------------------------------------------------------------------------------------------


class StartingActor:
    """Base of actors that load models when they start. ``__init__`` runs ``_build`` and keeps a
    UserError it raises (a mismatched pair, a bad setting only the model reveals); ``pid()``, the call
    the driver waits on, raises it again, so it reaches the driver as that UserError (Ray reports an
    ``__init__`` that raised as an ActorDiedError, which does not keep the cause)."""

    def __init__(self, *args, **kwargs):
        self._startup_error: UserError | None = None
        try:
            self._build(*args, **kwargs)
        except UserError as exc:
            self._startup_error = exc

    def _build(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def pid(self) -> int:
        if self._startup_error is not None:
            raise self._startup_error
        return os.getpid()


_END = object()


def user_error_in(exc) -> UserError | None:
    """The UserError an actor raised (Ray wraps it in a RayTaskError, maybe twice), as a plain UserError
    with the actor's own message (the innermost one: a wrapper's text carries Ray's remote traceback)."""
    chain = [exc]
    while getattr(chain[-1], "cause", None) is not None and len(chain) < 4:
        chain.append(chain[-1].cause)
    for e in reversed(chain):
        if isinstance(e, validate.SettingError) and hasattr(e, "setting"):
            return validate.SettingError(e.setting, e.rule)
        if isinstance(e, UserError):
            return UserError(str(e))
    return None


class ActorPool:
    """Work items run on a fixed set of actors, ``depth`` calls in flight per actor.

    ``start()`` makes one actor; ``call(actor, item)`` submits one item and returns its ObjectRef; every actor
    has ``pid()``, which answers once it has started and raises the UserError it met starting, if any.
    ``run(items, on_result)`` feeds the items (any iterable, read lazily) and calls
    ``on_result(item, result)`` as each one finishes, in completion order.

    Failure policy (the same for every stage): a UserError raised in an actor ends the run as that
    UserError. Any other failure (the actor died, or raised: a device fault, out of memory) is a fault
    of the machine: the actor is killed and replaced by a fresh one, and every item it held is submitted
    again; an item that fails ``max_attempts`` times stops the run with ``RunFailed`` naming it.
    A replacement gets items once it has started (a UserError it meets starting ends the run, as above); one
    that dies starting is started again (``max_attempts`` starts in all); one that does not start within
    ``start_timeout_s`` (the cluster lost the node and has no room for it), or whose every start died, is
    given up, and the run goes on with the actors it has, ending with ``RunFailed`` when none is left.
    Exactly-once is the caller's (a ledger, or one atomic output per input): an item may run twice.
    """

    def __init__(self, start, call, size: int, *, depth: int = 2, max_attempts: int = 3, describe=str, actors=None,
                 start_timeout_s: float | None = None):
        """``actors``: a list of started actors to run on instead of ``size`` new ones (replacements are
        made in that same list)."""
        self._start, self._call = start, call
        self.depth, self.max_attempts, self.describe = depth, max_attempts, describe
        self.actors = actors if actors is not None else [start() for _ in range(size)]
        self.start_timeout_s = ACTOR_START_TIMEOUT_S if start_timeout_s is None else start_timeout_s
        self.replacements = 0
        self._starting: dict = {}  # pid() ObjectRef of a replacement -> (actor, deadline, its start tries)

    def replace(self, actor, *, tries: int = 1, close: bool = True) -> None:
        """Kill ``actor`` and start another in its place (its ``tries``-th start); it takes items once its ``pid()``
        has answered."""
        for i, a in enumerate(self.actors):
            if a._actor_id == actor._actor_id:
                kill_actors([a], close=close)
                self.actors[i] = self._start()
                self._starting[self.actors[i].pid.remote()] = (self.actors[i], time.monotonic() + self.start_timeout_s, tries)
                self.replacements += 1
                return

    def _started(self, ref) -> None:
        """A replacement's ``pid()`` answered: it takes items now, unless it met a UserError starting (ends the run)
        or died starting (a fault of the machine: another is started, ``max_attempts`` starts in all, then it is
        given up)."""
        import ray

        actor, _, tries = self._starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            user = user_error_in(exc)
            if user is not None:
                raise user from None
            if tries < self.max_attempts:
                log.warning("a replacement worker died starting (%s); starting another", first_line(exc))
                self.replace(actor, tries=tries + 1, close=False)
            else:
                log.warning("a replacement worker died starting %d times (%s); going on with the others", tries, first_line(exc))
                self._give_up(actor)

    def _give_up(self, actor) -> None:
        kill_actors([actor], close=False)  # it never started: nothing to close, and no answer would come
        self.actors = [a for a in self.actors if a._actor_id != actor._actor_id]

    def _overdue(self) -> None:
        """Give up replacements that did not start in time."""
        now = time.monotonic()
        for ref, (actor, deadline, _) in list(self._starting.items()):
            if now >= deadline:
                del self._starting[ref]
                log.warning("a replacement worker did not start within %.0f s (the cluster has no room for it); going on with "
                            "%d worker(s)", self.start_timeout_s, len(self.actors) - 1)
                self._give_up(actor)

    def run(self, items, on_result, describe=None) -> None:
        """``describe(item)``: how a failure message names an item (default: the pool's)."""
        import ray

        describe = describe or self.describe
        source = iter(items)
        retry: list = []  # items to submit again, before new ones
        attempts: dict[int, int] = {}  # id(item) -> failed attempts
        inflight: dict = {}  # ObjectRef -> (actor, item)
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            starting = {a._actor_id for a, _, _ in self._starting.values()}
            for actor in [a for a in self.actors if a._actor_id not in starting]:
                while sum(1 for a, _ in inflight.values() if a is actor) < self.depth:
                    if retry:
                        item = retry.pop(0)
                    elif not exhausted:
                        try:
                            item = next(source)
                        except StopIteration:
                            exhausted = True
                            return
                    else:
                        return
                    inflight[self._call(actor, item)] = (actor, item)

        fill()
        while inflight or self._starting:
            ready, _ = ray.wait([*inflight, *self._starting], num_returns=1, timeout=POLL_S if self._starting else None)
            if not ready:
                self._overdue()
                fill()
                continue
            (ref,) = ready
            if ref in self._starting:
                self._started(ref)
                fill()
                continue
            actor, item = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # a task's error, a dead actor or node, a lost result object
                user = user_error_in(exc)
                if user is not None:
                    raise user from None
                n = attempts[id(item)] = attempts.get(id(item), 0) + 1
                cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
                what = f"{type(cause).__name__}: {first_line(cause)}" if cause is not None else first_line(exc)
                held = [r for r, (a, _) in inflight.items() if a is actor]
                if n >= self.max_attempts:
                    # A worker may run the items it holds together (generate's chunks share one engine run): a
                    # failure then fails them all, and the one that failed first is not always the one at fault.
                    beside = "; ".join(describe(inflight[r][1]) for r in held)
                    beside = f" (its worker also held {beside})" if beside else ""
                    raise RunFailed(f"{describe(item)} failed {n} times{beside}, the last time with {what}") from exc
                log.info("%s failed (%s); retrying on a fresh worker", describe(item), what)
                retry.append(item)
                for r in held:  # the items the broken actor still held go again too
                    retry.append(inflight.pop(r)[1])
                if actor in self.actors:
                    self.replace(actor)
                fill()
                continue
            attempts.pop(id(item), None)
            on_result(item, result)
            fill()
        if retry or not exhausted and next(source, _END) is not _END:
            raise RunFailed(f"no worker left to run {describe(retry[0]) if retry else 'the remaining items'}: the replacements "
                            f"of failed workers did not start within {self.start_timeout_s:.0f} s (the cluster lost nodes "
                            "and has no room for them); rerun to resume once it has")

    def shutdown(self) -> None:
        starting = {a._actor_id for a, _, _ in self._starting.values()}  # not started: nothing to close
        kill_actors([a for a in self.actors if a._actor_id in starting], close=False)
        kill_actors([a for a in self.actors if a._actor_id not in starting])
        self.actors, self._starting = [], {}


def close_engine(engine) -> None:
    """Close ``engine`` when it holds something to close (a vLLM engine's processes and socket files); an
    actor's ``close()`` calls this before ``kill_actors`` kills it. ``None`` (no engine yet) and engines
    without ``close`` are left as they are."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


CLOSE_TIMEOUT_S = 30.0  # how long kill_actors lets actors close what they hold (vLLM engines) before killing them


def kill_actors(actors, *, close: bool = True) -> None:
    """Kill these actors for good (no restart); ones already gone are skipped. With ``close``, actors with a
    ``close()`` method (those holding a vLLM engine) are asked to close first, for ``CLOSE_TIMEOUT_S`` at most:
    ``ray.kill`` ends a process without its exit handlers. Not while a stop (Ctrl-C, SIGTERM: a KeyboardInterrupt)
    unwinds the run: a stopped run's actors are killed at once (Ray kills an actor's child processes, a vLLM
    engine's with them)."""
    import ray

    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
        close = False
    closing = []
    for a in actors if close else ():
        try:
            closing.append(a.close.remote())
        except AttributeError:  # no close(): nothing to close
            pass
        except Exception:  # already gone
            pass
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already gone
            pass
