"""``vocabtrim sweep``: flags → ``SweepConfig`` → ``run_sweep``, then where the results are."""

from __future__ import annotations

import argparse

from vocabtrim.commands.common import add_model_arguments, add_ray_arguments

DEFAULT_SOURCES = "corpus,drafter,target"
EAGLE3_SOURCES = "corpus,target"  # an EAGLE-3 drafter cannot generate alone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, target=True)
    parser.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                        help="calibration corpus: files, folders or globs (.parquet, .jsonl, .txt); its rows are also the "
                             "prompts for the drafter/target sources")
    parser.add_argument("--text-column", default="text", help="the corpus's text column (Parquet) or key (JSONL)")
    parser.add_argument("--prompts", nargs="+", required=True, metavar="PATH", help="evaluation prompts: Parquet files, folders or globs")
    parser.add_argument("--prompt-column", default="prompt", help="a string, or a list of {role, content} messages")
    parser.add_argument("--id-column", default="id", help="the prompts' id column")
    parser.add_argument("--k", default=None,
                        help="kept head rows to sweep, comma-separated; 'full' = the whole head (default: 1024 to 16384 "
                             "in doublings, those up to the drafter's vocabulary (an EAGLE-3 drafter's draft vocabulary), "
                             "and full)")
    parser.add_argument("--sources", default=None,
                        help=f"calibration sources, comma-separated (default {DEFAULT_SOURCES}; {EAGLE3_SOURCES} for an EAGLE-3 drafter)")
    parser.add_argument("--calib-max-new-tokens", type=int, default=64, help="tokens generated per corpus row (drafter/target sources)")
    parser.add_argument("--calib-temperature", type=float, default=None, help="temperature for generated sources (default: --temperature)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per evaluation prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="evaluation temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="row seeds derive from it")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--batch-size", type=int, default=8, help="rows decoded together on a worker")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    add_ray_arguments(parser)
    parser.add_argument("--out", required=True, help="sweep folder (a rerun with the same settings reuses finished cells)")


def config_from_args(args) -> "SweepConfig":  # noqa: F821 (imported lazily: keeps `--help` fast)
    from vocabtrim.models import is_eagle3
    from vocabtrim.sweep import SweepConfig, parse_k, parse_sources

    sources = args.sources if args.sources is not None else (EAGLE3_SOURCES if is_eagle3(args.drafter) else DEFAULT_SOURCES)

    return SweepConfig(
        target=args.target,
        drafter=args.drafter,
        drafter_layers=args.drafter_layers,
        corpus=list(args.corpus),
        text_column=args.text_column,
        prompts=list(args.prompts),
        prompt_column=args.prompt_column,
        id_column=args.id_column,
        k=parse_k(args.k) if args.k is not None else None,
        sources=parse_sources(sources),
        calib_max_new_tokens=args.calib_max_new_tokens,
        calib_temperature=args.calib_temperature,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        gamma=args.gamma,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        out=args.out,
    )


def main(args) -> int:
    import sys

    from vocabtrim import storage
    from vocabtrim.sweep import run_sweep

    result = run_sweep(config_from_args(args))
    print(f"{result['cells']} cells ({result['failed']} failed) in {result['wall_seconds']:.0f} s")
    print(f"results: {storage.display(result['results'])}")
    print(f"report:  {storage.display(result['report'])}")
    if result["failed"]:
        print(f"vocabtrim sweep: {result['failed']} cell(s) failed (see report.md); rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
