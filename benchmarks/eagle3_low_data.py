"""What helps an EAGLE-3 drafter trained on little data: noise on its input features, or its layer started as the target's?

Trains train-drafter's ``DrafterTrainer`` (its loss, schedule, held-out replay) on the first ``--train-shards``
shards of a finished ``train-drafter --source target`` run's features and reports the held-out figures on
shards ``--eval-from`` onwards (rows no such run trained on), after the epochs ``--eval-at`` names (0: before
training). ``--noise X`` gives each of the three feature layers Gaussian noise of X times its per-token RMS in
training steps only; ``--init-from-target`` starts the drafter's layer as train-drafter's flag of that name does.
``--eval-only DIR`` measures a trained drafter on the same rows instead. The draft vocabulary is
``--histogram``'s top ``--top-k``, as in the run.

    python benchmarks/eagle3_low_data.py --features runs/scale/d2000/features --noise 0.1 --out /tmp/noise10
    python benchmarks/eagle3_low_data.py --features runs/scale/d2000/features --init-from-target --eval-at 0,3,6,8 --out /tmp/from
    python benchmarks/eagle3_low_data.py --features runs/scale/d2000/features --eval-only runs/scale/d1000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vocabtrim import corpus, eagle3 as e3, train
from vocabtrim.models import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True, help="a train-drafter run's features/ folder")
    p.add_argument("--corpus", default="runs/scale/train_prompts.parquet", help="that run's --corpus (for its shard order)")
    p.add_argument("--text-column", default="prompt")
    p.add_argument("--histogram", default="runs/calib-target")
    p.add_argument("--top-k", type=int, default=8192)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--train-shards", type=int, default=30)
    p.add_argument("--eval-from", type=int, default=31)
    p.add_argument("--eval-to", type=int, default=62)
    p.add_argument("--noise", type=float, default=0.0, help="noise standard deviation, times each feature layer's per-token RMS")
    p.add_argument("--schedule", default="6x1e-3,2x3e-4", help="epochs x learning rate, the shipped recipe's by default")
    p.add_argument("--eval-at", default="3,6,8", help="epochs after which the held-out rows are measured")
    p.add_argument("--init-from-target", action="store_true", help="train-drafter --init-from-target: the layer starts as the target's")
    p.add_argument("--eval-only", default=None, help="an EAGLE-3 drafter folder to measure instead of training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/eagle3-low-data")
    a = p.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "features").exists():
        (out / "features").symlink_to(Path(a.features).resolve())
    ids = [s.shard_id for s in corpus.make_shards([a.corpus], a.text_column, 16 << 10, 32)]
    train_ids, eval_ids = ids[: a.train_shards], ids[a.eval_from : a.eval_to]
    cfg = train.TrainConfig(target=a.target, corpus=[a.corpus], text_column=a.text_column, histogram=a.histogram, top_k=a.top_k,
                            out=str(out), source="target", max_length=200, batch_size=8, ttt_length=3,
                            init_from_target=a.init_from_target)
    tok = load_tokenizer(a.target)
    draft_ids, _ = train.draft_vocabulary(cfg, tok, len(tok))
    layers = json.loads((Path(a.features) / "_run.json").read_text())["feature_layers"]  # the ledger's claim
    trainer = train.DrafterTrainer(asdict(cfg), draft_ids, layers, train_ids, eval_ids, a.threads)
    trainer.pid()
    if a.eval_only:
        trainer.model.load_state_dict(e3.load_eagle3(a.eval_only).state_dict(), strict=False)
        print(json.dumps({"drafter": a.eval_only, **trainer.evaluate()}), flush=True)
        return

    hidden = trainer.model.config.target_hidden_size
    pad_rows = train.pad_rows

    def noisy(rows, device=None):
        batch = pad_rows(rows, device)
        if a.noise > 0 and trainer.model.training:  # training steps only; the held-out rows stay clean
            x = batch["aux"].float()
            parts = []
            for k in range(3):
                layer = x[..., k * hidden : (k + 1) * hidden]
                rms = layer.pow(2).mean(-1, keepdim=True).sqrt()
                parts.append(layer + a.noise * rms * torch.randn_like(layer))
            batch["aux"] = torch.cat(parts, -1).to(batch["aux"].dtype)
        return batch

    train.pad_rows = noisy
    evaluate, eval_at = trainer.evaluate, {int(e) for e in a.eval_at.split(",")}
    trainer.evaluate = lambda: evaluate() if trainer.epoch in eval_at else {}
    t0 = time.time()
    if 0 in eval_at:
        print(json.dumps({"noise": a.noise, "init_from_target": a.init_from_target, "epoch": 0, **evaluate()}), flush=True)
    for part in a.schedule.split(","):
        n, rate = part.split("x")
        for _ in range(int(n)):
            for g in trainer.opt.param_groups:
                g["lr"] = float(rate)
            trainer.begin_epoch()
            while not trainer.train_steps(1 << 30)["done"]:
                pass
            record = trainer.end_epoch()
            print(json.dumps({"noise": a.noise, "init_from_target": a.init_from_target, "seconds": round(time.time() - t0), **record}), flush=True)


if __name__ == "__main__":
    main()
