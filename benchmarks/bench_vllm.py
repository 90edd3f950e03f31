"""Native engine vs vLLM on the bundled SmolLM2-135M: target alone, and speculative decoding with a
layer-truncated drafter with its full head and with a trimmed (K ids) head, and with the shipped EAGLE-3
drafter with its own trimmed draft vocabulary and with a full-vocabulary head. Prints a Markdown table.

    python benchmarks/bench_vllm.py                                  # 32 prompts x 48 tokens, batch 8 and 32
    python benchmarks/bench_vllm.py --prompts 16 --max-new-tokens 24 --rounds 1   # a smaller run
    python benchmarks/bench_vllm.py --drafters eagle3 --eagle3-gamma 3           # EAGLE-3 settings only

Needs vLLM (`pip install 'vocabtrim[vllm]'`). Every vLLM engine (target alone, full-head drafter,
trimmed-head drafter with and without the vocabulary-wide placement) is started once and kept alive;
then each round runs every setting at every batch size in turn (interleaved: the machine's speed
drifts between settings). A batch of B is B prompts given to one ``generate`` call (native: one
static batch; vLLM: ``max_num_seqs`` = the largest batch, so a call of B rows decodes B together).

All runs are greedy (or sample at ``--temperature``, each row with its own seed) and ignore EOS (every row
gets ``--max-new-tokens`` tokens); each speculative output is compared token for token with the same engine's
target alone ("same" column; when sampling, the native engine only: its Gumbel coupling makes a row's
sampled completion independent of the drafter, vLLM's does not). The trimmed
head keeps the K ids the target emits most often on other prompts (disjoint from the timed prompts)
plus the special tokens. The EAGLE-3 drafter (``--eagle3``, the shipped one by default) runs with its own
draft vocabulary (vLLM: greedy drafting through ``get_top_tokens``, the argmax over its K rows mapped by
``d2t``; "placed": vLLM's own ``compute_logits``, which scatters the K logits into a vocabulary-wide -inf
tensor) and with a full-vocabulary head (``eagle3.widen``: its own rows at its draft ids, the target's
LM-head rows elsewhere; written as a folder vLLM loads). ``--eagle3-retrimmed`` adds drafters that
``vocabtrim build-head`` re-trimmed from it (a smaller K, the same weights), each against that same full head.
tokens/s is measured around ``generate`` after a warm-up call; the native engine runs with ``--threads``
torch threads, vLLM with its CPU default (all cores but one).

``--profile`` runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the model in this process, no
engine-core process) and times, per setting, the target's forward, the drafter's forward, the drafter's
head with its argmax (the proposer's ``_greedy_sample``) and the whole proposal, in ms per target step.

Last: the cost of placing K logits into a vocabulary-wide -inf tensor (what the trimmed-head drafter's
``compute_logits`` does), timed alone against the head's own matmul.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq
import torch


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




def top_k_ids(counts: Counter, k: int, vocab: int, specials) -> list[int]:
    """The K most frequent ids (ties and unseen ids filled by lowest id), plus the special tokens."""
    ranked = sorted(range(vocab), key=lambda t: (-counts.get(t, 0), t))
    return sorted(set(ranked[:k]) | set(specials))


def span(res: dict, ref: dict) -> str:
    """The lowest and highest ratio of two settings' tokens/s within one round."""
    ratios = [a / b for a, b in zip(res["by_round"], ref["by_round"])]
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def timed(fn, prompts, batch):
    """Run ``fn(chunk, seeds)`` over ``prompts`` in batches; returns (outputs, seconds)."""
    outs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        outs.extend(fn(chunk, list(range(i, i + len(chunk)))))
    return outs, time.perf_counter() - start


def placement_costs(hidden: int, vocab: int, k: int, rows_list, repeats: int = 200) -> list[dict]:
    """Milliseconds per call: the K-row head matmul; placing its output with a fresh -inf tensor; placing it
    into a reused buffer (what ``TrimmedLMHead.place`` does); a plain [rows, K] copy (the floor)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(vocab, generator=g)[:k].sort().values
    weight = torch.randn(k, hidden, generator=g)
    out = []
    for rows in rows_list:
        h = torch.randn(rows, hidden, generator=g)
        logits = torch.nn.functional.linear(h, weight)
        buf = torch.full((rows, vocab), float("-inf"))
        dst = torch.empty_like(logits)

        def fresh():
            t = torch.full((rows, vocab), float("-inf"))
            t.index_copy_(1, ids, logits)

        cases = {
            "matmul": lambda: torch.nn.functional.linear(h, weight),
            "fresh": fresh,
            "reused": lambda: buf.index_copy_(1, ids, logits),
            "copy": lambda: dst.copy_(logits),
        }
        row = {"rows": rows}
        for name, fn in cases.items():
            for _ in range(10):
                fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            row[name] = 1000 * (time.perf_counter() - start) / repeats
        out.append(row)
    return out


class StepTimer:
    """Milliseconds spent in vLLM's model forwards and draft proposer, per setting (``--profile``).

    Wraps methods on vLLM's classes, so vLLM must run in this process. LlamaModel.forward is compiled by
    vLLM and cannot be wrapped; LlamaForCausalLM.forward (which calls it) is, and its layer count tells the
    target from a plain drafter; an EAGLE-3 drafter's forward is Eagle3LlamaForCausalLM's own."""

    def __init__(self, target_layers: int):
        from vllm.model_executor.models import llama, llama_eagle3
        from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        self.current = None
        self.ms: dict = {}
        self.calls: Counter = Counter()

        def wrap(cls, method, key_of):
            original = getattr(cls, method)

            def timed_method(obj, *a, **k):
                start = time.perf_counter()
                try:
                    return original(obj, *a, **k)
                finally:
                    if self.current is not None:
                        key = (self.current, key_of(obj))
                        self.ms[key] = self.ms.get(key, 0.0) + 1000 * (time.perf_counter() - start)
                        self.calls[key] += 1

            setattr(cls, method, timed_method)

        wrap(llama.LlamaForCausalLM, "forward",
             lambda m: "target forward" if len(m.model.layers) == target_layers else "drafter forward")
        wrap(llama_eagle3.Eagle3LlamaForCausalLM, "forward", lambda _: "drafter forward")
        wrap(SpecDecodeBaseProposer, "_greedy_sample", lambda _: "drafter head + argmax")
        wrap(SpecDecodeBaseProposer, "propose", lambda _: "proposal (drafter forwards + heads)")
        wrap(GPUModelRunner, "execute_model", lambda _: "steps")

    def table(self, settings) -> list[str]:
        parts = ["target forward", "drafter forward", "drafter head + argmax", "proposal (drafter forwards + heads)"]
        lines = ["| batch | engine | setting | " + " | ".join(f"{p}, ms/step" for p in parts) + " | drafter calls/step |",
                 "|---" * (len(parts) + 4) + "|"]
        for setting in settings:
            steps = self.calls.get((setting, "steps"), 0)
            if not steps:
                continue
            b, name = setting  # name is "engine | setting"
            cells = [f"{self.ms.get((setting, p), 0.0) / steps:.1f}" for p in parts]
            lines.append(f"| {b} | {name} | " + " | ".join(cells) + f" | {self.calls.get((setting, 'drafter forward'), 0) / steps:.1f} |")
        return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--calib-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--drafter-layers", type=int, default=4)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the native engine")
    ap.add_argument("--engines", default="native,vllm")
    ap.add_argument("--drafters", default="plain,eagle3", help="plain (layer-truncated), eagle3, or both")
    ap.add_argument("--eagle3", default="smollm2-135m-eagle3", help="the EAGLE-3 drafter (a folder or the shipped name)")
    ap.add_argument("--eagle3-gamma", type=int, default=3)
    ap.add_argument("--eagle3-retrimmed", default="",
                    help="comma-separated folders that `vocabtrim build-head --drafter EAGLE3 --top-k K` wrote from the "
                         "--eagle3 drafter: each runs as 'EAGLE-3, trimmed head K=k', against the same full head")
    ap.add_argument("--vllm-dtype", default="float32", help="vLLM's weights and activations (the native engine stays float32)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above 0 every row samples with its own seed (the same seed in every setting)")
    ap.add_argument("--profile", action="store_true", help="vLLM in-process, with its forwards and proposer timed")
    args = ap.parse_args(argv)
    if args.profile:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(args.threads)

    from vocabtrim import eagle3 as e3
    from vocabtrim.head.io import drafter_architecture, save_head
    from vocabtrim.head.trimmed import head_from_ids
    from vocabtrim.models import head_rows_fingerprint, load_eagle3_for, load_pair, resolve_model, tokenizer_fingerprint, truncate_layers
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    engines = args.engines.split(",")
    families = args.drafters.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    pair = load_pair("smollm2-135m", need_drafter=False, dtype="float32", device="cpu")
    target, tok = pair.target, pair.tokenizer
    vocab = target.get_output_embeddings().weight.shape[0]
    prompts, kinds = shipped_prompts(tok)
    eval_prompts, calib_prompts = split_prompts(prompts, kinds, args.prompts, args.calib_prompts)

    kept = drafter = head = None
    if "plain" in families:
        calib = make_engine(target, sampling=SamplingParams(temperature=0.7), max_new_tokens=args.max_new_tokens, batch_size=16)
        counts: Counter = Counter()
        for i in range(0, len(calib_prompts), 16):
            chunk = calib_prompts[i : i + 16]
            for o in calib.generate(chunk, list(range(i, i + len(chunk)))):
                counts.update(o.token_ids)
        specials = [t for t in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) if t is not None]
        specials += tok.convert_tokens_to_ids(tok.all_special_tokens)
        kept = top_k_ids(counts, args.k, vocab, specials)
        drafter = truncate_layers(target, args.drafter_layers)
        head = head_from_ids(drafter, kept)
        print(f"# calibration: {sum(counts.values())} target tokens on {len(calib_prompts)} prompts; head keeps {len(kept)} of {vocab} ids",
              flush=True)

    eagle3 = wide = None
    retrimmed: list = []  # (setting, folder, drafter)
    if "eagle3" in families:
        eagle3 = load_eagle3_for(args.eagle3, target, target_tokenizer=tok)
        wide = e3.widen(eagle3, target.get_output_embeddings().weight)
        print(f"# EAGLE-3 drafter {args.eagle3}: draft vocabulary {eagle3.config.draft_vocab_size} of {vocab} ids", flush=True)
        for path in filter(None, args.eagle3_retrimmed.split(",")):
            model = load_eagle3_for(path, target, target_tokenizer=tok)
            if not bool(eagle3.t2d.cpu()[model.token_ids.cpu()].all()):
                raise SystemExit(f"{path}: its draft vocabulary is not a subset of {args.eagle3}'s: not a re-trim of it")
            retrimmed.append((f"EAGLE-3, trimmed head K={model.config.draft_vocab_size}", path, model))
            print(f"# re-trimmed EAGLE-3 drafter {path}: draft vocabulary {model.config.draft_vocab_size}", flush=True)

    sampling = SamplingParams(temperature=args.temperature)
    settings: dict[str, callable] = {}
    closers = []
    timer = None
    if "native" in engines:
        native = [("target alone", None, None, None)]
        if "plain" in families:
            native += [("drafter, full head", drafter, None, args.gamma), ("drafter, trimmed head", drafter, head, args.gamma)]
        if "eagle3" in families:
            native += [("EAGLE-3, full head", wide, None, args.eagle3_gamma), ("EAGLE-3, trimmed head", eagle3, None, args.eagle3_gamma)]
            native += [(name, model, None, args.eagle3_gamma) for name, _, model in retrimmed]
        for name, d, h, gamma in native:
            eng = make_engine(target, d, h, gamma=gamma, sampling=sampling,
                              max_new_tokens=args.max_new_tokens, batch_size=max(batches))
            settings[f"native | {name}"] = eng.generate
    if "vllm" in engines:
        from vocabtrim.vllm_backend import VllmEngine, drafter_folder, eagle3_spec

        folder = resolve_model("smollm2-135m")
        timer = StepTimer(target.config.num_hidden_layers) if args.profile else None
        runs = [("target alone", None, True, args.gamma)]
        if "plain" in families:
            head_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vocabtrim-bench-head-{args.drafter_layers}-{len(kept)}"
            save_head(head, head_dir, {"kind": "vocabtrim-head", "k": head.k, "vocab_size": vocab,
                                       "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                                       "drafter_fingerprint": head_rows_fingerprint(drafter),
                                       "drafter_architecture": drafter_architecture(drafter)})
            full_folder = drafter_folder("smollm2-135m", args.drafter_layers)
            trimmed_folder = drafter_folder("smollm2-135m", args.drafter_layers, str(head_dir))
            runs += [
                ("drafter, full head", {"method": "draft_model", "model": full_folder}, True, args.gamma),
                ("drafter, trimmed head", {"method": "draft_model", "model": trimmed_folder}, True, args.gamma),
                ("drafter, trimmed head, placed", {"method": "draft_model", "model": trimmed_folder}, False, args.gamma),
            ]
        if "eagle3" in families:
            wide_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vocabtrim-bench-eagle3-full-{os.getpid()}"
            e3.save_eagle3(wide, wide_dir)
            closers.append(lambda: shutil.rmtree(wide_dir, ignore_errors=True))
            spec = eagle3_spec(args.eagle3, folder, tok)
            runs += [
                ("EAGLE-3, full head", eagle3_spec(str(wide_dir), folder, tok), True, args.eagle3_gamma),
                ("EAGLE-3, trimmed head", spec, True, args.eagle3_gamma),
                ("EAGLE-3, trimmed head, placed", spec, False, args.eagle3_gamma),
            ]
            runs += [(name, eagle3_spec(path, folder, tok), True, args.eagle3_gamma) for name, path, _ in retrimmed]
        for name, spec, local_argmax, gamma in runs:
            start = time.perf_counter()
            eng = VllmEngine(folder, spec, gamma=gamma, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             max_num_seqs=max(batches), max_model_len=2048, local_argmax=local_argmax, dtype=args.vllm_dtype)
            print(f"# vLLM engine '{name}' started in {time.perf_counter() - start:.1f} s", flush=True)
            settings[f"vllm | {name}"] = eng.generate
            closers.append(eng.close)

    for fn in settings.values():  # warm-up
        fn(eval_prompts[:2], [0, 1])
    results: dict = {}
    for r in range(args.rounds):
        for b in batches:
            for name, fn in settings.items():
                if timer is not None:
                    timer.current = (b, name)
                outs, wall = timed(fn, eval_prompts, b)
                if timer is not None:
                    timer.current = None
                res = results.setdefault((b, name), {"seconds": 0.0, "tokens": 0, "proposed": 0, "accepted": 0, "outs": outs,
                                                     "by_round": []})
                res["by_round"].append(sum(len(o.token_ids) for o in outs) / wall)
                res["seconds"] += wall
                res["tokens"] += sum(len(o.token_ids) for o in outs)
                res["proposed"] += sum(o.proposed for o in outs)
                res["accepted"] += sum(o.accepted for o in outs)
                print(f"# round {r} batch {b} {name}: {sum(len(o.token_ids) for o in outs) / wall:.1f} tokens/s", flush=True)
    for close in closers:
        close()

    load = os.getloadavg()
    print()
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g} (a seed per row)"
    dtypes = "float32" if args.vllm_dtype == "float32" or "vllm" not in engines else f"native float32, vLLM {args.vllm_dtype}"
    print(f"Bundled SmolLM2-135M, {dtypes}, {how}, {len(eval_prompts)} prompts x {args.max_new_tokens} new tokens (EOS ignored), "
          + (f"drafter = first {args.drafter_layers} layers, gamma {args.gamma}, trimmed head K={len(kept)}; " if kept is not None else "")
          + (f"EAGLE-3 drafter {args.eagle3} (K={eagle3.config.draft_vocab_size}), gamma {args.eagle3_gamma}; " if eagle3 is not None else "")
          + f"{args.rounds} interleaved "
          f"round(s); load average {load[0]:.2f} (1 min) on {os.cpu_count()} cores.")
    print()
    print("| batch | engine | setting | tokens/s | × same engine's target alone (by round) | "
          "× same engine's full-head drafter (by round) | acceptance | same as target alone |")
    print("|---|---|---|---|---|---|---|---|")
    for (b, name), res in results.items():
        engine, setting = name.split(" | ")
        tps = res["tokens"] / res["seconds"]
        base = results[(b, f"{engine} | target alone")]
        full = results.get((b, f"{engine} | {setting.split(',')[0]}, full head"))
        vs_base = f"{tps / (base['tokens'] / base['seconds']):.2f} ({span(res, base)})"
        vs_full = f"{tps / (full['tokens'] / full['seconds']):.2f} ({span(res, full)})" if full and "trimmed" in setting else "–"
        acc = res["accepted"] / res["proposed"] if res["proposed"] else None
        same = f"{sum(o.token_ids == e.token_ids for o, e in zip(res['outs'], base['outs']))}/{len(res['outs'])}"
        if args.temperature > 0 and engine == "vllm":
            same = "–"  # vLLM's sampled completions depend on the drafter; the native engine's Gumbel coupling does not
        print(f"| {b} | {engine} | {setting} | {tps:.1f} | {vs_base} | {vs_full} | "
              f"{'–' if acc is None else f'{acc:.3f}'} | {same} |")

    if timer is not None:
        print()
        print(f"Where a step's time goes (vLLM in-process; ms per target step over {args.rounds} round(s)):")
        print()
        print("\n".join(timer.table(results)))

    hidden = target.config.hidden_size
    k = len(kept) if kept is not None else eagle3.config.draft_vocab_size
    print()
    print(f"Placing K={k} logits into a [rows, {vocab}] -inf tensor (ms per call, {torch.get_num_threads()} thread):")
    print()
    print("| rows | head matmul [rows, K] | fresh -inf tensor + index_copy | reused buffer + index_copy | plain [rows, K] copy |")
    print("|---|---|---|---|---|")
    for row in placement_costs(hidden, vocab, k, [8, 32, 160]):
        print(f"| {row['rows']} | {row['matmul']:.3f} | {row['fresh']:.3f} | {row['reused']:.3f} | {row['copy']:.3f} |")


if __name__ == "__main__":
    main()
