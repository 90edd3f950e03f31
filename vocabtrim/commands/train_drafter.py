"""``vocabtrim train-drafter``: flags → ``TrainConfig`` → ``run_train``, then a short summary."""

from __future__ import annotations

import argparse

from vocabtrim.commands.common import DTYPES, add_ray_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target: model folder, hub id, .gguf file or smollm2-135m")
    parser.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="training rows: .parquet, .jsonl, .txt (prompts, for --source target)")
    parser.add_argument("--text-column", default="text", help="the text column (Parquet, Arrow) or key (JSONL); rows used as prompts may hold {role, content} message lists instead")
    parser.add_argument("--source", choices=("corpus", "target"), default="corpus",
                        help="train on the corpus text, or on the target's own responses to corpus rows as prompts")
    parser.add_argument("--histogram", metavar="DIR", help="a `vocabtrim calibrate` folder: the draft vocabulary is its top-K")
    parser.add_argument("--top-k", type=int, metavar="K", help="draft vocabulary size (special tokens included)")
    parser.add_argument("--init", metavar="DRAFTER",
                        help="an EAGLE-3 drafter to start from (a folder or smollm2-135m-eagle3): fine-tune it on the corpus; its own "
                             "draft vocabulary unless --histogram and --top-k give one (ids it lacks start from the target's head rows)")
    parser.add_argument("--init-from-target", action="store_true",
                        help="a new drafter's layer starts as the target's layer that reads the highest feature layer (its "
                             "attention and MLP weights; fc passes that feature layer through) instead of random weights")
    parser.add_argument("--epochs", type=int, default=1, help="epochs in all (a rerun with more resumes)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's rate (a rerun resumes at the rerun's rate)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--ttt-length", type=int, default=3, help="training-time-test steps (EAGLE-3 chains)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training row")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="--source target: response tokens per row")
    parser.add_argument("--temperature", type=float, default=0.0, help="--source target: sampling temperature (0: greedy)")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of shards held out for the acceptance report")
    parser.add_argument("--intermediate-size", type=int, default=None, help="the drafter layer's MLP width (default: the target's)")
    parser.add_argument("--max-shards", type=int, default=None, metavar="N",
                        help="extract and train on the first N shards of the corpus only (default: all); a rerun with more extracts the "
                             "rest until the training writes its first resume state (then it is another training: a new --out)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                        help="within an epoch, write the resume state (weights, optimizer, the epoch's position) at most every M "
                             "minutes, so a stopped run loses at most that much training; 0: at the end of each epoch only")
    parser.add_argument("--shuffle-gb", type=float, default=8.0, metavar="G",
                        help="feature bytes (GB) the trainer holds at once to shuffle: features that fit are shuffled row by row "
                             "as one; more are read a window of shards at a time (shards in a shuffled order, rows shuffled within "
                             "each window)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order, and the responses at --temperature > 0")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="the target's dtype while extracting features (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder (off by default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ray_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="the drafter folder (SpecForge layout); a rerun resumes")


def config_from_args(args) -> "TrainConfig":  # noqa: F821
    from vocabtrim.train import TrainConfig

    return TrainConfig(
        target=args.target, corpus=list(args.corpus), text_column=args.text_column, source=args.source, histogram=args.histogram,
        top_k=args.top_k, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        ttt_length=args.ttt_length, max_length=args.max_length, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        held_out=args.held_out, max_shards=args.max_shards, intermediate_size=args.intermediate_size, seed=args.seed, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, show_progress=not args.no_progress, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, address=args.address, out=args.out,
        init=args.init, init_from_target=args.init_from_target, checkpoint_minutes=args.checkpoint_minutes,
        shuffle_gb=args.shuffle_gb,
    )


def main(args) -> int:
    from vocabtrim import storage
    from vocabtrim.train import run_train

    m = run_train(config_from_args(args))
    acc = m["held_out_acceptance"]
    loss = m["loss"]
    chain = m.get("held_out_chain_acceptance")
    chained = f" (replayed gamma-{m['ttt_length']} chains: {chain:.3f} per draft)" if chain is not None else ""
    held_out = (f"held-out acceptance {acc:.3f}{chained}" if acc is not None else
                "no held-out figure (" + ("no shard held out: --held-out" if not m["held_out_shards"] else "no held-out position counted") + ")")
    print(
        f"EAGLE-3 drafter, draft vocabulary {m['draft_vocab_size']:,} of {m['vocab_size']:,} ids; {len(m['epochs_run'])} epoch(s) reported, "
        f"loss {loss:.3f}; {held_out}; features {m['extract_seconds']:.0f} s, training {m['train_seconds']:.0f} s\n"
        if loss is not None else "nothing trained\n",
        end="",
    )
    out = storage.display(args.out).rstrip("/")
    print(f"wrote {out}/config.json, {out}/model.safetensors, {out}/manifest.json")
    return 0
