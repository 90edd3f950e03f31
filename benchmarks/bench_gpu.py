"""GPU benchmark of the engine: a random-weight Llama-3-shaped pair in bfloat16.

    python benchmarks/bench_gpu.py --no-compile    # on a CUDA GPU (an H200: about 3 minutes)
    python benchmarks/bench_gpu.py                 # eager and compiled (each setting compiles for 35-76 s
                                                   # per batch size on an H200: about 12 minutes)
    python benchmarks/bench_gpu.py --smoke         # tiny shapes (on the GPU when there is one): checks the script runs

Target: 32 layers, hidden 4096, 32 heads / 8 KV heads, MLP 14336 (Llama-3.1-8B's shape). Drafter: 16
layers, hidden 2048. Vocabulary 128,256; the trimmed head keeps K = 32,768 ids. EAGLE-3 drafter: one
decoder layer of the target's shape reading three target layers, draft vocabulary 32,000 ids (the
published Llama-3.1-8B EAGLE-3 drafters' shape), and the same drafter with a full 128,256-row head
(``eagle3.widen``). Weights are random, so drafts are almost never accepted: the table is about step
costs (drafter step, verify pass) and what they give in tokens/s at a fixed gamma, not about acceptance.
Its "break-even acceptance" is derived from those costs: the acceptance per draft (independent, at the
fixed gamma) at which the setting would match the target alone run in the same mode; lower is better.
For each batch size (1, 16, 64): target alone, drafter with its full head, drafter with the trimmed
head, the EAGLE-3 drafter trimmed and full, each eager and with ``--compile``; settings interleaved over
``--rounds`` rounds, ranges reported. Each batch size's rows are printed as soon as it is done. The
last column counts the rows whose greedy completion equals the target alone's in the same mode, over
all rounds (bfloat16: a verify pass of gamma + 1 tokens may round a near-tie differently from a
one-token step, so a row can differ where two logits tie to bfloat16 precision).
"""

from __future__ import annotations

import argparse
import time


def build(layers: int, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int, dtype, device, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                      tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return model


def build_eagle3(target, draft_vocab: int, seed: int):
    """A random-weight EAGLE-3 drafter for ``target`` (one layer of its shape), on its device and dtype: its
    draft vocabulary is ``draft_vocab`` random ids, its head starts as the target's rows for them."""
    import torch

    from vocabtrim import eagle3 as e3

    head = target.get_output_embeddings().weight
    config = e3.Eagle3Config.from_dict(e3.make_config(target.config, draft_vocab))
    torch.manual_seed(seed)
    with torch.device(head.device):
        model = e3.Eagle3Model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
        ids = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
        model.lm_head.weight.copy_(head[ids.to(head.device)])
    model.set_vocabulary(ids)
    model.to(head.dtype).eval().requires_grad_(False)
    model.set_embedding(target.get_input_embeddings().weight)
    return model


def break_even(cost_ratio: float, gamma: int) -> float | None:
    """The acceptance per draft at which a speculative setting matches the target alone, derived from its
    measured speed per step: ``cost_ratio`` is its tokens/s over the target's at one token a step each
    (tokens/s ratio × the target's tokens per step / the setting's). With each draft accepted independently
    with probability a, a step yields (1 - a**(gamma+1)) / (1 - a) tokens; None when even a = 1 does not
    pay for the step."""
    need = 1.0 / cost_ratio
    if need <= 1.0:
        return 0.0
    if need > gamma + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if sum(a ** i for i in range(gamma + 1)) < need else (lo, a)
    return (lo + hi) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, on the GPU when there is one")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--settings", default="target,full,trimmed,eagle3-full,eagle3",
                    help="which to run (the target alone, eager, always runs: it is the baseline)")
    args = ap.parse_args()

    import torch

    from vocabtrim import eagle3 as e3
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.head.trimmed import head_from_ids

    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        shapes = dict(vocab=4096, k=1024, eagle3_k=1000, target=(4, 64, 4, 2, 128), drafter=(1, 32, 4, 2, 64))
        args.batches, args.new_tokens, args.prompt_tokens, args.rounds = "1,4", 8, 16, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run with --smoke to check the script on CPU")
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        shapes = dict(vocab=128_256, k=32_768, eagle3_k=32_000, target=(32, 4096, 32, 8, 14336), drafter=(16, 2048, 16, 8, 5632))
    t0 = time.perf_counter()
    target = build(*shapes["target"], shapes["vocab"], dtype, device, seed=0)
    drafter = build(*shapes["drafter"], shapes["vocab"], dtype, device, seed=1)
    kept = torch.randperm(shapes["vocab"], generator=torch.Generator().manual_seed(0))[: shapes["k"]]
    head = head_from_ids(drafter, kept)
    eagle3 = build_eagle3(target, shapes["eagle3_k"], seed=2)
    eagle3_full = e3.widen(eagle3, target.get_output_embeddings().weight)
    print(f"models built in {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")

    greedy = SamplingParams(temperature=0)
    chosen = set(args.settings.split(","))
    settings = [(key, label, d, h) for key, label, d, h in [
        ("target", "target alone", None, None), ("full", "full head", drafter, None),
        ("trimmed", f"trimmed head K={shapes['k']}", drafter, head),
        ("eagle3-full", f"EAGLE-3 full head ({shapes['vocab']:,})", eagle3_full, None),
        ("eagle3", f"EAGLE-3 K={shapes['eagle3_k']:,}", eagle3, None)] if key in chosen or key == "target"]
    modes = [False] + ([] if args.no_compile else [True])

    def rng(xs, spec):
        xs = [x for x in xs if x is not None]
        return "-" if not xs else (format(min(xs), spec) if max(xs) - min(xs) < 1e-9 else f"{format(min(xs), spec)}–{format(max(xs), spec)}")

    header = ("| batch | setting | mode | tokens/s | × target alone (eager) | tokens / step | break-even acceptance (same mode) | "
              "drafter step ms | verify pass ms | warm-up s | rows as the target alone (same mode) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"\n{header}", flush=True)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        g = torch.Generator().manual_seed(b)
        prompts = [torch.randint(3, shapes["vocab"], (args.prompt_tokens,), generator=g).tolist() for _ in range(b)]
        engines = {}
        for _, name, d, h in settings:
            for compiled in modes:
                e = make_engine(target, d, h, sampling=greedy, gamma=None if d is None else args.gamma,
                                batch_size=b, max_new_tokens=args.new_tokens, compile=compiled)
                t = time.perf_counter()
                e.generate(prompts, list(range(b)), max_new_tokens=4)  # warm-up (compiles)
                engines[(name, compiled)] = (e, time.perf_counter() - t, [], [])
                print(f"  batch {b}: {name}, {'compiled' if compiled else 'eager'}: warm in "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
        for _ in range(args.rounds):
            for key, (e, _, runs, outs) in engines.items():
                out = e.generate(prompts, list(range(b)))
                outs.append([o.token_ids for o in out])
                st = e.last_stats
                runs.append((sum(len(o.token_ids) for o in out) / st.wall_seconds,
                             st.drafter_step_ms or None, 1000 * st.target_seconds / st.target_passes,
                             st.generated_tokens / max(st.rows_stepped, 1)))
        base = engines[("target alone", False)][2]
        batch_rows = []
        for (name, compiled), (e, warm, runs, outs) in engines.items():
            ratios = [r[0] / x[0] for r, x in zip(runs, base)]
            _, _, same, alone = engines[("target alone", compiled)]  # against the target alone in the same mode
            even = "-" if e.drafter is None else rng(
                [break_even(r[0] / x[0] * x[3] / r[3], args.gamma) for r, x in zip(runs, same)], ".2f")
            identical = "-" if e.drafter is None else (
                f"{sum(a == t for o, ref in zip(outs, alone) for a, t in zip(o, ref))}/{b * len(outs)}")
            batch_rows.append(f"| {b} | {name} | {'compiled' if compiled else 'eager'} | {rng([r[0] for r in runs], '.1f')} | "
                              f"{rng(ratios, '.2f')}× | {rng([r[3] for r in runs], '.2f')} | {even} | "
                              f"{rng([r[1] for r in runs], '.2f')} | {rng([r[2] for r in runs], '.2f')} | {warm:.0f} | "
                              f"{identical} |")
        print("\n".join(batch_rows), flush=True)
        rows += batch_rows
        del engines
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{header}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
