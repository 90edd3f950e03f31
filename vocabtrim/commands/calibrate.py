"""``vocabtrim calibrate``: flags → ``CalibrateConfig`` → ``run_calibrate``, then a short summary."""

from __future__ import annotations

import argparse

from vocabtrim.chat import HELP, MODES
from vocabtrim.commands.common import add_model_arguments, add_ray_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, target=False, drafter_required=True)
    parser.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="files, folders or globs: .parquet, .jsonl, .txt")
    parser.add_argument("--text-column", default="text", help="the text column (Parquet, Arrow) or key (JSONL); rows used as prompts may hold {role, content} message lists instead")
    parser.add_argument(
        "--source", choices=("corpus", "drafter", "target"), default="corpus",
        help="count the corpus's tokens, or the tokens the drafter / target generates from corpus rows as prompts",
    )
    parser.add_argument("--target", default=None, help="the target model, for --source target (default with --drafter-layers: the full --drafter)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (generated sources)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for generated sources (0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="row seeds derive from it and each row's position")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per encode / generate call (default: 1024 corpus, 16 generated)")
    parser.add_argument("--engine", choices=["native", "vllm"], default="native",
                        help="generated sources: the engine that generates (vllm: `pip install 'vocabtrim[vllm]'`)")
    parser.add_argument("--chat-template", choices=MODES, default="auto", help=f"generated sources: {HELP}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    add_ray_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (a rerun into it resumes)")


def config_from_args(args) -> "CalibrateConfig":  # noqa: F821 (imported lazily: keeps `--help` fast)
    from vocabtrim.calibrate import CalibrateConfig

    return CalibrateConfig(
        drafter=args.drafter,
        drafter_layers=args.drafter_layers,
        corpus=list(args.corpus),
        text_column=args.text_column,
        source=args.source,
        target=args.target,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        address=args.address,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        show_progress=not args.no_progress,
        chat_template=args.chat_template,
        engine=args.engine,
        out=args.out,
    )


def main(args) -> int:
    from vocabtrim import storage
    from vocabtrim.calibrate import run_calibrate

    m = run_calibrate(config_from_args(args))
    out = storage.display(args.out).rstrip("/")
    rate = f"{m['tokens_per_second']:,.0f} tokens/s" if m["tokens_per_second"] else "nothing left to count"
    print(
        f"{m['total_tokens']:,} tokens ({m['distinct_tokens']:,} distinct ids) from {m['rows']:,} rows in {m['shards']} shards "
        f"({m['shards_counted']} counted, {m['shards_resumed']} resumed); {rate}; {m['wall_seconds']:.1f} s\n"
        f"wrote {out}/histogram.parquet and {out}/manifest.json"
    )
    return 0
