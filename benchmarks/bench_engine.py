"""Engine benchmark on the bundled SmolLM2-135M: the engine as it was against the new one, side by side.

    git worktree add /tmp/vocabtrim-old 5540749          # the last main with the old engine
    python benchmarks/bench_engine.py --old-tree /tmp/vocabtrim-old

Prints one Markdown table per case; every case runs its settings interleaved, ``--rounds`` times, each
setting in a fresh process (1 compute thread), and reports the range over rounds:
- ``bulk``: an EOS-terminated bulk job (the shipped chat prompts, ``--max-new-tokens`` 256, batch 8,
  greedy, target alone): the old engine (static batches of 8 length-sorted rows, as its generate
  workers ran them) against the new one (continuous batching). Tokens/s inside the engine, and the new
  engine's batch occupancy. Completions must be identical (the "same" column).
- ``auto``: the new engine, target alone against ``--gamma auto`` with the 4-layer truncated drafter
  (and its trimmed head), same prompts and batch.
- ``compile``: the new engine, eager against ``--compile``, batch 1 and 8, target alone, on 2 × batch
  prompts and at most 64 new tokens (the compile time is reported apart, not counted in tokens/s).
- ``compile-bulk``: the same at ``--batch-size`` on all ``--prompts`` × ``--max-new-tokens``, where the
  slots stay full but for the run's tail.
- ``compile-eagle3``: as ``compile`` with the shipped EAGLE-3 drafter at gamma 3, on 16 prompts
  (``--compile`` compiles the target's steps and the drafter's passes).
- ``gemm``: the new engine at ``--batch-size`` on all ``--prompts``, target alone and with the 4-layer
  drafter at gamma 4: its CPU matmuls through oneDNN with packed weights (the default) against
  ``F.linear`` (``VOCABTRIM_PACKED_GEMM=0``); then each of the model's matmul shapes alone, ms per product
  at 1, 8 and 40 rows (1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from importlib import resources

HERE = os.path.dirname(os.path.abspath(__file__))


def shipped_prompts(tokenizer, n: int) -> list[list[int]]:
    import pyarrow.parquet as pq

    table = pq.read_table(resources.files("vocabtrim") / "data" / "prompts.parquet")
    rows = table.to_pylist()[:n]
    return [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
            for r in rows]


# ---------------------------------------------------------------------------------------------
# One setting, in its own process
# ---------------------------------------------------------------------------------------------


def run_setting(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from vocabtrim.models import load_pair

    pair = load_pair("smollm2-135m", spec.get("drafter"), drafter_layers=spec.get("drafter_layers"), dtype="float32",
                     device="cpu", need_drafter=spec.get("drafter") is not None or spec.get("drafter_layers") is not None)
    tok = pair.tokenizer
    prompts = shipped_prompts(tok, spec["prompts"])
    eos = [tok.eos_token_id]
    limit = spec["max_new_tokens"]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    prompts = [prompts[i] for i in order]
    seeds = list(range(len(prompts)))
    result = {}
    if spec["engine"] == "old":
        from vocabtrim.sampling import SamplingParams
        from vocabtrim.speculative import SpeculativeEngine

        engine = SpeculativeEngine(pair.target, None, sampling=SamplingParams(temperature=0), eos_token_ids=eos,
                                   max_new_tokens=limit, pad_token_id=tok.pad_token_id)
        engine.generate(prompts[:2], seeds[:2], max_new_tokens=4)  # warm-up
        outs, start = [], time.perf_counter()
        b = spec["batch_size"]
        for i in range(0, len(prompts), b):
            outs.extend(engine.generate(prompts[i : i + b], seeds[i : i + b]))
        seconds = time.perf_counter() - start
    else:
        from vocabtrim.engine import make_engine
        from vocabtrim.engine.sampling import SamplingParams
        from vocabtrim.head.trimmed import head_from_ids

        head = None
        if spec.get("top_k") and pair.drafter is not None:
            head = head_from_ids(pair.drafter, trimmed_ids(pair, tok, spec["top_k"]))
        engine = make_engine(pair.target, pair.drafter, head, sampling=SamplingParams(temperature=0),
                             gamma=spec.get("gamma"), max_gamma=spec.get("max_gamma", 6), batch_size=spec["batch_size"],
                             eos_token_ids=tuple(eos), max_new_tokens=limit, compile=spec.get("compile", False))
        t = time.perf_counter()
        engine.generate(prompts[: spec["batch_size"]], seeds[: spec["batch_size"]], max_new_tokens=8)  # warm-up (and compile)
        result["warmup_s"] = time.perf_counter() - t
        start = time.perf_counter()
        outs = engine.generate(prompts, seeds)
        seconds = time.perf_counter() - start
        st = engine.last_stats
        result.update(occupancy=st.occupancy, gamma_hist=st.gamma_hist,
                      drafted_share=sum(st.gamma_hist[1:]) / max(1, st.target_passes) if pair.drafter is not None else None)
    tokens = sum(len(o.token_ids) for o in outs)
    proposed = sum(o.proposed for o in outs)
    result.update(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                  acceptance=sum(o.accepted for o in outs) / proposed if proposed else None,
                  completions=[o.token_ids for o in outs])
    return result


def trimmed_ids(pair, tok, k: int) -> list[int]:
    """The K ids the target emits most on the shipped prompts after the first 256 (disjoint from the
    benchmark's prompts), plus the special tokens."""
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.special_tokens import special_token_ids

    calib = shipped_prompts(tok, 320)[256:]
    engine = make_engine(pair.target, sampling=SamplingParams(temperature=0.7), batch_size=16, max_new_tokens=64,
                         eos_token_ids=(tok.eos_token_id,))
    counts = Counter(t for o in engine.generate(calib, list(range(len(calib)))) for t in o.token_ids)
    ids = [t for t, _ in counts.most_common(k)]
    ids += [i for i in range(k) if i not in counts][: max(0, k - len(ids))]  # fill with low ids (common BPE merges)
    return sorted(set(ids) | set(special_token_ids(tok)))[: max(k, len(special_token_ids(tok)))]


def gemm_shapes_table(threads: int, rows_list=(1, 8, 40), repeats: int = 30) -> str:
    """F.linear against the packed product on each distinct linear shape of the bundled model (one decoder
    layer and the LM head), ms per product."""
    import torch

    sys.path.insert(0, os.path.dirname(HERE))  # this checkout's vocabtrim, as the settings' processes use
    from vocabtrim.engine.cpu_gemm import PackedLinear
    from vocabtrim.models import load_pair

    torch.set_num_threads(threads)
    target = load_pair("smollm2-135m", dtype="float32", device="cpu", need_drafter=False).target
    shapes = {}
    for name, m in list(target.model.layers[0].named_modules()) + [("lm_head", target.get_output_embeddings())]:
        if isinstance(m, torch.nn.Linear):
            shapes.setdefault((m.in_features, m.out_features), []).append(name.split(".")[-1])

    def ms(fn):
        fn(), fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - start) / repeats

    lines = [f"### gemm, one product alone ({threads} thread)", "",
             "| layers | in → out | rows | F.linear, ms | packed, ms | speed-up |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for (i, o), names in shapes.items():
            w = torch.randn(o, i)
            packed = PackedLinear(w, None)
            for rows in rows_list:
                x = torch.randn(rows, i)
                plain, fast = ms(lambda: torch.nn.functional.linear(x, w)), ms(lambda: packed(x))
                lines.append(f"| {', '.join(names)} | {i} → {o} | {rows} | {plain:.3f} | {fast:.3f} | {plain / fast:.2f}× |")
    return "\n".join(lines)


def in_process(spec: dict, old_tree: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if spec.get("packed_gemm") is False:
        env["VOCABTRIM_PACKED_GEMM"] = "0"
    if spec["engine"] == "old":
        env["PYTHONPATH"] = old_tree
    else:
        env["PYTHONPATH"] = os.path.dirname(HERE)
    out = subprocess.run([sys.executable, __file__, "--setting", json.dumps(spec)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"setting {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Cases and the table
# ---------------------------------------------------------------------------------------------


def fmt_range(values, spec=".1f"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, spec) if abs(hi - lo) < 1e-9 else f"{format(lo, spec)}–{format(hi, spec)}"


def run_case(name: str, settings: dict[str, dict], rounds: int, old_tree: str | None, baseline: str) -> str:
    results: dict[str, list[dict]] = {k: [] for k in settings}
    for r in range(rounds):
        for label, spec in settings.items():
            results[label].append(in_process(spec, old_tree))
            print(f"[{name}] round {r + 1}: {label} {results[label][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    lines = [f"### {name}", "", "| setting | tokens/s | × " + baseline + " | acceptance | drafted steps | occupancy | same as " + baseline + " |",
             "|---|---|---|---|---|---|---|"]
    base = results[baseline]
    for label, runs in results.items():
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, base)]
        same = all(a["completions"] == b["completions"] for a, b in zip(runs, base))
        lines.append(
            f"| {label} | {fmt_range([x['tokens_per_s'] for x in runs])} | {fmt_range(ratios, '.2f')}× | "
            f"{fmt_range([x['acceptance'] for x in runs], '.3f')} | {fmt_range([x.get('drafted_share') for x in runs], '.2f')} | "
            f"{fmt_range([x.get('occupancy') for x in runs], '.2f')} | {'yes' if same else 'NO'} |"
        )
    warm = {k: [x.get("warmup_s") for x in v] for k, v in results.items() if any(x.get("warmup_s") for x in v)}
    if name.startswith("compile"):
        lines += ["", "warm-up seconds (compile included): " + "; ".join(f"{k} {fmt_range(v)}" for k, v in warm.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--old-tree", help="a checkout of the old engine (for the bulk case)")
    ap.add_argument("--cases", default=None, help="comma-separated; default auto,compile (and bulk first with --old-tree)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=8192, help="K of the trimmed head in the auto case")
    args = ap.parse_args()
    if args.setting:
        print(json.dumps(run_setting(json.loads(args.setting))))
        return
    common = dict(prompts=args.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, threads=args.threads)
    cases = (args.cases or ("bulk,auto,compile" if args.old_tree else "auto,compile")).split(",")
    print(f"SmolLM2-135M, float32, greedy, {args.prompts} shipped chat prompts, max {args.max_new_tokens} new tokens "
          f"(EOS ends a row), {args.threads} thread(s), {args.rounds} interleaved rounds; ranges over rounds.\n")
    if "bulk" in cases:
        if not args.old_tree:
            raise SystemExit("the bulk case needs --old-tree (a checkout of the old engine)")
        print(run_case("bulk", {"old engine, static batches": {**common, "engine": "old"},
                                "new engine, continuous batching": {**common, "engine": "new"}},
                       args.rounds, args.old_tree, "old engine, static batches") + "\n")
    if "auto" in cases:
        print(run_case("auto", {"target alone": {**common, "engine": "new"},
                                "4-layer drafter, gamma auto": {**common, "engine": "new", "drafter_layers": 4},
                                f"4-layer drafter + K={args.top_k} head, gamma auto": {**common, "engine": "new", "drafter_layers": 4, "top_k": args.top_k}},
                       args.rounds, None, "target alone") + "\n")
    if "compile" in cases:
        for b in (1, 8):
            small = {**common, "engine": "new", "batch_size": b, "prompts": min(args.prompts, 2 * b), "max_new_tokens": min(args.max_new_tokens, 64)}
            print(run_case("compile", {f"eager, batch {b}": small, f"--compile, batch {b}": {**small, "compile": True}},
                           args.rounds, None, f"eager, batch {b}") + "\n")
    if "compile-eagle3" in cases:
        for b in (1, 8):
            small = {**common, "engine": "new", "batch_size": b, "prompts": min(args.prompts, 16),
                     "max_new_tokens": min(args.max_new_tokens, 64), "drafter": "smollm2-135m-eagle3", "gamma": 3}
            print(run_case("compile-eagle3", {f"EAGLE-3 eager, batch {b}": small, f"EAGLE-3 --compile, batch {b}": {**small, "compile": True}},
                           args.rounds, None, f"EAGLE-3 eager, batch {b}") + "\n")
    if "compile-bulk" in cases:
        b = args.batch_size
        print(run_case("compile-bulk", {f"eager, batch {b}": {**common, "engine": "new"},
                                        f"--compile, batch {b}": {**common, "engine": "new", "compile": True}},
                       args.rounds, None, f"eager, batch {b}") + "\n")
    if "gemm" in cases:
        for label, extra in (("target alone", {}), ("4-layer drafter, gamma 4", {"drafter_layers": 4, "gamma": 4})):
            plain = {**common, "engine": "new", **extra, "packed_gemm": False}
            print(run_case(f"gemm, {label}", {f"F.linear, {label}": plain, f"packed oneDNN, {label}": {**plain, "packed_gemm": True}},
                           args.rounds, None, f"F.linear, {label}") + "\n")
        print(gemm_shapes_table(args.threads) + "\n")


if __name__ == "__main__":
    main()
