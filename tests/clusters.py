"""Shared by the tests that start Ray clusters of their own (test_cluster.py, test_autoscale.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def local_cluster_module():
    """``cluster/local_cluster.py`` (a script, not part of the package), imported once."""
    name = "vocabtrim_local_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftover_pids(lc, cluster) -> list[int]:
    """Processes of a stopped cluster still running: marked with its temp dir, or its node pids."""
    return [p.pid for p in lc._marked(cluster.temp_dir)] + [pid for pid in cluster.node_pids if running(pid)]
