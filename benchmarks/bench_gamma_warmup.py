"""Auto gamma's start, side by side: a run's first step's timings dropped (the engine's rule) against the
previous rule (warm-up plan [3, 0], the first step's timings used as cost samples), and the target alone.

    python benchmarks/bench_gamma_warmup.py [--drafter smollm2-135m-eagle3] [--target smollm2-135m]
        [--rows 32] [--rounds 4] [--batch-size 1 8] [--max-new-tokens 48] [--fresh] [--threads 1]

The first step of a run pays for first touches (a cache just allocated, a drafter's first forward); with
``--fresh`` every ``generate`` call gets a new engine, as the first task of each ``vocabtrim generate``
worker and every setting of ``vocabtrim demo`` do; without it the engines are built and warmed once, as in
``bench_eagle3.py``. Greedy; the first ``--rows`` shipped prompts' ``messages`` with the chat template
(``bench_engine.shipped_prompts``), cut into
``--rounds`` parts, each part run by every setting in an order rotated from round to round. Prints tokens/s,
the ratio to the target alone (its range over the rounds), the steps taken at each gamma, and how many
completions equal the target alone's.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", default="smollm2-135m-eagle3")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--fresh", action="store_true", help="a new engine for every generate call")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch
    from bench_engine import shipped_prompts  # this folder is on sys.path when the script runs

    from vocabtrim.engine import gamma as gamma_mod
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.models import load_pair
    from vocabtrim.special_tokens import eos_ids, of_model

    torch.set_num_threads(args.threads)
    pair = load_pair(args.target, args.drafter, dtype="float32", device="cpu")
    prompts = shipped_prompts(pair.tokenizer, args.rows)
    eos = tuple(eos_ids(pair.tokenizer, of_model(pair.target)))

    previous_rule = [False]  # set while a "previous rule" engine runs
    init = gamma_mod.GammaController.__init__

    def controller_init(self, *a, **k):
        init(self, *a, **k)
        if previous_rule[0] and self.plan:
            self.plan = [self.plan[0], 0]  # one drafting step, then the target alone
            self.steps = 1  # so the first step counts as a cost sample

    gamma_mod.GammaController.__init__ = controller_init
    settings = {"target alone": (None, False), "auto, previous rule": (pair.drafter, True),
                "auto, first step dropped": (pair.drafter, False)}
    names = list(settings)
    rounds = max(1, min(args.rounds, len(prompts)))
    bounds = [len(prompts) * r // rounds for r in range(rounds + 1)]
    print(f"target {args.target}, drafter {args.drafter}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
          f"greedy, gamma auto, {args.threads} thread(s), {rounds} interleaved rounds, "
          f"{'a new engine for every call' if args.fresh else 'engines built and warmed once'}")
    for bs in args.batch_size:
        def engine(name):
            return make_engine(pair.target, settings[name][0], sampling=SamplingParams(temperature=0), batch_size=bs,
                               max_new_tokens=args.max_new_tokens, eos_token_ids=eos, gamma=None)

        engines = {}
        if not args.fresh:
            for name in names:
                previous_rule[0] = settings[name][1]
                engines[name] = engine(name)
                engines[name].generate(prompts[:2], [0, 1])  # warm-up
        rates = {n: [] for n in names}
        steps = {n: np.zeros(8, dtype=np.int64) for n in names}
        outs = {n: [] for n in names}
        for r in range(rounds):
            part = prompts[bounds[r] : bounds[r + 1]]
            for name in names[r % len(names):] + names[: r % len(names)]:
                previous_rule[0] = settings[name][1]
                eng = engine(name) if args.fresh else engines[name]
                t0 = time.perf_counter()
                got = eng.generate(part, list(range(bounds[r], bounds[r + 1])))
                rates[name].append(sum(len(o.token_ids) for o in got) / (time.perf_counter() - t0))
                hist = eng.last_stats.gamma_hist
                steps[name][: len(hist)] += hist
                outs[name] += got
        print(f"\nbatch {bs}")
        for name in names:
            ratio = [a / b for a, b in zip(rates[name], rates["target alone"])]
            same = sum(a.token_ids == b.token_ids for a, b in zip(outs[name], outs["target alone"]))
            top = int(np.flatnonzero(steps[name]).max()) + 1
            print(f"  {name:<25} tokens/s {np.mean(rates[name]):6.1f}  x target alone {np.mean(ratio):.2f} "
                  f"({min(ratio):.2f}–{max(ratio):.2f})  steps at gamma 0..{top - 1}: {steps[name][:top].tolist()}  "
                  f"same as target alone {same}/{len(outs[name])}")


if __name__ == "__main__":
    main()
