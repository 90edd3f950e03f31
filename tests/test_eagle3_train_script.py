"""``benchmarks/eagle3_gpu_train.py`` (train-drafter's extractor and trainer in one process, on conversations the
target writes for itself), run on CPU with a tiny target and a tiny EAGLE-3 drafter in SpecForge's layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tiny import make_model, make_tokenizer, save_model, write_specforge_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import eagle3_gpu_train as script  # noqa: E402


def test_user_turns_keep_finished_turns_of_three_words_or_more():
    tok = make_tokenizer(300)
    header = tok.decode(script.header_ids(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    assert header.endswith("<|im_start|>user\n") and "hello" in header and script.MARK not in header

    class Engine:
        def generate(self, prompts, seeds):
            assert len(set(seeds)) == len(seeds) and all(p[-len(end):] == end for p in prompts)
            texts = ["count the ants please", "too short", "this one ran out of room", "write me a poem now"]
            reasons = ["stop", "stop", "length", "stop"]
            return [SimpleNamespace(token_ids=tok(t)["input_ids"], finish_reason=r) for t, r in zip(texts, reasons)]

    end = tok("<|im_start|>user\n")["input_ids"]
    got = script.user_turns(Engine(), tok, [[]] * 4, ["a", "b", "c", "d"], seed=0)
    assert got == ["count the ants please", None, None, "write me a poem now"]


def test_a_rerun_keeps_unchanged_row_files_so_their_shards_keep_their_ids(tmp_path):
    from vocabtrim import corpus

    path = tmp_path / "rows.parquet"
    rows = pa.table({"messages": [[{"role": "user", "content": f"question {i}"}] for i in range(5)]})
    assert script.write_if_changed(rows, path)
    ids = [s.shard_id for s in corpus.make_shards([str(path)], "messages", 1 << 20, 2, messages=True)]
    stamp = path.stat().st_mtime_ns
    assert not script.write_if_changed(pa.table({"messages": rows["messages"].to_pylist()}), path)  # the same rows
    assert path.stat().st_mtime_ns == stamp
    assert [s.shard_id for s in corpus.make_shards([str(path)], "messages", 1 << 20, 2, messages=True)] == ids
    assert script.write_if_changed(rows.slice(1), path)  # other rows: written, and new ids
    assert not set(s.shard_id for s in corpus.make_shards([str(path)], "messages", 1 << 20, 2, messages=True)) & set(ids)
    path.write_bytes(b"not parquet")
    assert script.write_if_changed(rows, path) and pq.read_table(path).equals(rows)


def test_trains_a_drafter_on_target_written_conversations_and_measures_it_on_the_given_prompts(tmp_path):
    tok = make_tokenizer(300)
    V = len(tok)
    target = make_model(V, layers=4, hidden=64, max_positions=512)
    tdir = save_model(target, tok, tmp_path / "target")
    init = write_specforge_checkpoint(tmp_path / "e3", target, list(range(0, V, 2)) + [1], seed=3)
    shipped = pq.read_table(ROOT / "vocabtrim" / "data" / "prompts.parquet").to_pylist()
    base = [f"tell me about item {i} and the sea" for i in range(11)] + [shipped[0]["prompt"]]
    pq.write_table(pa.table({"prompt": base}), tmp_path / "base.parquet")
    pq.write_table(pa.Table.from_pylist(shipped[:6]), tmp_path / "eval.parquet")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eagle3_gpu_train.py"), "--target", tdir, "--init", str(init),
         "--base-prompts", str(tmp_path / "base.parquet"), "--eval-messages", str(tmp_path / "eval.parquet"),
         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--save-rows", str(tmp_path / "rows.parquet"),
         "--self-prompts", "8", "--chunk", "8", "--gen-batch", "8", "--shard-rows", "8", "--max-new-tokens", "12",
         "--max-turn-tokens", "12", "--max-answer-tokens", "12", "--max-length", "48", "--epochs", "2", "--batch-size", "4",
         "--budget", "120", "--prompts-until", "0.1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert sum(r["origin"] == "base" for r in rows) == 11  # the shipped prompt among them is left out
    banned, _ = script.shipped()
    assert all(m["content"].strip().lower() not in banned for r in rows for m in r["messages"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    kinds = sorted({r["kind"] for r in shipped[:6]})
    assert len(kinds) > 1 and manifest["held_out"] == "eval.parquet" and manifest["held_out_shards"] == len(kinds)
    assert manifest["held_out_at_start"]["held_out_tokens"] > 0 and len(manifest["history"]) == 2 and manifest["tokens"] > 0
    assert manifest["history"][-1]["held_out_chain_acceptance"] is not None
    by_kind = manifest["held_out_by_kind"]
    assert sorted(by_kind["start"]) == sorted(by_kind["end"]) == kinds
    assert all(0 <= v["chain_acceptance"] <= 1 for v in by_kind["end"].values())

    # A second run in the same --work (no self-written prompts: its rows are the base ones): the evaluation
    # features are reused, no file rewritten, and the run starts afresh from --init (not from the first run's
    # optimizer, epoch and step).
    evals = {f: f.stat().st_mtime_ns for f in (tmp_path / "work").rglob("eval-*.safetensors")}
    args = dict(zip(proc.args[2::2], proc.args[3::2])) | {"--out": str(tmp_path / "out2"), "--self-prompts": "0", "--epochs": "1"}
    again = subprocess.run(proc.args[:2] + [x for kv in args.items() for x in kv], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(evals) == len(kinds) and {f: f.stat().st_mtime_ns for f in (tmp_path / "work").rglob("eval-*.safetensors")} == evals
    rerun = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert [h["epoch"] for h in rerun["history"]] == [1] and rerun["held_out_at_start"] == manifest["held_out_at_start"]

    from vocabtrim import eagle3 as e3

    before = e3.load_eagle3(init, target_vocab=V, target_hidden=64)
    after = e3.load_eagle3(tmp_path / "out", target_vocab=V, target_hidden=64)
    assert torch.equal(after.token_ids, before.token_ids)  # the starting drafter's draft vocabulary
    # Trained from its weights: it moved (compared at the written precision), but stayed near where it started:
    # each tensor within 20% of its starting norm (moved about 1% here; a fresh start of the same shapes would
    # put its random projections about sqrt(2) of their starting norm away).
    assert not torch.equal(after.fc.weight.float(), before.fc.weight.to(after.fc.weight.dtype).float())
    start, trained = before.state_dict(), after.state_dict()
    moved = {name: float((trained[name].float() - start[name].float()).norm() / start[name].float().norm())
             for name in start if start[name].is_floating_point()}
    assert len(moved) >= 10 and all(m < 0.2 for m in moved.values()), moved
