"""``vocabtrim demo``: calibrate, build a head and generate on the bundled model, then print one table."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI sizes: a few prompts and tokens (under 2 minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="working folder (default: a new temporary folder)")
    parser.add_argument("--model", default="smollm2-135m", help="target model; the drafter is its first --drafter-layers layers")
    parser.add_argument("--drafter-layers", type=int, default=None, help="default 4")
    parser.add_argument("--top-k", type=int, default=None, help="kept ids in the trimmed head (default 8192)")
    parser.add_argument("--gamma", type=int, default=None, help="draft tokens per step")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-prompts", type=int, default=None, help="prompts to generate for")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="default 0 (greedy: outputs comparable row by row)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    from vocabtrim.demo import DemoConfig, run_demo

    overrides = {
        k: v
        for k, v in {
            "drafter_layers": args.drafter_layers,
            "top_k": args.top_k,
            "gamma": args.gamma,
            "batch_size": args.batch_size,
            "eval_prompts": args.eval_prompts,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
        }.items()
        if v is not None
    }
    common = dict(out=args.out, model=args.model, address=args.address, progress=not args.no_progress)
    cfg = DemoConfig.quick(**common, **overrides) if args.quick else DemoConfig(**common, **overrides)
    run_demo(cfg)
    return 0
