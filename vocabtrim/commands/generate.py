"""``vocabtrim generate``: flags → ``GenerateConfig`` → ``run_generate``, then a short summary table."""

from __future__ import annotations

import argparse

from vocabtrim.chat import HELP, MODES
from vocabtrim.commands.common import add_model_arguments, add_ray_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, target=True)
    parser.add_argument("--head", default=None, help="trimmed drafter head folder from `vocabtrim build-head` (a path or a URI such as s3://bucket/head)")
    parser.add_argument("--prompts", nargs="+", required=True, metavar="PATH", help="Parquet files, folders or globs: local paths or URIs (s3://, gs://, file://, ...)")
    parser.add_argument("--prompt-column", default="prompt", help="a string, or a list of {role, content} messages (chat template applied)")
    parser.add_argument("--chat-template", choices=MODES, default="auto", help=HELP)
    parser.add_argument("--id-column", default="id", help="carried to the output; absent: an id from file name and row number")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per row at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=0, help="row seeds derive from it and each row's id")
    parser.add_argument("--gamma", default="auto", help="draft tokens per step: 'auto' (each step the gamma in 0..--max-gamma with the "
                        "most expected tokens per second, 0 = target alone) or a fixed number")
    parser.add_argument("--max-gamma", type=int, default=6, help="the largest gamma --gamma auto may pick")
    parser.add_argument("--sampler", choices=["gumbel", "rejection"], default="gumbel",
                        help="gumbel: drafter-invariant coupling (a completion depends only on target, prompt, settings and seed); "
                        "rejection: the optimal-acceptance rule min(1, p/q) with residual resampling")
    parser.add_argument("--compile", action="store_true", help="run the decode and verify steps through torch.compile at fixed shapes (compiles about 40 s once; on CPU about 1.2x eager at batch 1: see the README)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows in flight on a worker (continuous batching: a finished row's slot is refilled at once)")
    parser.add_argument("--no-draft", action="store_true", help="target alone, same batching: the baseline")
    parser.add_argument("--engine", choices=["native", "vllm"], default="native",
                        help="native: vocabtrim's engine; vllm: vLLM (`pip install 'vocabtrim[vllm]'`), --drafter also takes ngram")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    add_ray_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder, a path or a URI such as s3://bucket/out (a rerun with the same settings resumes)")


def config_from_args(args) -> "GenerateConfig":  # noqa: F821 (imported lazily: keeps `--help` fast)
    from vocabtrim.generate import GenerateConfig

    return GenerateConfig(
        target=args.target,
        drafter=args.drafter,
        drafter_layers=args.drafter_layers,
        head=args.head,
        no_draft=args.no_draft,
        prompts=list(args.prompts),
        prompt_column=args.prompt_column,
        chat_template=args.chat_template,
        id_column=args.id_column,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        gamma=args.gamma,
        max_gamma=args.max_gamma,
        sampler=args.sampler,
        compile=args.compile,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        out=args.out,
        engine=args.engine,
    )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(s: dict) -> str:
    """A few lines for the terminal; everything else is in summary.json."""
    rows = [
        ("files", f"{s['files']} ({s['files_generated']} generated, {s['files_resumed']} already done)"),
        ("rows", f"{s['rows']} ({s['errored_rows']} errors)"),
        ("generated tokens", str(s["generated_tokens"])),
        ("acceptance rate", _fmt(s["acceptance_rate"], ".3f")),
        ("tokens per target pass", _fmt(s["tokens_per_target_pass"], ".2f")),
        ("batch occupancy", _fmt(s.get("batch_occupancy"), ".2f")),
        ("drafter step ms", _fmt(s["drafter_step_ms"], ".1f")),
        ("tokens/s, whole run", _fmt(s["tokens_per_second"], ".1f") + "  (this run's tokens / wall seconds: Ray start and model loading included)"),
        ("tokens/s, engine", _fmt(s["tokens_per_engine_second"], ".1f") + "  (decoding only: all outputs' tokens / engine seconds)"),
        ("wall seconds", _fmt(s["wall_seconds"], ".1f")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(args) -> int:
    from vocabtrim import storage
    from vocabtrim.generate import SUMMARY_FILE, run_generate

    cfg = config_from_args(args)
    summary = run_generate(cfg)
    print(summary_table(summary))
    print(f"outputs and {SUMMARY_FILE} in {storage.display(cfg.out)}")
    return 0
