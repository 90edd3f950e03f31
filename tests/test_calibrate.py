"""Distributed calibration on a local Ray: exact counts, faults, duplicates, resume, generated sources, errors."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny import TRAINING_TEXT, corpus_rows, count_tokens, make_model, make_tokenizer, save_model
from vocabtrim import corpus, histogram, storage
from vocabtrim.calibrate import (
    CalibrateConfig,
    CounterPool,
    CounterSpec,
    Ledger,
    ShardCount,
    count_shards,
    run_calibrate,
)
from vocabtrim.cli import main as cli
from vocabtrim.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model folder and a corpus of Parquet + JSONL + text files, cut into 24+ shards."""
    root = tmp_path_factory.mktemp("calib")
    tok = make_tokenizer()
    model_dir = save_model(make_model(len(tok), layers=1, seed=5), tok, root / "model")
    rows = corpus_rows(1800, seed=0)
    files = root / "corpus"
    files.mkdir()
    pq.write_table(pa.table({"text": rows[:600]}), files / "a.parquet", row_group_size=50)
    with open(files / "b.jsonl", "w") as f:
        for r in rows[600:1200]:
            f.write(json.dumps({"text": r}) + "\n")
    with open(files / "c.txt", "w") as f:
        f.writelines(r.replace("\n", " ") + "\n" for r in rows[1200:])
    return {"root": root, "model": model_dir, "tok": tok, "corpus": str(files)}


def single_process_count(data) -> np.ndarray:
    """The reference: read each file plainly and count with the tokenizer, no shards, no Ray."""
    tok, files = data["tok"], Path(data["corpus"])
    texts = pq.read_table(files / "a.parquet").column("text").to_pylist()
    texts += [json.loads(line)["text"] for line in open(files / "b.jsonl")]
    texts += open(files / "c.txt").readlines()
    return count_tokens(tok, texts)


SHARD_BYTES = 4000


def config(data, out, **kw) -> CalibrateConfig:
    kw.setdefault("workers", 3)
    kw.setdefault("cpus_per_worker", 0.4)
    kw.setdefault("shard_bytes", SHARD_BYTES)
    kw.setdefault("show_progress", False)
    return CalibrateConfig(drafter=data["model"], corpus=[data["corpus"]], out=str(out), **kw)


def written(out) -> np.ndarray:
    return histogram.load(str(Path(out) / "histogram.parquet"), 300)


def test_three_actors_give_exactly_the_single_process_histogram(ray_local, data, tmp_path):
    m = run_calibrate(config(data, tmp_path / "out"))
    expected = single_process_count(data)
    assert m["shards"] >= 20 and m["shards_counted"] == m["shards"]
    assert np.array_equal(written(tmp_path / "out"), expected)
    assert m["total_tokens"] == int(expected.sum()) and m["rows"] == 1800
    assert m["tokens_per_second"] > 0 and m["histogram_fingerprint"] == histogram.fingerprint(expected)
    assert {Path(f["path"]).name for f in m["files"]} == {"a.parquet", "b.jsonl", "c.txt"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir() if p.suffix == ".npz") == sorted(
        f"{s.shard_id}.npz" for s in corpus.make_shards([data["corpus"]], "text", SHARD_BYTES)
    )


def test_an_actor_killed_mid_run_is_replaced_and_the_histogram_is_still_exact(ray_local, data, tmp_path):
    seen = []

    def kill_one(result, pool):
        seen.append(result.shard_id)
        if len(seen) == 3:
            ray_local.kill(pool.actors[1], no_restart=False)

    m = run_calibrate(config(data, tmp_path / "out"), on_recorded=kill_one)
    assert len(seen) == m["shards"] and m["actor_replacements"] >= 1
    assert np.array_equal(written(tmp_path / "out"), single_process_count(data))


def test_a_worker_process_killed_with_sigkill_is_survived_exactly(ray_local, data, tmp_path):
    killed = []

    def sigkill_one(result, pool):
        if not killed:
            pid = ray_local.get(pool.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    m = run_calibrate(config(data, tmp_path / "out"), on_recorded=sigkill_one)
    assert killed and m["actor_replacements"] >= 1
    assert np.array_equal(written(tmp_path / "out"), single_process_count(data))


def test_a_shard_delivered_twice_is_summed_once(ray_local, data, tmp_path):
    shards = corpus.make_shards([data["corpus"]], "text", SHARD_BYTES)
    spec = CounterSpec(source="corpus", tokenizer=data["model"], tokenizer_json=data["tok"]._tokenizer.to_str())
    ledger = Ledger(tmp_path / "shards")
    with CounterPool(spec, 2, cpus_per_worker=0.4) as pool:
        stats = count_shards(pool, shards + shards[:5], ledger)  # five shards counted twice
    assert stats.duplicate_deliveries == 5 and stats.shards == len(shards)
    counts, entries = ledger.reduce([s.shard_id for s in shards + shards[:5]], 300)
    assert len(entries) == len(shards)
    assert np.array_equal(counts, single_process_count(data))


def test_ledger_entries_are_written_beside_the_pool_and_a_failed_write_ends_the_run(ray_local, data, tmp_path):
    """On an object store an entry is an upload and a copy: ``count_shards`` writes up to ``Ledger.WRITERS`` at once.
    A shard counts once its entry is written; a write that fails ends the run with its error, and the writes under
    way end whole (the rerun skips them)."""
    import threading
    import time

    shards = corpus.make_shards([data["corpus"]], "text", SHARD_BYTES)
    spec = CounterSpec(source="corpus", tokenizer=data["model"], tokenizer_json=data["tok"]._tokenizer.to_str())
    lock = threading.Lock()
    under_way: list[str] = []
    most = [0]

    class SlowLedger(Ledger):
        fail: str | None = None

        def record(self, result):
            with lock:
                under_way.append(result.shard_id)
                most[0] = max(most[0], len(under_way))
            try:
                time.sleep(0.2)
                if result.shard_id == self.fail:
                    raise OSError("AWS Error SLOW_DOWN during PutObject")
                return super().record(result)
            finally:
                with lock:
                    under_way.remove(result.shard_id)

    ledger = SlowLedger(tmp_path / "a")
    seen = []
    with CounterPool(spec, 2, cpus_per_worker=0.4) as pool:
        stats = count_shards(pool, shards, ledger, on_recorded=lambda result, pool: seen.append(
            (tmp_path / "a" / f"{result.shard_id}.npz").exists()))
    assert most[0] > 1 and stats.shards == len(shards) == len(seen) and all(seen)
    counts, _ = ledger.reduce([s.shard_id for s in shards], 300)
    assert np.array_equal(counts, single_process_count(data))

    failing = SlowLedger(tmp_path / "b")
    failing.fail = shards[3].shard_id
    with CounterPool(spec, 2, cpus_per_worker=0.4) as pool:
        with pytest.raises(OSError, match="SLOW_DOWN"):
            count_shards(pool, shards, failing)
    assert not under_way  # no write left running
    names = sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix == ".npz")
    assert f"{shards[3].shard_id}.npz" not in names and len(names) < len(shards)
    for name in names:  # each whole
        failing.read(name[: -len(".npz")])


def test_the_ledger_keeps_one_entry_per_shard_id(tmp_path):
    ledger = Ledger(tmp_path)
    one = ShardCount("s-1", "f", np.array([3]), np.array([2]), rows=1, skipped_rows=0, tokens=2)
    assert ledger.record(one) is True
    assert ledger.record(ShardCount("s-1", "f", np.array([3]), np.array([99]), 1, 0, 99)) is False
    counts, _ = ledger.reduce(["s-1", "s-1"], 5)
    assert counts.tolist() == [0, 0, 0, 2, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["s-1.npz"]  # no temporary files left


def test_a_ledger_entry_is_the_users_to_delete_only_when_it_is_damaged(tmp_path, monkeypatch):
    """A damaged entry is one line telling the user to delete it; a dropped connection while reading a good one is
    a fault of the machine (retried), never advice to delete counted work."""
    from vocabtrim import storage

    ledger = Ledger(tmp_path)
    ledger.record(ShardCount("s-1", "f", np.array([3]), np.array([2]), rows=1, skipped_rows=0, tokens=2))
    ledger.record(ShardCount("s-2", "f", np.array([3]), np.array([2]), rows=1, skipped_rows=0, tokens=2))
    (tmp_path / "s-2.npz").write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"s-2\.npz is unreadable .*: delete it and rerun"):
        ledger.read("s-2")

    def dropped(where):
        raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(storage, "read_bytes", dropped)
    with pytest.raises(ConnectionResetError):
        ledger.read("s-1")


def test_recording_a_shard_asks_the_store_nothing(tmp_path, monkeypatch):
    """The ledger knows its entries (one listing when it opens, then those it writes): recording a shard is one
    write, with no lookup before it (a round trip per shard on an object store), and a second delivery is still
    dropped, by this ledger and by one opened later on the same folder."""
    def lookup(*args):
        raise AssertionError("the store was asked")

    ledger = Ledger(tmp_path)
    monkeypatch.setattr(storage, "is_file", lookup)
    monkeypatch.setattr(storage, "exists", lookup)
    monkeypatch.setattr(storage, "_info", lookup)
    assert ledger.record(ShardCount("s-1", "f", np.array([3]), np.array([2]), rows=1, skipped_rows=0, tokens=2)) is True
    assert ledger.record(ShardCount("s-1", "f", np.array([3]), np.array([99]), 1, 0, 99)) is False
    again = Ledger(tmp_path)
    assert again.done("s-1") and not again.done("s-2")
    assert again.record(ShardCount("s-1", "f", np.array([3]), np.array([99]), 1, 0, 99)) is False
    assert again.record(ShardCount("s-2", "f", np.array([4]), np.array([5]), 1, 0, 5)) is True
    assert again.reduce(["s-1", "s-2", "s-1"], 5)[0].tolist() == [0, 0, 0, 2, 5]


def test_the_reducer_reads_entries_at_once_and_sums_them_in_shard_order(tmp_path, monkeypatch):
    """Entries are read ``Ledger.READ_THREADS`` at a time (the first 8 reads wait for each other here: read one by one,
    the first would wait alone), and summed in shard order: the histogram and the entries are those of a read one
    by one; a damaged entry is still one line, a dropped connection still a fault."""
    import threading

    ledger = Ledger(tmp_path)
    ids = [f"s-{i}" for i in range(50)]
    rng = np.random.default_rng(0)
    expected = np.zeros(300, dtype=np.int64)
    for i, shard_id in enumerate(ids):
        counts = rng.integers(1, 9, size=300)
        expected += counts
        ledger.record(ShardCount(shard_id, f"file-{i % 3}", np.arange(300), counts, rows=i, skipped_rows=0, tokens=int(counts.sum())))
    read_bytes, together = storage.read_bytes, threading.Barrier(8, timeout=20)
    reads = []

    def read_at_once(where):
        reads.append(where)
        if len(reads) <= 8:
            together.wait()
        return read_bytes(where)

    monkeypatch.setattr(storage, "read_bytes", read_at_once)
    counts, entries = ledger.reduce(list(reversed(ids)) + ids[:5], 300)
    assert np.array_equal(counts, expected) and len(reads) == 50
    assert [e.shard_id for e in entries] == list(reversed(ids)) and [e.rows for e in entries] == list(reversed(range(50)))
    (tmp_path / "s-30.npz").write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"s-30\.npz is unreadable .*: delete it and rerun"):
        ledger.reduce(ids, 300)

    def dropped(where):
        if where.endswith("s-7.npz"):
            raise ConnectionResetError("Connection reset by peer")
        return read_bytes(where)

    monkeypatch.setattr(storage, "read_bytes", dropped)
    with pytest.raises(ConnectionResetError):
        ledger.reduce(ids[:20], 300)


def test_the_ledger_is_claimed_for_one_set_of_settings(tmp_path):
    """``Ledger.claim`` is ``storage.claim``: the same settings resume, other settings and unrecorded entries are refused."""
    ledger = Ledger(tmp_path / "shards")
    ledger.claim({"source": "corpus", "seed": 0})
    ledger.claim({"source": "corpus", "seed": 0})
    with pytest.raises(UserError, match=r"shards holds counts made with other settings \(seed 0 now 1\)"):
        ledger.claim({"source": "corpus", "seed": 1})
    orphan = Ledger(tmp_path / "orphan")
    orphan.record(ShardCount("s-1", "f", np.array([3]), np.array([2]), rows=1, skipped_rows=0, tokens=2))
    with pytest.raises(UserError, match=r"already holds files \(s-1.npz\) but no _run.json"):
        orphan.claim({"source": "corpus"})


def test_a_stopped_run_resumes_without_recounting_finished_shards(ray_local, data, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_five(result, pool):
        if len(list((tmp_path / "out" / "shards").glob("*.npz"))) >= 5:
            raise Stop

    with pytest.raises(Stop):
        run_calibrate(config(data, tmp_path / "out"), on_recorded=stop_after_five)
    assert not (tmp_path / "out" / "histogram.parquet").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards").glob("*.npz")}
    assert 5 <= len(before) < 5 + Ledger.WRITERS  # the writes under way at the stop end whole
    partial = [tmp_path / "out" / ".histogram.parquet.k3j2x9ab.tmp", tmp_path / "out" / "shards" / ".f-00001.npz.0123abcd.tmp"]
    for p in partial:  # what a run killed while it wrote leaves
        p.write_bytes(b"x")
    m = run_calibrate(config(data, tmp_path / "out", workers=2))
    assert not any(p.exists() for p in partial)
    assert m["shards_resumed"] == len(before) and m["shards_counted"] == m["shards"] - len(before)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards").glob("*.npz")}
    assert all(after[name] == t for name, t in before.items())  # finished shards were not rewritten
    assert np.array_equal(written(tmp_path / "out"), single_process_count(data))
    again = run_calibrate(config(data, tmp_path / "out"))  # everything done: no Ray work at all
    assert again["shards_counted"] == 0 and again["total_tokens"] == m["total_tokens"]


def test_a_rerun_given_more_files_and_stopped_leaves_no_manifest_of_fewer(ray_local, data, tmp_path):
    """The manifest is written last and describes every file its run was given: a rerun into the same --out with
    another file, stopped half way, removes the earlier run's manifest first, so build-head finds no calibration
    rather than the smaller corpus's; run again, it completes over both."""
    from dataclasses import replace

    class Stop(Exception):
        pass

    def stop(result, pool):
        raise Stop

    out = tmp_path / "out"
    first = replace(config(data, out, workers=1), corpus=[str(Path(data["corpus"]) / "a.parquet")])
    run_calibrate(first)
    more = replace(first, corpus=[*first.corpus, str(Path(data["corpus"]) / "b.jsonl")])
    with pytest.raises(Stop):
        run_calibrate(more, on_recorded=stop)
    assert (out / "histogram.parquet").exists() and not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="no calibration in .* \\(no manifest.json\\): run `vocabtrim calibrate"):
        histogram.read_manifest(str(out))
    assert run_calibrate(more)["shards_resumed"] > 0 and (out / "manifest.json").exists()


def test_a_rerun_with_other_settings_is_refused(ray_local, data, tmp_path):
    run_calibrate(config(data, tmp_path / "out"))
    with pytest.raises(UserError, match="shards holds counts made with other settings \\(source 'corpus' now 'drafter'[;)]"):
        run_calibrate(config(data, tmp_path / "out", source="drafter"))


def test_corpus_and_out_on_s3_give_the_exact_histogram_and_resume(ray_local, s3, data, tmp_path):
    bucket = s3.bucket()
    for f in sorted(Path(data["corpus"]).iterdir()):
        storage.write_bytes(f"{bucket}/corpus/{f.name}", f.read_bytes())
    out = f"{bucket}/runs/calib"
    m = run_calibrate(CalibrateConfig(
        drafter=data["model"], corpus=[f"{bucket}/corpus"], out=out, workers=2, cpus_per_worker=0.4,
        shard_bytes=SHARD_BYTES, show_progress=False))
    expected = single_process_count(data)
    assert np.array_equal(histogram.load(out + "/histogram.parquet", 300), expected)
    assert json.loads(storage.read_text(out + "/manifest.json")) == m
    assert {f["path"] for f in m["files"]} == {f"{bucket}/corpus/{n}" for n in ("a.parquet", "b.jsonl", "c.txt")}
    entries = [f for f in storage.walk_files(out + "/shards") if f.endswith(".npz")]
    assert len(entries) == m["shards"] == m["shards_counted"]
    storage.delete(entries[0])  # as if the run had stopped before that shard was recorded
    again = run_calibrate(CalibrateConfig(
        drafter=data["model"], corpus=[f"{bucket}/corpus"], out=out, workers=1, cpus_per_worker=0.4,
        shard_bytes=SHARD_BYTES, show_progress=False))
    assert again["shards_counted"] == 1 and again["shards_resumed"] == m["shards"] - 1
    assert np.array_equal(histogram.load(out + "/histogram.parquet", 300), expected)


def test_an_out_with_a_query_string_is_shown_without_it(ray_local, s3, data, capsys):
    """The query of an object-store location (endpoints, keys) is used but never printed."""
    import io

    bucket, host = s3.bucket(), s3.endpoint.removeprefix("http://")
    query = f"?endpoint_override={host}&scheme=http"
    storage.write_bytes(f"{bucket}/corpus/c.txt{query}", "\n".join(corpus_rows(40, seed=3)).encode())
    code = cli(["calibrate", "--drafter", data["model"], "--corpus", data["corpus"], f"{bucket}/corpus{query}", "--out",
                f"{bucket}/calib{query}", "--workers", "1", "--cpus-per-worker", "0.4", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0 and storage.exists(f"{bucket}/calib/histogram.parquet")
    assert f"wrote {bucket}/calib/histogram.parquet and {bucket}/calib/manifest.json" in printed.out, printed.out
    assert host not in printed.out + printed.err
    written = storage.walk_files(f"{bucket}/calib{query}")  # nor is it written down: manifest, run record, ledger entries
    assert any(storage.name(p).endswith(".npz") for p in written)
    for path in written:
        raw = storage.read_bytes(path)
        if storage.name(path).endswith(".npz"):
            with np.load(io.BytesIO(raw)) as entry:
                raw = str(entry["meta"]).encode()
        assert host.encode() not in raw, storage.display(path)


@pytest.mark.parametrize("chat_template, wrapped", [("auto", True), ("never", False)])
def test_generated_source_counts_exactly_the_tokens_the_model_generates(ray_local, data, tmp_path, chat_template, wrapped):
    """Each row is a prompt, a user message in the chat template unless --chat-template never says raw."""
    from vocabtrim.models import load_model
    from vocabtrim.engine.sampling import SamplingParams, row_seed
    from vocabtrim.engine import make_engine

    prompts = [t.split("\n")[0] for t in TRAINING_TEXT[:8]] * 3
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": prompts}), path, row_group_size=5)
    cfg = CalibrateConfig(
        drafter=data["model"], corpus=[str(path)], out=str(tmp_path / "out"), source="drafter",
        max_new_tokens=6, temperature=1.0, seed=11, workers=2, cpus_per_worker=0.4, batch_size=3, show_progress=False,
        chat_template=chat_template,
    )
    m = run_calibrate(cfg)

    tok = data["tok"]
    model = load_model(data["model"], device="cpu")
    engine = make_engine(model, sampling=SamplingParams(temperature=1.0), eos_token_ids=(tok.eos_token_id,), max_new_tokens=6)
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    chats = chats if wrapped else prompts
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chats]
    outs = engine.generate(ids, [row_seed(11, f"prompts.parquet:{i}") for i in range(len(prompts))])
    expected = np.bincount(np.concatenate([np.asarray(o.token_ids, dtype=np.int64) for o in outs]), minlength=len(tok))
    assert np.array_equal(written(tmp_path / "out"), expected)
    assert m["total_tokens"] == sum(len(o.token_ids) for o in outs) <= 6 * len(prompts)
    assert m["source"] == "drafter" and m["rows"] == len(prompts) and m["shards"] == 5
    assert (m["chat_template"], m["prompts_wrapped"]) == (chat_template, wrapped)


def test_batch_prompts_keeps_the_rows_that_are_prompts_with_their_keys(data):
    """Strings and conversations are prompts; blank, non-text and malformed rows are left out with their keys.
    Without the chat template (--chat-template never) strings go raw and conversations are left out, as in a
    JSONL file whose first row is a string and a later one a list."""
    from vocabtrim.calibrate import batch_prompts

    tok = data["tok"]
    chat = [{"role": "user", "content": "the cat"}]
    texts = ["the dog", "  ", None, chat, [], 7, [{"role": "user", "content": None}]]
    keys = [f"f:{i}" for i in range(len(texts))]

    def enc(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    wrapped, wrapped_keys = batch_prompts(tok, texts, keys, 1000, wrap=True)
    assert wrapped_keys == ["f:0", "f:3"]
    assert wrapped == [enc(tok.apply_chat_template([{"role": "user", "content": "the dog"}], add_generation_prompt=True, tokenize=False)),
                       enc(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))]
    raw, raw_keys = batch_prompts(tok, texts, keys, 1000, wrap=False)
    assert (raw, raw_keys) == ([enc("the dog")], ["f:0"])
    assert batch_prompts(tok, [None, ""], ["a", "b"], 1000) == ([], [])


def test_a_txt_lines_break_ends_the_line_not_the_prompt(data, tmp_path, monkeypatch):
    """Generated sources on a .txt corpus: each line is a prompt without its line break, so the target answers what
    it answers to the same rows in a Parquet file (greedy: the same counts), not those rows with a newline at the end
    (which it answers otherwise)."""
    import torch

    from vocabtrim.calibrate import ShardCounter

    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # the counter sets both for its process: restored after the test
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rows = ["the quick brown fox", "a cat sat on the mat", "the dog and the bird"]
    (tmp_path / "p.txt").write_bytes(b"the quick brown fox\na cat sat on the mat\r\nthe dog and the bird\n")
    pq.write_table(pa.table({"text": rows}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": [r + "\n" for r in rows]}), tmp_path / "newlines.parquet")
    counter = ShardCounter(CounterSpec(source="target", tokenizer=data["model"], model=data["model"], max_new_tokens=8,
                                       temperature=0.0, threads=torch.get_num_threads()))

    def counts(name):
        (shard,) = corpus.make_shards([str(tmp_path / name)])
        got = counter.count(shard)
        assert got.rows == 3
        return dict(zip(got.ids.tolist(), got.counts.tolist()))

    assert counts("p.txt") == counts("p.parquet") != counts("newlines.parquet")


def test_raw_prompts_are_encoded_as_generate_encodes_them_and_empty_ones_are_skipped(data):
    """Without the chat template a string prompt gets the special tokens its tokenizer adds (a BOS here), exactly as
    generate encodes it, also when cut to the limit (its start kept); a row that encodes to no token is left out,
    not sent to the engine (which refuses an empty prompt and would end the run)."""
    import copy

    from tokenizers import normalizers, processors

    from vocabtrim.calibrate import batch_prompts, build_prompt
    from vocabtrim.prompts import encode_prompt

    dropping = copy.deepcopy(data["tok"])
    dropping._tokenizer.normalizer = normalizers.Replace("\x01", "")  # a character the tokenizer drops
    assert batch_prompts(dropping, ["the dog", "\x01"], ["f:0", "f:1"], 1000, wrap=False)[1] == ["f:0"]
    tok = copy.deepcopy(data["tok"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                                  special_tokens=[(tok.bos_token, tok.bos_token_id)])
    raw, keys = batch_prompts(tok, ["the dog", "a cat"], ["f:0", "f:1"], 1000, wrap=False)
    assert raw == [encode_prompt(t, tok, 1000)[0] for t in ("the dog", "a cat")] and raw[0][0] == tok.bos_token_id
    cut = build_prompt(tok, "the quick brown fox jumps over the lazy dog", 6, wrap=False)
    assert len(cut) <= 6 and cut[0] == tok.bos_token_id and tok.decode(cut[1:]).startswith("the")


def test_prompts_follow_the_generating_models_template_and_its_context_before_ray(data, tmp_path):
    """--source target with a base drafter (no chat template) and an instruct target (the same tokenizer with one):
    prompts are built with the target's template, as generate builds them. A --max-new-tokens that leaves no room
    for a prompt in the generating model's context is refused before Ray starts. A run on GPUs is keyed apart from
    a CPU run (other floats; --dtype auto another dtype): an interrupted one does not resume as the other."""
    import shutil
    from dataclasses import replace

    from transformers import AutoConfig

    from vocabtrim.calibrate import plan

    base = tmp_path / "base"
    shutil.copytree(data["model"], base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    for f in base.glob("chat_template.*"):
        f.unlink()
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["the dog", "a cat"]}), prompts)
    cfg = CalibrateConfig(drafter=str(base), target=data["model"], corpus=[str(prompts)], out=str(tmp_path / "out"), source="target",
                          max_new_tokens=4, show_progress=False)
    p = plan(cfg)
    assert p.spec.wrap_prompts and p.spec.tokenizer == data["model"] and "device" not in p.run_key
    assert not plan(replace(cfg, source="drafter")).spec.wrap_prompts  # the base drafter generates: no template
    assert plan(replace(cfg, gpus_per_worker=1)).run_key["device"] == "cuda"
    context = AutoConfig.from_pretrained(data["model"]).max_position_embeddings
    with pytest.raises(UserError, match=f"--max-new-tokens {context} leaves no room for a prompt in {data['model']}'s context of "
                                        f"{context} tokens"):
        plan(replace(cfg, max_new_tokens=context))


def test_generated_counts_are_keyed_by_the_chat_template_prompts_go_through(data, tmp_path):
    """The hash of the generating model's chat template is in the ledger's run key (the tokenizer's fingerprint leaves
    it out): counts made under another template are refused, not summed in. The key is absent where no template is
    used (--chat-template never, --source corpus), and a ledger recorded by an earlier vocabtrim without it resumes."""
    import shutil
    from dataclasses import replace

    from transformers import AutoTokenizer

    from vocabtrim.calibrate import plan

    model = tmp_path / "model"
    shutil.copytree(data["model"], model)
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["the dog", "a cat"]}), prompts)
    cfg = CalibrateConfig(drafter=str(model), corpus=[str(prompts)], out=str(tmp_path / "out"), source="drafter", max_new_tokens=4,
                          show_progress=False)
    key = plan(cfg).run_key
    assert len(key["chat_template_sha256"]) == 24
    assert "chat_template_sha256" not in plan(replace(cfg, chat_template="never")).run_key
    assert "chat_template_sha256" not in plan(replace(cfg, source="corpus")).run_key
    ledger = Ledger(tmp_path / "shards")
    ledger.claim(key)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "System: be brief.\n" + tok.chat_template
    tok.save_pretrained(model)
    changed = plan(cfg).run_key
    assert changed["chat_template_sha256"] != key["chat_template_sha256"]
    with pytest.raises(UserError, match=r"shards holds counts made with other settings \(chat_template_sha256 "):
        ledger.claim(changed)
    earlier = {k: v for k, v in key.items() if k != "chat_template_sha256"}
    (tmp_path / "shards" / "_run.json").write_text(json.dumps(earlier))
    ledger.claim(changed)  # an earlier vocabtrim's record: the template was not recorded, the rest still binds
    assert json.loads((tmp_path / "shards" / "_run.json").read_text()) == changed  # and it is recorded from here on
    with pytest.raises(UserError, match=r"other settings \(chat_template_sha256 "):
        ledger.claim(key)
    with pytest.raises(UserError, match=r"other settings \(seed 0 now 1\)"):
        ledger.claim({**changed, "seed": 1})


def test_generated_source_reads_message_lists_through_the_chat_template(ray_local, data, tmp_path):
    """A column of {role, content} lists (the prompts files `generate` reads) works as the rows of a generated source:
    each conversation through the chat template with the generation prompt; rows that are no conversation are
    skipped, as blank rows are."""
    from vocabtrim.models import load_model
    from vocabtrim.engine.sampling import SamplingParams, row_seed
    from vocabtrim.engine import make_engine

    firsts = [t.split("\n")[0] for t in TRAINING_TEXT[:8]]
    rows = [[{"role": "user", "content": f}] if i % 2 else
            [{"role": "user", "content": f}, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "and then?"}]
            for i, f in enumerate(firsts)]
    bad = {3: [], 6: [{"role": "user", "content": None}], 9: None}  # no message; no content; null
    column = [bad[i] if i in bad else rows.pop(0) for i in range(len(rows) + len(bad))]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": column}), path, row_group_size=4)
    m = run_calibrate(CalibrateConfig(
        drafter=data["model"], corpus=[str(path)], out=str(tmp_path / "out"), source="drafter", text_column="messages",
        max_new_tokens=6, temperature=1.0, seed=11, workers=2, cpus_per_worker=0.4, batch_size=3, show_progress=False,
    ))

    tok = data["tok"]
    model = load_model(data["model"], device="cpu")
    engine = make_engine(model, sampling=SamplingParams(temperature=1.0), eos_token_ids=(tok.eos_token_id,), max_new_tokens=6)
    good = [i for i in range(len(column)) if i not in bad]
    ids = [tok(tok.apply_chat_template(column[i], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
           for i in good]
    assert all(len(p) > 10 for p in ids)
    outs = engine.generate(ids, [row_seed(11, f"chats.parquet:{i}") for i in good])
    expected = np.bincount(np.concatenate([np.asarray(o.token_ids, dtype=np.int64) for o in outs]), minlength=len(tok))
    assert np.array_equal(written(tmp_path / "out"), expected)
    assert (m["rows"], m["skipped_rows"]) == (len(good), len(bad)) and m["total_tokens"] == sum(len(o.token_ids) for o in outs)


def test_a_corpus_with_no_tokens_is_refused(ray_local, data, tmp_path):
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    cfg = CalibrateConfig(drafter=data["model"], corpus=[str(tmp_path / "blank.jsonl")], out=str(tmp_path / "o"), cpus_per_worker=0.4, show_progress=False)
    with pytest.raises(UserError, match="gave no tokens"):
        run_calibrate(cfg)


def test_a_user_error_found_while_the_workers_start_is_one_line(ray_local, data, tmp_path, capsys):
    """Weights of other shapes than config.json says (each file readable) show only when a worker loads the
    model: the user gets that one line and exit 2, not Ray's traceback of an actor that died starting."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(data["model"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))
    (tmp_path / "p.txt").write_text("hello there\n")
    code = cli(["calibrate", "--drafter", str(model), "--source", "drafter",
                "--corpus", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--workers", "1",
                "--cpus-per-worker", "0.4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot load model" in err, err


def test_damaged_weights_are_refused_before_ray_starts(data, tmp_path, capsys, monkeypatch):
    """A safetensors header that cannot be read is found on the driver (headers only): one line, exit 2, no Ray."""
    import shutil

    from vocabtrim import ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    model = tmp_path / "model"
    shutil.copytree(data["model"], model)
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[100:400] = b"\xab" * 300
    (model / "model.safetensors").write_bytes(bytes(weights))
    (tmp_path / "p.txt").write_text("hello there\n")
    code = cli(["calibrate", "--drafter", str(model), "--source", "drafter", "--corpus", str(tmp_path / "p.txt"),
                "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot load model {model} (weights are read from safetensors or GGUF only): model.safetensors: Error while deserializing header" in err, err


def test_an_out_inside_the_corpus_folder_is_refused(data, tmp_path, capsys):
    """Its histogram and manifest would be read as corpus files on the rerun that should resume."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(data["corpus"], corpus)
    for out in (corpus, corpus / "calib"):
        assert cli(["calibrate", "--drafter", data["model"], "--corpus", str(corpus), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} is inside the corpus folder {corpus}" in err, err
    assert sorted(p.name for p in corpus.iterdir()) == sorted(p.name for p in Path(data["corpus"]).iterdir())


def test_an_out_inside_an_object_store_corpus_folder_is_refused(s3, data, capsys):
    from vocabtrim import storage

    bucket = s3.bucket()
    storage.write_bytes(f"{bucket}/corpus/a.txt", b"hello there\n")
    for out in (f"{bucket}/corpus", f"{bucket}/corpus/calib"):
        assert cli(["calibrate", "--drafter", data["model"], "--corpus", f"{bucket}/corpus", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} is inside the corpus folder {bucket}/corpus" in err, err
    assert storage.walk_files(bucket) == [f"{bucket}/corpus/a.txt"]


def test_drafter_layers_beyond_the_model_are_refused_for_every_source(data, tmp_path, capsys):
    """The manifest records --drafter-layers and build-head builds that drafter: it must exist, whatever the source
    (it was accepted with --source corpus, exit 0)."""
    for source in ("corpus", "drafter"):
        code = cli(["calibrate", "--drafter", data["model"], "--drafter-layers", "5", "--source", source,
                    "--corpus", data["corpus"], "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "--drafter-layers must be between 1 and 1, got 5" in err, err
        assert not (tmp_path / "o").exists()


# These fail before Ray starts: no ray_local fixture needed.


@pytest.mark.parametrize(
    "setup, extra, match",
    [
        (lambda d: pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "e.parquet"), [], "the corpus is empty"),
        (lambda d: (d / "e.txt").write_text(""), [], "the corpus is empty"),
        (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "e.parquet"), [], "no column 'text'"),
        (lambda d: (d / "e.jsonl").write_text('{"body": "x"}\n'), [], "no key 'text'"),
        (lambda d: (d / "e.parquet").write_bytes(b"\x00garbage"), [], "cannot read Parquet file"),
        (lambda d: (d / "e.txt").write_text("x\n"), ["--source", "target"], "--source target needs --target"),
        (lambda d: (d / "e.txt").write_text("x\n"), ["--workers", "0"], "--workers must be >= 1"),
        (lambda d: pq.write_table(pa.table({"m": [[{"role": "user", "content": "hi"}]]}), d / "e.parquet"), ["--text-column", "m"],
         "column 'm' is list<element: struct<role: string, content: string>>, not text; message lists are read only where rows are "
         "prompts (a generated --source)"),
        (lambda d: pq.write_table(pa.table({"m": [[{"role": "user", "content": "hi"}]]}), d / "e.parquet"),
         ["--text-column", "m", "--source", "drafter", "--chat-template", "never"],
         "holds message lists in 'm', which need the chat template: drop --chat-template never"),
    ],
)
def test_cli_refuses_bad_input_with_exit_2_and_one_line(data, tmp_path, capsys, setup, extra, match):
    (tmp_path / "in").mkdir()
    setup(tmp_path / "in")
    code = cli(["calibrate", "--drafter", data["model"], "--corpus", str(tmp_path / "in"), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("source", ["target", "corpus", "drafter"])
def test_a_target_with_another_logits_width_is_refused_before_anything_runs(data, tmp_path, capsys, source):
    """A target whose tokenizer is the drafter's but whose head has 20 more rows: one line, exit 2, no --out (with
    --source target the histogram would count ids the drafter cannot keep; with the others the pair is wrong)."""
    tok = data["tok"]
    wide = save_model(make_model(len(tok) + 20, layers=1, seed=6), tok, tmp_path / "wide")
    capsys.readouterr()
    code = cli(["calibrate", "--drafter", data["model"], "--target", wide, "--source", source, "--corpus", data["corpus"],
                "--max-new-tokens", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"target and drafter logits widths differ: {len(tok) + 20} vs {len(tok)}" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["calibrate", "build-head"])
@pytest.mark.parametrize("found", ["vocabtrim-head", "vocabtrim-histogram", "vocabtrim-eagle3-train", None])
def test_another_commands_out_folder_is_refused_not_overwritten(ray_local, data, tmp_path, capsys, command, found):
    """An --out holding another command's manifest.json (or one vocabtrim did not write) is refused in one
    line and left as it was; the command's own kind is its rerun."""
    own = {"calibrate": "vocabtrim-histogram", "build-head": "vocabtrim-head"}[command]
    out = tmp_path / "out"
    out.mkdir()
    manifest = json.dumps({"kind": found} if found else {"name": "someone else's"})
    (out / "manifest.json").write_text(manifest)
    calibrate = ["calibrate", "--drafter", data["model"], "--corpus", data["corpus"], "--workers", "1", "--cpus-per-worker", "0.4",
                 "--no-progress"]
    if command == "calibrate":
        argv = calibrate
    else:
        assert cli([*calibrate, "--out", str(tmp_path / "calib")]) == 0
        argv = ["build-head", "--histogram", str(tmp_path / "calib"), "--drafter", data["model"], "--top-k", "64"]
    capsys.readouterr()
    code = cli([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    if found == own:
        assert code == 0, err
    else:
        assert code == 2 and err.count("\n") == 1 and "it is another command's output; use a new --out" in err, err
        assert (out / "manifest.json").read_text() == manifest


def test_workers_beyond_the_shards_are_neither_started_nor_asked_of_the_cluster(ray_local, data, tmp_path, capsys):
    """One shard to count and --workers 5 of 1 CPU on a 2-CPU Ray: the run is not refused for the 5 the cluster could
    not hold, since only as many workers as shards left are started."""
    (tmp_path / "one.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 5)
    out = tmp_path / "o"
    assert cli(["calibrate", "--drafter", data["model"], "--corpus", str(tmp_path / "one.txt"), "--workers", "5",
                "--cpus-per-worker", "1", "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == 1 and manifest["rows"] == 5


def test_cli_refuses_an_unreadable_file(data, tmp_path, capsys, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("x\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: its read fails here as it does for other users

        def denied(where):
            raise PermissionError(13, "Permission denied", where)

        monkeypatch.setattr(corpus, "_check_text", denied)
    code = cli(["calibrate", "--drafter", data["model"], "--corpus", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot read" in err and "ermission denied" in err, err


@pytest.mark.bundled
def test_bundled_model_end_to_end_calibrate_and_build_head(ray_local, tmp_path, capsys):
    """Both commands on SmolLM2-135M over the shipped prompts; the head loads into its drafter."""
    from importlib.resources import files

    from vocabtrim.head.io import load_head
    from vocabtrim.models import load_drafter

    prompts = str(files("vocabtrim") / "data" / "prompts.parquet")
    calib, head = tmp_path / "calib", tmp_path / "head"
    assert cli(["calibrate", "--drafter", "smollm2-135m", "--corpus", prompts, "--text-column", "prompt",
                "--workers", "2", "--cpus-per-worker", "0.4", "--no-progress", "--out", str(calib)]) == 0
    m = json.loads((calib / "manifest.json").read_text())
    assert m["vocab_size"] == 49152 and m["rows"] == 320 and m["total_tokens"] > 1000
    assert cli(["build-head", "--histogram", str(calib), "--drafter", "smollm2-135m", "--drafter-layers", "4",
                "--top-k", "512", "--export", "sglang,eagle", "--out", str(head)]) == 0
    assert "kept K=512" in capsys.readouterr().out
    drafter, tok = load_drafter("smollm2-135m", 4)
    trimmed = load_head(str(head), drafter_model=drafter, tokenizer=tok)
    assert trimmed.k == 512 and {1, 2} <= set(trimmed.token_ids.tolist())
    # tied embeddings: the head holds copies of the rows
    assert torch_equal_rows(trimmed, drafter)
    other, _ = load_drafter("smollm2-135m", 8)
    with pytest.raises(UserError, match="another drafter \\(num_hidden_layers 4, this drafter 8\\)"):
        load_head(str(head), drafter_model=other, tokenizer=tok)


def torch_equal_rows(trimmed, drafter) -> bool:
    import torch

    emb = drafter.get_input_embeddings().weight.detach()
    return torch.equal(trimmed.weight, emb[trimmed.token_ids]) and trimmed.weight.data_ptr() != emb.data_ptr()
