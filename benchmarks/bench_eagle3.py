"""Greedy acceptance and speed of an EAGLE-3 drafter against the target alone, side by side.

    python benchmarks/bench_eagle3.py --drafter smollm2-135m-eagle3 [--target smollm2-135m]
        [--prompts vocabtrim/data/prompts.parquet] [--rows 32] [--max-new-tokens 48] [--gamma 3]
        [--batch-size 1 8] [--threads 1]

Prompts: the ``messages`` column with the chat template applied (the shipped prompts: none of them
was a training prompt of the bundled drafter). Greedy; every completion is checked against the
target's own. Prints one table: acceptance per draft (accepted / proposed), acceptance by draft
position, tokens per target pass, tokens/s inside the engine, speedup.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--prompts", default="vocabtrim/data/prompts.parquet")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--skip", type=int, default=0, help="start at this row of the prompts file")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from vocabtrim.special_tokens import eos_ids, of_model
    from vocabtrim.engine import make_engine
    from vocabtrim.models import load_pair

    torch.set_num_threads(args.threads)
    pair = load_pair(args.target, args.drafter, dtype="float32", device="cpu")
    tok = pair.tokenizer
    table = pq.read_table(args.prompts)
    rows = table.slice(args.skip, args.rows).to_pylist()
    prompts = []
    for r in rows:
        ids = tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        prompts.append(ids[0].tolist())
    eos = tuple(eos_ids(tok, of_model(pair.target)))
    seeds = list(range(len(prompts)))
    print(f"target {args.target}, drafter {args.drafter} (draft vocabulary {pair.drafter.config.draft_vocab_size:,}), "
          f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy, gamma {args.gamma}, {args.threads} thread(s)")
    header = f"{'batch':>5}  {'setting':<14} {'accept/draft':>12} {'by position':>22} {'tok/pass':>8} {'tok/s':>7} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    for bs in args.batch_size:
        common = dict(batch_size=bs, max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
        runs = {}
        for name, drafter, extra in (("target alone", None, {}), ("eagle-3", pair.drafter, {"gamma": args.gamma})):
            engine = make_engine(pair.target, drafter, **common, **extra)
            engine.generate(prompts[:2], seeds[:2])  # warm-up
            t0 = time.perf_counter()
            outs = engine.generate(prompts, seeds)
            dt = time.perf_counter() - t0
            runs[name] = (outs, dt, engine.last_stats)
        base_outs, base_dt, _ = runs["target alone"]
        base_tps = sum(len(o.token_ids) for o in base_outs) / base_dt
        for name, (outs, dt, stats) in runs.items():
            tokens = sum(len(o.token_ids) for o in outs)
            proposed = sum(o.proposed for o in outs)
            accepted = sum(o.accepted for o in outs)
            hist = [sum(o.accepted_hist[j] for o in outs) for j in range(len(outs[0].accepted_hist))]
            steps = sum(hist)
            # P(draft i accepted) = steps accepting at least i drafts / steps
            by_pos = [sum(hist[j:]) / steps for j in range(1, len(hist))] if name != "target alone" and steps else []
            passes = sum(o.target_passes for o in outs)
            acc = f"{accepted / proposed:.3f}" if proposed else "-"
            pos_s = " ".join(f"{p:.2f}" for p in by_pos) or "-"
            print(f"{bs:>5}  {name:<14} {acc:>12} {pos_s:>22} {tokens / passes:>8.2f} {tokens / dt:>7.1f} {tokens / dt / base_tps:>6.2f}x")
        same = sum(a.token_ids == b.token_ids for a, b in zip(runs["eagle-3"][0], base_outs))
        print(f"{'':>5}  greedy completions identical to the target's: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
