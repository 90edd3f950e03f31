"""Flags shared by several commands."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "bfloat16", "float16")  # the names models.resolve_dtype takes


def add_ray_arguments(parser: argparse.ArgumentParser, *, workers: int = 1) -> None:
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--workers", type=int, default=workers, help="actors in the pool")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (0: CPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per actor (default: fits the pool)")


def add_model_arguments(parser: argparse.ArgumentParser, *, target: bool, drafter_required: bool = False) -> None:
    if target:
        parser.add_argument("--target", required=True, help="model folder, hub id, .gguf file or smollm2-135m")
    if drafter_required:
        drafter_help = "drafter model: folder, hub id, .gguf file or smollm2-135m (with --drafter-layers N: its first N layers)"
    else:
        drafter_help = "drafter model (default with --drafter-layers: the target)"
    parser.add_argument("--drafter", default=None, required=drafter_required, help=drafter_help)
    parser.add_argument("--drafter-layers", type=int, default=None, help="drafter = first N layers + final norm + head")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder (off by default)")
