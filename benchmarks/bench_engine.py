"""Engine benchmark on the bundled SmolLM2-135M: target alone, speculative decoding with the full and
a trimmed (K ids) drafter head, and Hugging Face assisted generation. Prints a Markdown table.

    python benchmarks/bench_engine.py                       # the README table (about 15 min on 2 cores)
    python benchmarks/bench_engine.py --quick               # a 1-minute smoke run

All runs are greedy (temperature 0) and ignore EOS, so every configuration generates exactly
``--max-new-tokens`` tokens per prompt, and each speculative output is checked token for token
against target alone ("same" column). The trimmed head keeps the K ids the target itself emits most
often on *other* prompts (calibration prompts disjoint from the evaluation prompts) plus the special
tokens. Timings are wall-clock over all evaluation prompts after a warm-up; ratios compare rows of
one run (absolute times drift between runs and machines).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from importlib import resources

import pyarrow.parquet as pq
import torch

from vocabtrim.head import head_from_ids
from vocabtrim.models import load_pair, truncate_layers
from vocabtrim.sampling import SamplingParams
from vocabtrim.speculative import SpeculativeEngine


def shipped_prompts(tokenizer) -> tuple[list[list[int]], list[str]]:
    table = pq.read_table(resources.files("vocabtrim") / "data" / "prompts.parquet")
    ids, kinds = [], []
    for row in table.to_pylist():
        ids.append(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False))
        kinds.append(row["kind"])
    return ids, kinds


def split_prompts(prompts, kinds, n_eval, n_calib):
    """Interleave kinds so both sets are varied; evaluation and calibration prompts are disjoint."""
    order = sorted(range(len(prompts)), key=lambda i: (i % 7, i))
    by_kind: dict[str, list[int]] = {}
    for i in order:
        by_kind.setdefault(kinds[i], []).append(i)
    mixed = [i for group in zip(*by_kind.values()) for i in group]
    return [prompts[i] for i in mixed[:n_eval]], [prompts[i] for i in mixed[n_eval : n_eval + n_calib]]


def run_engine(engine, prompts, batch_size):
    """Generate for all prompts in chunks; return (outputs, wall seconds, summed engine stats)."""
    outs, drafter_s, drafter_n = [], 0.0, 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        outs.extend(engine.generate(chunk, list(range(i, i + len(chunk)))))
        drafter_s += engine.last_stats.drafter_seconds
        drafter_n += engine.last_stats.drafter_forwards
    wall = time.perf_counter() - start
    return outs, wall, (1000.0 * drafter_s / drafter_n if drafter_n else None)


def summarise(name, outs, wall, drafter_ms, reference=None):
    tokens = sum(len(o.token_ids) for o in outs)
    passes = sum(o.target_passes for o in outs)
    proposed = sum(o.proposed for o in outs)
    row = {
        "config": name,
        "tokens_per_s": tokens / wall,
        "acceptance": (sum(o.accepted for o in outs) / proposed) if proposed else None,
        "tokens_per_target_pass": tokens / passes if passes else None,
        "drafter_step_ms": drafter_ms,
        "wall_s": wall,
        "tokens": tokens,
    }
    if reference is not None:
        row["same"] = all(o.token_ids == r.token_ids for o, r in zip(outs, reference))
    return row


def hf_assisted(target, drafter, prompts, max_new_tokens, pad_id):
    """Hugging Face assisted generation, batch 1 (all it supports), greedy, EOS ignored."""
    from transformers import GenerationConfig

    # eos_token_id=None: like our runs, EOS is an ordinary token and every prompt gets max_new_tokens.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    outs = []
    start = time.perf_counter()
    for p in prompts:
        x = torch.tensor([p])
        y = target.generate(x, generation_config=config, assistant_model=drafter)
        outs.append(y[0, len(p):].tolist())
    return outs, time.perf_counter() - start


def top_k_ids(counts: Counter, k: int, vocab: int, specials) -> list[int]:
    """The K most frequent ids (ties and unseen ids filled by lowest id), plus the special tokens."""
    ranked = sorted(range(vocab), key=lambda t: (-counts.get(t, 0), t))
    return sorted(set(ranked[:k]) | set(specials))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="4,8", help="drafter depths (first N layers of the target)")
    ap.add_argument("--gammas", default="3,4,5")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--batch1-gammas", default="4", help="gammas run at batch 1 (batch 1 is slow on CPU)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--calib-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face assisted generation")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.gammas, args.batch1_gammas = "4", "4", "4"
        args.prompts, args.calib_prompts, args.max_new_tokens = 4, 8, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pair = load_pair(args.model, need_drafter=False)
    target, tok = pair.target, pair.tokenizer
    vocab = target.get_output_embeddings().weight.shape[0]
    prompts, kinds = shipped_prompts(tok)
    eval_prompts, calib_prompts = split_prompts(prompts, kinds, args.prompts, args.calib_prompts)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    greedy = SamplingParams(temperature=0)

    # Calibration: what the target itself emits on other prompts (sampled, for variety).
    calib_engine = SpeculativeEngine(target, None, sampling=SamplingParams(temperature=0.7), max_new_tokens=args.max_new_tokens)
    counts: Counter = Counter()
    for i in range(0, len(calib_prompts), 8):
        for o in calib_engine.generate(calib_prompts[i : i + 8], list(range(i, i + 8))[: len(calib_prompts[i : i + 8])]):
            counts.update(o.token_ids)
    specials = [t for t in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) if t is not None]
    specials += tok.convert_tokens_to_ids(tok.all_special_tokens)
    kept = top_k_ids(counts, args.k, vocab, specials)
    print(f"# calibration: {sum(counts.values())} target tokens on {len(calib_prompts)} prompts, "
          f"{len(counts)} distinct ids; head keeps {len(kept)} ids", flush=True)

    rows = []
    warm = eval_prompts[:1]
    for b in batch_sizes:
        base = SpeculativeEngine(target, None, sampling=greedy, max_new_tokens=args.max_new_tokens)
        base.generate(warm, [0], max_new_tokens=4)
        ref, wall, _ = run_engine(base, eval_prompts, b)
        rows.append({"batch": b, **summarise("target alone", ref, wall, None)})
        print(rows[-1], flush=True)
        gammas = args.gammas if b > 1 else args.batch1_gammas
        for n in (int(x) for x in args.layers.split(",")):
            drafter = truncate_layers(target, n)
            head = head_from_ids(drafter, kept)
            for g in (int(x) for x in gammas.split(",")):
                for label, h in (("full head", None), (f"K={len(kept)} head", head)):
                    eng = SpeculativeEngine(target, drafter, h, gamma=g, sampling=greedy, max_new_tokens=args.max_new_tokens)
                    eng.generate(warm, [0], max_new_tokens=4)
                    outs, wall, dms = run_engine(eng, eval_prompts, b)
                    rows.append({"batch": b, **summarise(f"{n}-layer drafter, {label}, gamma {g}", outs, wall, dms, ref)})
                    print(rows[-1], flush=True)
            if b == 1 and not args.no_hf:
                outs, wall = hf_assisted(target, drafter, eval_prompts, args.max_new_tokens, tok.pad_token_id)
                tokens = sum(len(o) for o in outs)
                rows.append({"batch": 1, "config": f"HF assisted generation, {n}-layer drafter", "tokens_per_s": tokens / wall,
                             "acceptance": None, "tokens_per_target_pass": None, "drafter_step_ms": None, "wall_s": wall,
                             "tokens": tokens, "same": all(o == r.token_ids for o, r in zip(outs, ref))})
                print(rows[-1], flush=True)

    base_tps = {r["batch"]: r["tokens_per_s"] for r in rows if r["config"] == "target alone"}
    hf_tps = {r["config"].split(", ")[1]: r["tokens_per_s"] for r in rows if r["config"].startswith("HF")}
    fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    load = os.getloadavg()
    print()
    print(f"Load average at the end: {load[0]:.2f} (1 min), {load[2]:.2f} (15 min) on {os.cpu_count()} cores.")
    print(f"Bundled {args.model}, {args.threads} threads, greedy, {len(eval_prompts)} prompts x {args.max_new_tokens} new tokens "
          f"(EOS ignored), head K={len(kept)}.")
    print()
    print("| batch | configuration | tokens/s | × target alone | × HF assisted | acceptance | tokens / target pass | drafter step ms | same as target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layer = next((k for k in hf_tps if r["config"].startswith(k.replace("-layer drafter", "-layer"))), None)
        vs_hf = r["tokens_per_s"] / hf_tps[layer] if layer and not r["config"].startswith("HF") else None
        print(f"| {r['batch']} | {r['config']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base_tps[r['batch']]:.2f} | "
              f"{fmt(vs_hf, '.2f')} | {fmt(r['acceptance'], '.3f')} | {fmt(r['tokens_per_target_pass'], '.2f')} | "
              f"{fmt(r['drafter_step_ms'], '.1f')} | {'yes' if r.get('same', True) else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
