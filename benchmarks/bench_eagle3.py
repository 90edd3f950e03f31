"""Acceptance and speed of an EAGLE-3 drafter against the target alone, side by side, interleaved.

    python benchmarks/bench_eagle3.py --drafter smollm2-135m-eagle3 [--target smollm2-135m]
        [--prompts vocabtrim/data/prompts.parquet] [--rows 32] [--skip 0] [--kinds chat code ...]
        [--max-new-tokens 48] [--gamma 3|auto] [--temperature 0] [--batch-size 1 8] [--rounds 3] [--full-head]
        [--threads 1]

Prompts: the ``messages`` column with the chat template applied (the shipped prompts: none of them
was a training prompt of the bundled drafter), optionally only some ``kind``s. Greedy unless
``--temperature`` says otherwise; every completion is checked against the target's own (at any temperature
the reproducible sampler gives the target alone's completion for the same seed). The prompts are cut into
``--rounds`` consecutive parts; each round runs every setting on its part, in an order rotated from round to
round, so drift in the machine's speed hits every setting alike. Settings: the target alone, the drafter with its own (trimmed) draft
vocabulary and, with ``--full-head``, the same drafter with a full-vocabulary head (``eagle3.widen``: its
own rows at its draft ids, the target's LM-head rows elsewhere).

Prints one table per batch size: acceptance per draft (accepted / proposed), P(draft i accepted) by
position, tokens per target pass, tokens/s inside the engine over all rounds, the speedup over all rounds
and its range over the rounds (each round's ratio to the target alone in that round); then the trimmed
vs full-head ratio within each round, and acceptance per draft by prompt kind.
"""

from __future__ import annotations

import argparse
import time


def _span(values: list[float], spec: str = ".2f") -> str:
    if not values:
        return "-"
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}–{hi}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--prompts", default="vocabtrim/data/prompts.parquet")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--skip", type=int, default=0, help="start at this row of the (kind-filtered) prompts")
    ap.add_argument("--kinds", nargs="+", default=None, help="only prompts of these kinds (the prompts file's kind column)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", default="3", help="draft tokens per step, or auto (the engine's adaptive gamma)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--full-head", action="store_true", help="also the same drafter with a full-vocabulary head")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from vocabtrim import eagle3 as e3
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.models import load_pair
    from vocabtrim.special_tokens import eos_ids, of_model

    torch.set_num_threads(args.threads)
    pair = load_pair(args.target, args.drafter, dtype="float32", device="cpu")
    tok = pair.tokenizer
    rows = pq.read_table(args.prompts).to_pylist()
    if args.kinds:
        rows = [r for r in rows if r.get("kind") in set(args.kinds)]
    rows = rows[args.skip : args.skip + args.rows]
    prompts, kinds = [], []
    for r in rows:
        ids = tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        prompts.append(ids[0].tolist())
        kinds.append(r.get("kind", "-"))
    eos = tuple(eos_ids(tok, of_model(pair.target)))
    seeds = list(range(len(prompts)))
    gamma = None if args.gamma == "auto" else int(args.gamma)
    drafters = {"target alone": (None, {}), "eagle-3": (pair.drafter, {"gamma": gamma})}
    if args.full_head:
        drafters["eagle-3 full head"] = (e3.widen(pair.drafter, pair.target.get_output_embeddings().weight), {"gamma": gamma})
    rounds = max(1, min(args.rounds, len(prompts)))
    bounds = [len(prompts) * r // rounds for r in range(rounds + 1)]
    K = pair.drafter.config.draft_vocab_size
    print(f"target {args.target}, drafter {args.drafter} (draft vocabulary {K:,}), {len(prompts)} prompts "
          f"({', '.join(sorted(set(kinds)))}), {args.max_new_tokens} new tokens, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature:g}'}, gamma {args.gamma}, "
          f"{args.threads} thread(s), {rounds} interleaved rounds")
    header = (f"{'batch':>5}  {'setting':<18} {'accept/draft':>12} {'by position':>16} {'tok/pass':>8} {'tok/s':>7} "
              f"{'speedup':>7} {'by round':>11}")
    names = list(drafters)
    for bs in args.batch_size:
        print()
        print(header)
        print("-" * len(header))
        engines = {}
        for name, (drafter, extra) in drafters.items():
            engines[name] = make_engine(pair.target, drafter, sampling=SamplingParams(temperature=args.temperature), batch_size=bs,
                                        max_new_tokens=args.max_new_tokens, eos_token_ids=eos, **extra)
            engines[name].generate(prompts[:2], seeds[:2])  # warm-up
        outs = {n: [] for n in names}
        seconds = {n: [] for n in names}
        tokens = {n: [] for n in names}
        for r in range(rounds):
            part = slice(bounds[r], bounds[r + 1])
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                got = engines[name].generate(prompts[part], seeds[part])
                seconds[name].append(time.perf_counter() - t0)
                tokens[name].append(sum(len(o.token_ids) for o in got))
                outs[name].extend(got)
        base = sum(tokens["target alone"]) / sum(seconds["target alone"])
        base_round = [t / s for t, s in zip(tokens["target alone"], seconds["target alone"])]
        per_round = {}
        for name in names:
            o = outs[name]
            proposed = sum(x.proposed for x in o)
            accepted = sum(x.accepted for x in o)
            hist = [sum(x.accepted_hist[j] for x in o) for j in range(len(o[0].accepted_hist))]
            steps = sum(hist)
            by_pos = [sum(hist[j:]) / steps for j in range(1, len(hist))] if name != "target alone" and steps else []
            passes = sum(x.target_passes for x in o)
            tps = sum(tokens[name]) / sum(seconds[name])
            per_round[name] = [t / s for t, s in zip(tokens[name], seconds[name])]
            ratios = [a / b for a, b in zip(per_round[name], base_round)]
            acc = f"{accepted / proposed:.3f}" if proposed else "-"
            pos_s = " ".join(f"{p:.2f}" for p in by_pos) or "-"
            print(f"{bs:>5}  {name:<18} {acc:>12} {pos_s:>16} {sum(tokens[name]) / passes:>8.2f} {tps:>7.1f} "
                  f"{tps / base:>6.2f}x {_span(ratios) + 'x':>11}")
        for name in names[1:]:
            same = sum(a.token_ids == b.token_ids for a, b in zip(outs[name], outs["target alone"]))
            print(f"{'':>5}  {name}: completions identical to the target's: {same}/{len(prompts)}")
        if "eagle-3 full head" in names:
            ratio = [t / f for t, f in zip(per_round["eagle-3"], per_round["eagle-3 full head"])]
            acc = {n: sum(x.accepted for x in outs[n]) / max(1, sum(x.proposed for x in outs[n])) for n in ("eagle-3", "eagle-3 full head")}
            loss = f"{1 - acc['eagle-3'] / acc['eagle-3 full head']:+.1%} lost" if acc["eagle-3 full head"] else "none accepted"
            print(f"{'':>5}  trimmed ({K:,}) vs full head ({pair.target.config.vocab_size:,}): tokens/s {_span(ratio)}x within each round; "
                  f"acceptance {acc['eagle-3']:.3f} vs {acc['eagle-3 full head']:.3f} ({loss})")
        by_kind = {}
        for x, k in zip(outs["eagle-3"], kinds):
            a, p = by_kind.get(k, (0, 0))
            by_kind[k] = (a + x.accepted, p + x.proposed)
        print(f"{'':>5}  eagle-3 acceptance per draft by kind: "
              + ", ".join(f"{k} {a / p:.3f}" if p else f"{k} -" for k, (a, p) in sorted(by_kind.items())))


if __name__ == "__main__":
    main()
