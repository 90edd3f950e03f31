"""``vocabtrim build-head``: flags → ``BuildHeadConfig`` → ``build_head``, then a one-line summary."""

from __future__ import annotations

import argparse
import sys

from vocabtrim.commands.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--histogram", required=True, metavar="DIR", help="a folder written by `vocabtrim calibrate` (a path or a URI such as s3://bucket/calib)")
    add_model_arguments(parser, target=False, drafter_required=True)
    parser.add_argument("--target", default=None, help="the target the drafter serves: an EAGLE-3 drafter's tokenizer when its folder has none; "
                        "for a causal drafter, checked to share its tokenizer and logits width")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--top-k", type=int, default=None, metavar="K", help="keep K ids (special tokens included)")
    size.add_argument("--coverage", type=float, default=None, metavar="C", help="keep the fewest ids covering C of the counted tokens, C in (0, 1]")
    parser.add_argument("--export", default="", metavar="sglang,eagle,specforge",
                        help="also write an SGLang token map, EAGLE-3 d2t/t2d (safetensors) and/or SpecForge's torch.save'd {d2t, t2d}")
    parser.add_argument("--out", required=True, metavar="HEAD_DIR", help="output folder (a path or a URI such as s3://bucket/head)")
    parser.add_argument("--address", default=None, help="accepted, as every command takes it; build-head starts no Ray work "
                        "(it runs in this process), so it joins no cluster")
    parser.set_defaults(uses_ray=False)  # so the CLI does not check the address (nor RAY_ADDRESS)


def config_from_args(args) -> "BuildHeadConfig":  # noqa: F821
    from vocabtrim.head.build import BuildHeadConfig

    return BuildHeadConfig(
        histogram=args.histogram,
        drafter=args.drafter,
        drafter_layers=args.drafter_layers,
        top_k=args.top_k,
        coverage=args.coverage,
        export=[e.strip() for e in args.export.split(",") if e.strip()],
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        target=args.target,
        out=args.out,
    )


def main(args) -> int:
    from vocabtrim import storage
    from vocabtrim.head.build import build_head
    from vocabtrim.head.select import describe_kept, unseen_warning

    m = build_head(config_from_args(args))
    main_files = ["config.json", "model.safetensors"] if m["kind"] == "vocabtrim-eagle3-head" else ["head.safetensors"]
    files = ", ".join([*main_files, "manifest.json", m["plot"], *m["exports"].values()])
    warning = unseen_warning(m)
    if warning:
        print(f"vocabtrim build-head: warning: {warning}", file=sys.stderr)
    print(f"{describe_kept(m)}\nwrote {storage.display(args.out).rstrip('/')}/: {files}")
    return 0
