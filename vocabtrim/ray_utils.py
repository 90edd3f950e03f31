"""Starting or joining Ray, and refusing resource requests a cluster can never meet."""

from __future__ import annotations

import json
import logging
import os

from vocabtrim.errors import UserError

log = logging.getLogger(__name__)

# How long to wait for an actor pool to start (model loads included) before failing in one line.
ACTOR_START_TIMEOUT_S = float(os.environ.get("VOCABTRIM_ACTOR_START_TIMEOUT", "900"))


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray for this run. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0]}") from exc


def largest_node(resource: str) -> float:
    """The most of ``resource`` that any one live node has (an actor cannot span nodes)."""
    import ray

    return max((n["Resources"].get(resource, 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def autoscaler_running() -> bool:
    """Whether an autoscaler (``ray up`` or KubeRay with autoscaling) can still add nodes to this cluster.

    Autoscaler v2 (``ray up``'s default since Ray 2.50) reports its state to the GCS. Autoscaler v1
    (``RAY_UP_enable_autoscaler_v2=0``, or ``ray start --head --autoscaling-config`` without
    ``RAY_enable_autoscaler_v2=1``) only writes the status ``ray status`` prints to the GCS key-value
    store. Every head without an autoscaling config runs a v1 monitor too, which only mirrors the nodes
    there are, as read-only node types named ``node_<node id>``: that one is no autoscaler.
    (A v2 monitor without an autoscaling config, on a head started with ``RAY_enable_autoscaler_v2=1``,
    reports a state too and is not told apart here.)
    """
    import ray

    try:
        from ray._raylet import GcsClient

        gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
    except Exception as exc:  # an older or locked-down cluster: assume no autoscaler
        log.debug("autoscaler state unavailable: %s", exc)
        return False
    try:
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply.FromString(gcs.get_cluster_status(timeout_s=10))
        if reply.autoscaling_state.autoscaler_state_version > 0:
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
    """Fail in one line, instead of waiting forever, when the cluster can never place one actor.

    A request no live node can hold is refused, unless an autoscaler is running (it may add a node
    that can: a GPU worker group scaled to zero, say). Ray Data is not used for the pools, so its
    30-minute resource wait does not apply; actor start-up waits are bounded by
    ``ACTOR_START_TIMEOUT_S`` (env ``VOCABTRIM_ACTOR_START_TIMEOUT``).
    """
    if gpus_per_worker < 0 or cpus_per_worker < 0:
        raise UserError("--gpus-per-worker and --cpus-per-worker must be >= 0")
    short = []
    if gpus_per_worker > 0 and gpus_per_worker > largest_node("GPU"):
        have = largest_node("GPU")
        short.append(
            f"--gpus-per-worker {gpus_per_worker:g} but the Ray cluster has no GPUs"
            if have == 0
            else f"--gpus-per-worker {gpus_per_worker:g} but no node has more than {have:g} GPUs"
        )
    if cpus_per_worker > largest_node("CPU"):
        short.append(f"--cpus-per-worker {cpus_per_worker:g} but no node has more than {largest_node('CPU'):g} CPUs")
    if not short:
        return
    if autoscaler_running():
        log.warning("%s now; waiting up to %.0f s for the autoscaler to add a node", short[0], ACTOR_START_TIMEOUT_S)
        return
    hint = ": use --gpus-per-worker 0" if "no GPUs" in short[0] else ""
    raise UserError(short[0] + hint)


def default_cpus_per_worker(workers: int) -> float:
    """Leave room for Ray's own tasks (readers, the driver's reducer) on small machines."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.05, min(1.0, (cpus * 0.5) / max(1, workers)))


def wait_ready(refs: list, what: str, timeout_s: float | None = None) -> list:
    """``ray.get`` actor start-up refs, failing in one line if they do not come up in time."""
    import ray
    from ray.exceptions import GetTimeoutError

    timeout_s = ACTOR_START_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as exc:
        raise UserError(
            f"{what} did not start within {timeout_s:.0f} s: the cluster cannot place them "
            "(check --workers, --gpus-per-worker, --cpus-per-worker against `ray status`)"
        ) from exc
