"""Starting or joining Ray, and refusing resource requests a cluster can never meet."""

from __future__ import annotations

import logging
import os

from vocabtrim.errors import UserError

log = logging.getLogger(__name__)


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


def check_resources(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> None:
    """Fail in one line, instead of waiting forever, when the cluster can never place the pool."""
    import ray

    total = ray.cluster_resources()
    if gpus_per_worker > 0:
        gpus = total.get("GPU", 0)
        if gpus <= 0:
            raise UserError(f"--gpus-per-worker {gpus_per_worker} but the Ray cluster has no GPUs: use --gpus-per-worker 0")
        if gpus_per_worker > gpus:
            raise UserError(f"--gpus-per-worker {gpus_per_worker} exceeds the cluster's {gpus:g} GPUs")
    cpus = total.get("CPU", 0)
    if cpus_per_worker > cpus:
        raise UserError(f"--cpus-per-worker {cpus_per_worker} exceeds the cluster's {cpus:g} CPUs")


def default_cpus_per_worker(workers: int) -> float:
    """Leave room for Ray's own tasks (readers, the driver's reducer) on small machines."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.05, min(1.0, (cpus * 0.5) / max(1, workers)))
