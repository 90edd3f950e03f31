"""How much of the bundled model's next-token probability sits on ids below float32's uniform grid (2**-23).

Those ids are the ones that noise built from float32 uniforms cannot draw at their rate (inverse CDF: never;
Gumbel-max, whose noise then stops at 16.6: far too rarely). The target alone samples completions of the
first shipped prompts (chat template applied), then each generated position's law is measured:

    python benchmarks/tail_mass.py [--prompts 32] [--max-new-tokens 48] [--temperatures 1.0,0.7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vocabtrim.engine import make_engine  # noqa: E402
from vocabtrim.engine.sampling import SamplingParams, logits_to_probs, row_seed  # noqa: E402
from vocabtrim.models import load_model, load_tokenizer  # noqa: E402

PROMPTS = Path(__file__).resolve().parents[1] / "vocabtrim" / "data" / "prompts.parquet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperatures", default="1.0,0.7")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", dtype="float32", device="cpu"), load_tokenizer("smollm2-135m")
    rows = pq.read_table(PROMPTS).to_pylist()[: args.prompts]
    prompts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_tensors="pt")["input_ids"][0].tolist()
               for r in rows]
    print(f"SmolLM2-135M, float32, {len(prompts)} shipped prompts x {args.max_new_tokens} sampled tokens (the target alone)\n")
    print("| temperature | positions | mass below 2**-23: mean | median | max |")
    print("|---|---|---|---|---|")
    for t in (float(x) for x in args.temperatures.split(",")):
        sp = SamplingParams(temperature=t)
        engine = make_engine(model, None, batch_size=8, max_new_tokens=args.max_new_tokens, sampling=sp)
        outs = engine.generate(prompts, [row_seed(0, str(i)) for i in range(len(prompts))])
        shares = []
        with torch.no_grad():
            for p, o in zip(prompts, outs):
                probs = logits_to_probs(model(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1 : -1], sp).double()
                shares.append((probs * (probs < 2**-23)).sum(-1))
        s = torch.cat(shares)
        print(f"| {t} | {s.numel()} | {float(s.mean()):.2e} | {float(s.median()):.2e} | {float(s.max()):.2e} |")


if __name__ == "__main__":
    main()
