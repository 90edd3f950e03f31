"""``vocabtrim demo``: calibrate, build a head and generate on the bundled model, then print one table."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vocabtrim.demo import DemoConfig

    full, quick = DemoConfig(), DemoConfig.quick()

    def sizes(field: str) -> str:
        a, b = getattr(full, field), getattr(quick, field)
        return f"(default {a}" + (f"; --quick: {b})" if a != b else ")")

    parser.add_argument("--quick", action="store_true", help="CI sizes: a few prompts and tokens (under 2 minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="working folder, kept at the end (default: a temporary folder, deleted at the end)")
    parser.add_argument("--model", default=full.model, help="target model; the drafter is its first --drafter-layers layers")
    parser.add_argument("--drafter-layers", type=int, default=None, help=f"layers of the drafter {sizes('drafter_layers')}")
    parser.add_argument("--eagle3", default=None, metavar="DRAFTER",
                        help="an EAGLE-3 drafter of the target, shown as a fourth setting; 'none' leaves it out (default: "
                             + (f"{full.eagle3} with the default --model, none with another)" if full.eagle3 else "none)"))
    parser.add_argument("--top-k", type=int, default=None, help=f"kept ids in the trimmed head {sizes('top_k')}")
    parser.add_argument("--gamma", default=None, help=f"draft tokens per step: auto or a number {sizes('gamma')}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"rows decoded together {sizes('batch_size')}")
    parser.add_argument("--eval-prompts", type=int, default=None, help=f"prompts to generate for {sizes('eval_prompts')}")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"tokens per evaluation prompt {sizes('max_new_tokens')}")
    parser.add_argument("--rounds", type=int, default=None, help=f"the evaluation prompts in this many rounds, the settings interleaved in each {sizes('rounds')}")
    parser.add_argument("--temperature", type=float, default=None, help=f"0: greedy, outputs comparable row by row {sizes('temperature')}")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")


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
            "rounds": args.rounds,
        }.items()
        if v is not None
    }
    if args.eagle3 is not None:
        eagle3 = None if args.eagle3.lower() == "none" else args.eagle3
    else:
        eagle3 = DemoConfig.eagle3 if args.model == DemoConfig.model else None
    common = dict(out=args.out, model=args.model, eagle3=eagle3, address=args.address, progress=not args.no_progress)
    cfg = DemoConfig.quick(**common, **overrides) if args.quick else DemoConfig(**common, **overrides)
    run_demo(cfg)
    return 0
