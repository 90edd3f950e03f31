"""Train an EAGLE-3 drafter on one GPU machine, on conversations, some of them written by the target itself.

``vocabtrim train-drafter`` needs Ray; this script drives the same pieces in one process (a machine without
Ray, a GPU beside it), in three stages under one time budget:

1. Conversations: ``--base-prompts`` (a ``messages`` column, else ``prompt``: ``eagle3_train_prompts.py``
   writes single prompts and multi-turn chats) plus user turns the target writes itself: sampled (temperature
   1, ``--top-p``) right after its chat template's user header, as Magpie does (arXiv 2406.08464);
   ``--second-turns`` of them go on to a second user turn after the target's own greedy answer. Kept: turns
   that end on the end-of-turn token, at least three words, no duplicate, none equal to a message of the
   shipped prompts (``vocabtrim/data/prompts.parquet``, what the drafter is measured on); no base
   conversation that is a shipped one.
2. Features: ``train.FeatureExtractor`` (the target's greedy response to each conversation, its three EAGLE-3
   layers, final hidden state and greedy tokens), shard by shard into a ``train.FeatureLedger`` (a rerun in
   the same ``--work`` reuses them). ``--eval-messages`` (the shipped prompts) are extracted first and are the
   held-out rows, reported by kind; else the last ``--held-out`` share of the shards.
3. Training: ``train.DrafterTrainer`` (train-drafter's loss, held-out replay and checkpoint), from ``--init``'s
   weights and draft vocabulary, epoch by epoch (the rate decaying by cosine over the time left) until the
   budget; the held-out figures of the starting weights are measured first. After each epoch the drafter is
   written to ``--out`` in bf16 with a manifest.

    python benchmarks/eagle3_gpu_train.py --target smollm2-135m --base-prompts runs/train_prompts.parquet \
        --eval-messages vocabtrim/data/prompts.parquet --work /tmp/work --out runs/eagle3-gpu --budget 3600
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from vocabtrim import corpus, eagle3 as e3, train  # noqa: E402
from vocabtrim.engine import make_engine  # noqa: E402
from vocabtrim.engine.sampling import SamplingParams, row_seed  # noqa: E402
from vocabtrim.models import load_model, load_tokenizer  # noqa: E402
from vocabtrim.special_tokens import eos_ids, of_model  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "vocabtrim" / "data"
MARK = "\x00MARK\x00"


def log(t0: float, *args) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s]", *args, flush=True)


def write_if_changed(table: pa.Table, path: Path, **kwargs) -> bool:
    """Write ``table`` to ``path`` unless the file there already holds the same rows. A shard's id depends on
    its file's path, size and modification time, so an unchanged file keeps the features extracted from it."""
    if path.exists():
        try:
            if pq.read_table(path).equals(table):
                return False
        except (OSError, pa.ArrowException):  # unreadable: written again
            pass
    pq.write_table(table, path, **kwargs)
    return True


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` in the chat template, followed by the assistant's header."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def header_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` in the chat template followed by an open user turn (its header only)."""
    text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": MARK}], tokenize=False)
    return tokenizer(text[: text.index(MARK)], add_special_tokens=False)["input_ids"]


def plain_turns(messages) -> list[dict]:
    """A conversation as [{role, content}] (Parquet's structs may carry other fields)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation_key(turns: list[dict]) -> tuple:
    return tuple(m["content"].strip().lower() for m in turns)


def shipped() -> tuple[set[str], set[tuple]]:
    """The shipped prompts, normalised: every message text (no user turn the target writes may be one) and
    every conversation (no training conversation may be one)."""
    table = pq.read_table(SHIPPED / "prompts.parquet").to_pylist()
    conversations = [r.get("messages") or [{"content": r["prompt"]}] for r in table]
    texts = {r["prompt"].strip().lower() for r in table} | {m["content"].strip().lower() for c in conversations for m in c}
    return texts, {conversation_key(c) for c in conversations}


def user_turns(engine, tokenizer, contexts: list[list[dict]], keys: list[str], seed: int) -> list[str | None]:
    """One sampled user turn per context (None: it did not end on the end-of-turn token, or is too short)."""
    prompts = [header_ids(tokenizer, c) for c in contexts]
    outs = engine.generate(prompts, [row_seed(seed, k) for k in keys])
    turns = []
    for o in outs:
        text = tokenizer.decode(o.token_ids, skip_special_tokens=True).strip()
        turns.append(text if o.finish_reason == "stop" and len(text.split()) >= 3 else None)
    return turns


def make_rows(a, model, tokenizer, t0: float, deadline: float) -> list[dict]:
    """Stage 1: the training conversations, as rows {"messages": [{role, content}, ...], "origin": str}."""
    eos = tuple(eos_ids(tokenizer, of_model(model)))
    sample = make_engine(model, None, sampling=SamplingParams(temperature=1.0, top_p=a.top_p), batch_size=a.gen_batch,
                         max_new_tokens=a.max_turn_tokens, eos_token_ids=eos)
    greedy = make_engine(model, None, sampling=SamplingParams(temperature=0.0), batch_size=a.gen_batch,
                         max_new_tokens=a.max_answer_tokens, eos_token_ids=eos)  # first answers: kept when finished
    banned, conversations = shipped()
    seen: set[str] = set()
    rows = []
    if a.base_prompts:
        table = pq.read_table(a.base_prompts)
        for r in table.to_pylist():
            turns = plain_turns(r["messages"]) if r.get("messages") else [{"role": "user", "content": r["prompt"]}]
            if conversation_key(turns) not in conversations and conversation_key(turns[-1:]) not in conversations:
                rows.append({"messages": turns, "origin": "base"})
                seen.add(turns[-1]["content"].strip().lower())
        log(t0, f"base conversations: {len(rows)}")
    made = tried = 0
    while made < a.self_prompts and time.perf_counter() < deadline:
        n = min(a.chunk, a.self_prompts - made)
        keys = [f"q1:{tried + i}" for i in range(n)]
        tried += n
        firsts = [q for q in user_turns(sample, tokenizer, [[] for _ in keys], keys, a.seed)
                  if q is not None and q.lower() not in banned and q.lower() not in seen]
        firsts = list(dict.fromkeys(firsts))
        seen.update(q.lower() for q in firsts)
        k2 = int(round(len(firsts) * a.second_turns))
        singles, doubles = firsts[k2:], firsts[:k2]
        rows += [{"messages": [{"role": "user", "content": q}], "origin": "self"} for q in singles]
        if doubles:
            outs = greedy.generate([chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in doubles], [0] * len(doubles))
            answers = [tokenizer.decode(o.token_ids, skip_special_tokens=True).strip() if o.finish_reason == "stop" else None
                       for o in outs]
            pairs = [(q, r) for q, r in zip(doubles, answers) if r]
            contexts = [[{"role": "user", "content": q}, {"role": "assistant", "content": r}] for q, r in pairs]
            seconds = user_turns(sample, tokenizer, contexts, [f"q2:{q}" for q, _ in pairs], a.seed)
            for c, q2 in zip(contexts, seconds):
                if q2 is not None and q2.lower() not in banned:
                    rows.append({"messages": c + [{"role": "user", "content": q2}], "origin": "self-2"})
        made = sum(r["origin"] != "base" for r in rows)
        log(t0, f"self prompts: {made} kept of {tried} sampled")
    random.Random(a.seed).shuffle(rows)
    return rows


def by_kind(trainer, eval_by_kind: dict) -> dict:
    """Replayed chain acceptance (gamma = TTT steps) on each kind's evaluation shards."""
    out, keep = {}, trainer.eval_ids
    if len(eval_by_kind) > 1:
        for kind, ids in eval_by_kind.items():
            trainer.eval_ids = ids
            r = trainer.evaluate()
            out[kind] = {"chain_acceptance": r["held_out_chain_acceptance"], "first_step_accuracy": r["held_out_acceptance"]}
        trainer.eval_ids = keep
        print("held out by kind:", json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--init", default=str(SHIPPED / "smollm2-135m-eagle3"), help="EAGLE-3 folder: starting weights and draft vocabulary")
    p.add_argument("--base-prompts", default=None, help="Parquet with a messages column, else a prompt column (eagle3_train_prompts.py)")
    p.add_argument("--self-prompts", type=int, default=36000)
    p.add_argument("--second-turns", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=0.95, help="user turns: top-p at temperature 1")
    p.add_argument("--max-turn-tokens", type=int, default=64)
    p.add_argument("--max-answer-tokens", type=int, default=192, help="a first answer before a second user turn")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--gen-batch", type=int, default=512)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--shard-rows", type=int, default=512)
    p.add_argument("--held-out", type=float, default=0.05, help="share of the training shards held out (without --eval-messages)")
    p.add_argument("--eval-messages", default=None,
                   help="Parquet with a messages column (vocabtrim/data/prompts.parquet): the held-out rows instead")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=5e-4, help="the peak: cosine decay to a tenth over the training time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all three stages")
    p.add_argument("--prompts-until", type=float, default=0.2, help="stage 1 ends by this share of the budget")
    p.add_argument("--features-until", type=float, default=0.55, help="stage 2 ends by this share of the budget")
    p.add_argument("--work", required=True, help="a local folder for the rows and the features")
    p.add_argument("--out", required=True)
    p.add_argument("--save-rows", default=None, help="also write the training conversations here (Parquet)")
    a = p.parse_args()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(a.threads)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on a GPU; float32 weights
    log(t0, f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if cuda else 'cpu'}")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(a.target)
    model = load_model(a.target, dtype="float32", device=device)
    log(t0, "target loaded")
    init = e3.load_eagle3(a.init, target_vocab=model.config.vocab_size, target_hidden=model.config.hidden_size, dtype=torch.float32)
    draft_ids = [int(i) for i in init.token_ids]
    layers = tuple(init.feature_layers(model.config.num_hidden_layers))

    # 1. prompts
    rows_path = work / "rows.parquet"
    rows = make_rows(a, model, tokenizer, t0, t0 + a.prompts_until * a.budget)
    rows_table = pa.Table.from_pylist(rows)
    write_if_changed(rows_table, rows_path, row_group_size=max(1, len(rows)), compression="zstd")
    if a.save_rows:
        pq.write_table(rows_table, a.save_rows, compression="zstd")
    origins = {o: sum(r["origin"] == o for r in rows) for o in ("base", "self", "self-2")}
    log(t0, f"rows: {len(rows)} {origins}")

    # 2. features
    shards = corpus.make_shards([str(rows_path)], "messages", 16 << 20, a.shard_rows, messages=True)
    ledger = train.FeatureLedger(str(work / "drafter" / "features"))
    spec = train.ExtractorSpec(target=a.target, source="target", text_column="messages", feature_layers=layers,
                               max_length=a.max_length, max_new_tokens=a.max_new_tokens, temperature=0.0, seed=a.seed,
                               dtype="float32", trust_remote_code=False, threads=a.threads, use_gpu=cuda, batch_rows=a.shard_rows)
    extractor = train.FeatureExtractor(spec)  # each conversation in the chat template: calibrate.batch_prompts
    extractor.pid()
    eval_by_kind: dict[str, list[str]] = {}
    if a.eval_messages:
        table = pq.read_table(a.eval_messages).to_pylist()
        for kind in sorted({r.get("kind") or "all" for r in table}):
            path = work / f"eval-{kind}.parquet"
            write_if_changed(pa.table({"messages": [plain_turns(r["messages"]) for r in table if (r.get("kind") or "all") == kind]}), path)
            for s in corpus.make_shards([str(path)], "messages", 16 << 20, a.shard_rows, messages=True):
                if not ledger.done(s.shard_id):  # a rerun in the same --work reuses them
                    ledger.record(extractor.extract(s))
                eval_by_kind.setdefault(kind, []).append(s.shard_id)
        log(t0, f"features of the {len(table)} evaluation conversations: {sum(map(len, eval_by_kind.values()))} shards")
    eval_ids = [i for ids in eval_by_kind.values() for i in ids]
    done_ids, tokens = [], 0
    for s in shards:
        if time.perf_counter() > t0 + a.features_until * a.budget:
            break
        if not ledger.done(s.shard_id):
            ledger.record(extractor.extract(s))
        done_ids.append(s.shard_id)
        with safe_open(ledger.path(s.shard_id), "pt") as f:  # the header only
            tokens += int(f.metadata()["tokens"])
        log(t0, f"features: {len(done_ids)}/{len(shards)} shards, {tokens} tokens")
    del extractor
    if cuda:
        torch.cuda.empty_cache()
    if eval_ids:
        train_ids = done_ids
    else:
        n_eval = max(1, int(len(done_ids) * a.held_out))
        train_ids, eval_ids = done_ids[:-n_eval], done_ids[-n_eval:]

    # 3. training
    cfg = train.TrainConfig(target=a.target, corpus=[str(rows_path)], histogram=None, top_k=None, init=str(a.init),
                            out=str(work / "drafter"), source="target", epochs=a.epochs, learning_rate=a.learning_rate,
                            batch_size=a.batch_size, ttt_length=3, seed=a.seed, max_length=a.max_length,
                            max_new_tokens=a.max_new_tokens, gpus_per_worker=1.0 if cuda else 0.0)
    # Every run starts from --init's weights with a new optimizer: an earlier run's state in --work (which the
    # trainer would resume: its optimizer moments, epoch and step) is dropped; its features are kept.
    (work / "drafter" / train.STATE_FILE).unlink(missing_ok=True)
    trainer = train.DrafterTrainer(asdict(cfg), draft_ids, layers, train_ids, eval_ids, a.threads)
    trainer.pid()  # the drafter starts as --init's (TrainConfig.init)
    start = trainer.evaluate()
    log(t0, f"held out, starting weights: {json.dumps(start)}")
    start_by_kind = by_kind(trainer, eval_by_kind)
    begin, deadline = time.perf_counter(), t0 + a.budget
    history = []
    for e in range(a.epochs):
        steps = trainer.begin_epoch()
        done = 0
        while time.perf_counter() < deadline:
            share = (time.perf_counter() - begin) / max(1e-9, deadline - begin)
            for g in trainer.opt.param_groups:
                g["lr"] = a.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, share))))
            part = trainer.train_steps(20)
            done += part["steps"]
            if done % 200 == 0 or part["done"]:
                log(t0, f"epoch {e + 1} step {done}/{steps} lr {trainer.opt.param_groups[0]['lr']:.2e} loss {part['loss']:.3f} "
                        f"acceptance {part['train_acceptance']:.3f}")
            if part["done"]:
                break
        record = trainer.end_epoch()
        record["steps_of_epoch"] = [done, steps]
        history.append(record)
        log(t0, f"epoch {e + 1}: {json.dumps(record)}")
        manifest = {
            "kind": train.MANIFEST_KIND, "trained_by": "benchmarks/eagle3_gpu_train.py", "argv": sys.argv[1:],
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "target": a.target,
            "init": Path(a.init).name, "rows": len(rows), "rows_by_origin": origins, "shards": len(shards),
            "shards_extracted": len(done_ids), "train_shards": len(train_ids), "held_out_shards": len(eval_ids),
            "held_out": Path(a.eval_messages).name if a.eval_messages else f"the last {len(eval_ids)} shards",
            "tokens": tokens, "draft_vocab_size": len(draft_ids), "feature_layers": list(layers), "ttt_length": 3,
            "batch_size": a.batch_size, "max_length": a.max_length,
            "learning_rate": f"{a.learning_rate} peak, cosine by training time to a tenth", "held_out_at_start": start, "history": history,
            "held_out_acceptance": record["held_out_acceptance"], "held_out_chain_acceptance": record["held_out_chain_acceptance"],
            "wall_seconds": round(time.perf_counter() - t0, 1), "weights_dtype": "bfloat16",
        }
        if time.perf_counter() >= deadline or e + 1 == a.epochs:
            manifest["held_out_by_kind"] = {"start": start_by_kind, "end": by_kind(trainer, eval_by_kind)}
        e3.save_eagle3(trainer.model, out, dtype=torch.bfloat16,
                       extra_files={"manifest.json": json.dumps(manifest, indent=2).encode()})
        log(t0, f"wrote {out}")
        if time.perf_counter() >= deadline:
            break
    log(t0, "done")


if __name__ == "__main__":
    main()
