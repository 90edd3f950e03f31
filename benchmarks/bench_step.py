"""One decode step of the bundled target at batch 1: the engine's target-alone path against a plain
Hugging Face forward with ``DynamicCache``, interleaved in one process on the same prompt and threads.

    python benchmarks/bench_step.py [--threads 2] [--steps 48] [--repeat 3]

Prints one line per repetition: ms per step for each, and their ratio (engine / HF). The engine's
number is its wall time per target pass after prefill (mask building, cache writes, argmax included).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import DynamicCache

    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device="cpu")
    prompt = load_tokenizer(args.model)("Write a short story about a lighthouse keeper who finds a message in a bottle.")["input_ids"]
    engine = make_engine(model, sampling=SamplingParams(temperature=0), max_new_tokens=args.steps, batch_size=1)

    @torch.inference_mode()
    def hf_ms() -> float:
        cache = DynamicCache()
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.perf_counter() - start) / args.steps * 1000

    def engine_ms() -> float:
        engine.generate([prompt], [0])
        s = engine.last_stats
        return (s.wall_seconds - s.prefill_seconds) / s.target_passes * 1000

    hf_ms(), engine_ms()  # warm-up
    print(f"{args.model}, batch 1, {args.threads} threads, {args.steps} steps")
    for r in range(args.repeat):
        h, e = hf_ms(), engine_ms()
        print(f"rep {r}: HF {h:.1f} ms/step | engine {e:.1f} ms/step | engine / HF {e / h:.2f}", flush=True)


if __name__ == "__main__":
    main()
