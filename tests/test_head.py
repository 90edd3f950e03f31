"""Choosing the kept ids, building / saving / loading the trimmed head, and the SGLang / EAGLE exports."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import make_model, make_tokenizer, save_model
from vocabtrim import histogram
from vocabtrim.cli import main as cli
from vocabtrim.errors import UserError
from vocabtrim.head.build import BuildHeadConfig, build_head
from vocabtrim.head.io import load_head
from vocabtrim.head.select import select_ids
from vocabtrim.head.trimmed import head_from_ids
from vocabtrim.models import load_drafter, tokenizer_fingerprint
from vocabtrim.special_tokens import special_token_ids

# ---------------------------------------------------------------------------------------------
# select_ids on a known histogram
# ---------------------------------------------------------------------------------------------

KNOWN = np.array([0, 0, 0, 40, 5, 30, 0, 20, 5, 0], dtype=np.int64)  # total 100; specials below: 0, 2


def test_top_k_keeps_specials_then_the_most_frequent():
    sel = select_ids(KNOWN, top_k=4, special_ids=[0, 2], vocab_size=10)
    assert sel.token_ids.tolist() == [0, 2, 3, 5]
    assert sel.token_ids.dtype == np.int64
    assert sel.k == 4 and sel.k_frequent == 2
    assert sel.coverage == pytest.approx(0.70)


def test_top_k_breaks_ties_by_smaller_id_and_fills_with_unseen_ids():
    sel = select_ids(KNOWN, top_k=5, special_ids=[], vocab_size=10)
    assert sel.token_ids.tolist() == [3, 4, 5, 7, 8]
    # 4 and 8 tie at 5 counts: the smaller id wins the last place
    assert select_ids(KNOWN, top_k=4, special_ids=[], vocab_size=10).token_ids.tolist() == [3, 4, 5, 7]
    sel = select_ids(KNOWN, top_k=8, special_ids=[], vocab_size=10)
    assert sel.token_ids.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]  # 5 seen ids, then unseen 0, 1, 2
    assert sel.k_frequent == 5 and sel.coverage == pytest.approx(1.0)
    assert (sel.k_unseen, sel.distinct_ids) == (3, 5)
    with_specials = select_ids(KNOWN, top_k=8, special_ids=[0, 2], vocab_size=10)  # 0, 2 special; 1, 6, unseen
    assert (with_specials.k_frequent, with_specials.k_unseen) == (5, 1)
    assert select_ids(KNOWN, top_k=5, special_ids=[0, 2], vocab_size=10).k_unseen == 0


@pytest.mark.parametrize(
    "coverage, frequent",
    [(0.40, [3]), (0.41, [3, 5]), (0.70, [3, 5]), (0.90, [3, 5, 7]), (0.95, [3, 4, 5, 7]), (1.0, [3, 4, 5, 7, 8])],
)
def test_coverage_picks_the_smallest_k_reaching_it(coverage, frequent):
    sel = select_ids(KNOWN, coverage=coverage, special_ids=[0, 2], vocab_size=10)
    assert sel.k_frequent == len(frequent)
    assert sel.token_ids.tolist() == sorted(set(frequent) | {0, 2})
    assert sel.coverage >= coverage - 1e-12


def test_special_tokens_are_always_kept_even_when_never_counted():
    tok = make_tokenizer()
    specials = special_token_ids(tok)
    assert {0, 1, 2} <= set(specials)  # <|endoftext|> (unk), <|im_start|> (bos), <|im_end|> (eos = pad)
    counts = np.zeros(len(tok), dtype=np.int64)
    counts[100:200] = np.arange(100, 0, -1)
    for sel in (
        select_ids(counts, top_k=10, special_ids=specials, vocab_size=len(tok)),
        select_ids(counts, coverage=0.05, special_ids=specials, vocab_size=len(tok)),
    ):
        assert set(specials) <= set(sel.token_ids.tolist())
        assert np.all(np.diff(sel.token_ids) > 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=11), "between 1 and the drafter's vocabulary size 10"),
        (dict(top_k=0), "between 1 and"),
        (dict(top_k=1), "smaller than the 2 special tokens"),
        (dict(coverage=0.0), r"in \(0, 1\]"),
        (dict(coverage=1.5), r"in \(0, 1\]"),
        (dict(coverage=-0.2), r"in \(0, 1\]"),
        (dict(coverage=float("nan")), r"in \(0, 1\]"),
        (dict(), "exactly one of"),
        (dict(top_k=3, coverage=0.5), "exactly one of"),
    ],
)
def test_bad_sizes_are_refused_in_one_line(kwargs, match):
    with pytest.raises(UserError, match=match) as info:
        select_ids(KNOWN, special_ids=[0, 2], vocab_size=10, **kwargs)
    assert "\n" not in str(info.value)


def test_empty_histogram_and_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(UserError, match="empty"):
        select_ids(np.zeros(10, dtype=np.int64), top_k=3, vocab_size=10)
    with pytest.raises(UserError, match="token id 12, outside the drafter's vocabulary of 10"):
        select_ids(np.eye(1, 13, 12, dtype=np.int64)[0], top_k=3, vocab_size=10)


def test_head_rows_are_copies_even_with_tied_embeddings():
    model = make_model(64)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    head = head_from_ids(model, [5, 1, 9])
    assert head.token_ids.tolist() == [1, 5, 9]
    assert torch.equal(head.weight, emb.detach()[[1, 5, 9]])
    assert head.weight.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
    with torch.no_grad():
        emb.add_(1.0)
    assert not torch.equal(head.weight, emb.detach()[[1, 5, 9]])


# ---------------------------------------------------------------------------------------------
# build-head on a tiny drafter
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(drafter folder, calibration folder, counts): a tiny drafter and a hand-made calibration."""
    root = tmp_path_factory.mktemp("head")
    tok = make_tokenizer()
    drafter = save_model(make_model(len(tok), layers=2, seed=3), tok, root / "drafter")
    rng = np.random.default_rng(0)
    counts = np.zeros(len(tok), dtype=np.int64)
    counts[3:] = rng.zipf(1.3, size=len(tok) - 3).clip(max=10_000)
    counts[rng.choice(np.arange(3, len(tok)), 60, replace=False)] = 0
    calib = write_calibration(root / "calib", counts, tok)
    return drafter, calib, counts


def write_calibration(folder: Path, counts, tok) -> str:
    folder.mkdir(parents=True)
    histogram.save(counts, str(folder / "histogram.parquet"))
    manifest = {"kind": "vocabtrim-histogram", "version": 1, "tokenizer_fingerprint": tokenizer_fingerprint(tok), "source": "corpus"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_build_head_writes_head_manifest_plot_and_exports(tiny, tmp_path):
    drafter, calib, counts = tiny
    out = tmp_path / "head"
    m = build_head(BuildHeadConfig(histogram=calib, drafter=drafter, top_k=64, export=["sglang", "eagle"], out=str(out)))
    model, tok = load_drafter(drafter)
    tensors = load_file(str(out / "head.safetensors"))
    ids = tensors["token_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (64,) and bool((ids[1:] > ids[:-1]).all())
    assert {0, 1, 2} <= set(ids.tolist())
    assert torch.equal(tensors["weight"], model.lm_head.weight.detach()[ids])
    assert "bias" not in tensors
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert m["k"] == 64 and m["vocab_size"] == len(tok)
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert m["histogram_fingerprint"] == histogram.fingerprint(counts)
    assert m["coverage"] == pytest.approx(counts[ids.numpy()].sum() / counts.sum())
    assert (out / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # SGLang reads --speculative-token-map like this (eagle_worker.load_token_map):
    hot = torch.tensor(torch.load(out / "sglang_token_map.pt", weights_only=True), dtype=torch.int32)
    assert hot.tolist() == ids.tolist()
    # EAGLE-3 checkpoints: draft id i is target id i + d2t[i]; t2d marks the kept target ids.
    maps = load_file(str(out / "eagle_d2t.safetensors"))
    assert maps["d2t"].dtype == torch.int64 and maps["t2d"].dtype == torch.bool
    assert (maps["d2t"] + torch.arange(maps["d2t"].shape[0])).tolist() == ids.tolist()
    assert maps["t2d"].shape == (len(tok),) and maps["t2d"].nonzero().flatten().tolist() == ids.tolist()
    # A rebuild into the same folder with another K and one export: the other export's file, which maps the
    # earlier vocabulary, is removed.
    again = build_head(BuildHeadConfig(histogram=calib, drafter=drafter, top_k=20, export=["eagle"], out=str(out)))
    assert again["exports"] == {"eagle": "eagle_d2t.safetensors"} and not (out / "sglang_token_map.pt").exists()
    assert load_file(str(out / "eagle_d2t.safetensors"))["d2t"].shape == (20,)


def test_coverage_mode_and_the_cli(tiny, tmp_path, capsys):
    drafter, calib, counts = tiny
    out = tmp_path / "h"
    assert cli(["build-head", "--histogram", calib, "--drafter", drafter, "--coverage", "0.9", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["coverage"] >= 0.9 and m["exports"] == {}
    curve = histogram.coverage_curve(counts)
    assert m["k_frequent"] == int(np.searchsorted(curve, 0.9) + 1)
    assert "coverage" in capsys.readouterr().out


def test_a_top_k_beyond_the_counted_ids_says_how_many_were_never_seen(tiny, tmp_path, capsys):
    drafter, calib, counts = tiny
    distinct = int(np.count_nonzero(counts))
    k = distinct + 40
    assert cli(["build-head", "--histogram", calib, "--drafter", drafter, "--top-k", str(k), "--out", str(tmp_path / "h")]) == 0
    captured = capsys.readouterr()
    m = json.loads((tmp_path / "h" / "manifest.json").read_text())
    specials = 3  # the tiny tokenizer's <|endoftext|>, <|im_start|>, <|im_end|>, never counted here
    assert (m["k"], m["k_frequent"], m["k_unseen"], m["distinct_ids"]) == (k, distinct, 40 - specials, distinct)
    assert f"{distinct:,} by frequency, {specials} special tokens, {40 - specials} never seen in the histogram" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("vocabtrim build-head: warning:")]
    assert len(warning) == 1 and f"exceeds the {distinct} distinct ids counted" in warning[0]
    # Within the counted ids: no filler, no warning.
    assert cli(["build-head", "--histogram", calib, "--drafter", drafter, "--top-k", "32", "--out", str(tmp_path / "h2")]) == 0
    captured = capsys.readouterr()
    assert "never seen" not in captured.out and "warning:" not in captured.err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--top-k", "100000"], "between 1 and the drafter's vocabulary size"),
        (["--coverage", "1.5"], r"--coverage must be in \(0, 1\]"),
        (["--coverage", "0"], r"--coverage must be in \(0, 1\]"),
        (["--top-k", "8", "--export", "onnx"], "unknown --export 'onnx'"),
    ],
)
def test_cli_refuses_bad_flags_with_exit_2_and_one_line(tiny, tmp_path, capsys, args, match):
    drafter, calib, _ = tiny
    code = cli(["build-head", "--histogram", calib, "--drafter", drafter, "--out", str(tmp_path / "h"), *args])
    err = capsys.readouterr().err.splitlines()  # (transformers may draw a loading bar first)
    assert code == 2 and len([line for line in err if "error:" in line]) == 1
    assert re.search(match, err[-1])


def test_cli_refuses_a_missing_histogram_and_another_tokenizer(tiny, tmp_path, capsys):
    drafter, _, counts = tiny
    code = cli(["build-head", "--histogram", str(tmp_path / "none"), "--drafter", drafter, "--top-k", "8", "--out", str(tmp_path / "h")])
    assert code == 2 and "run `vocabtrim calibrate" in capsys.readouterr().err
    other = write_calibration(tmp_path / "other", counts[:200], make_tokenizer(200))
    code = cli(["build-head", "--histogram", other, "--drafter", drafter, "--top-k", "8", "--out", str(tmp_path / "h")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and "another tokenizer" in err[-1] and len([line for line in err if "error:" in line]) == 1


def test_a_histogram_that_is_not_its_manifests_is_refused(tiny, tmp_path, capsys):
    """A calibrate run stopped between writing histogram.parquet and manifest.json leaves one beside the other's
    manifest: build-head refuses it in one line instead of trimming from counts the manifest does not describe."""
    import shutil

    drafter, calib, counts = tiny
    folder = tmp_path / "calib"
    shutil.copytree(calib, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "histogram_fingerprint": histogram.fingerprint(counts)}))
    assert cli(["build-head", "--histogram", str(folder), "--drafter", drafter, "--top-k", "8", "--out", str(tmp_path / "h")]) == 0
    histogram.save(counts * 2, str(folder / "histogram.parquet"))
    capsys.readouterr()
    assert cli(["build-head", "--histogram", str(folder), "--drafter", drafter, "--top-k", "8", "--out", str(tmp_path / "h2")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "is not the one its manifest.json describes (a calibrate run stopped between writing them?)" in err[0], err


def test_cli_refuses_a_target_that_does_not_pair_with_the_drafter(tiny, tmp_path, capsys):
    """--target with a causal drafter is the pair the head serves: another tokenizer or logits width is one line,
    exit 2, and nothing written."""
    drafter, calib, _ = tiny
    tok = make_tokenizer()
    wide = save_model(make_model(len(tok) + 20, layers=1, seed=6), tok, tmp_path / "wide")
    other = save_model(make_model(200, layers=1, seed=6), make_tokenizer(200), tmp_path / "other")
    for target, message in ((wide, f"target and drafter logits widths differ: {len(tok) + 20} vs {len(tok)}"),
                            (other, f"target and drafter tokenizers differ: vocabulary size {len(make_tokenizer(200))} vs {len(tok)}")):
        capsys.readouterr()
        code = cli(["build-head", "--histogram", calib, "--drafter", drafter, "--target", target, "--top-k", "8",
                    "--out", str(tmp_path / "h")])
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "h").exists()
    assert cli(["build-head", "--histogram", calib, "--drafter", drafter, "--target", drafter, "--top-k", "8",
                "--out", str(tmp_path / "h")]) == 0


# ---------------------------------------------------------------------------------------------
# load_head: the engine's check against the drafter
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    drafter, calib, _ = tiny
    out = tmp_path_factory.mktemp("built") / "head"
    build_head(BuildHeadConfig(histogram=calib, drafter=drafter, top_k=32, out=str(out)))
    return str(out)


def test_load_head_accepts_its_drafter_and_tokenizer(tiny, built):
    model, tok = load_drafter(tiny[0])
    head = load_head(built, drafter_model=model, tokenizer=tok)
    assert head.k == 32
    assert torch.equal(head.weight, model.lm_head.weight.detach()[head.token_ids])
    # the engine may load the drafter in bfloat16: the float32 rows still match at its precision
    model16, _ = load_drafter(tiny[0], dtype="bfloat16", device="cpu")
    assert load_head(built, drafter_model=model16).k == 32


def test_load_head_refuses_another_drafter_or_tokenizer(tiny, built, tmp_path):
    tok = make_tokenizer()
    other = make_model(len(tok), layers=2, seed=99)  # same architecture, other weights
    with pytest.raises(UserError, match="built for another drafter: its rows differ") as info:
        load_head(built, drafter_model=other)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="built for another drafter \\(num_hidden_layers 2, this drafter 1\\)"):
        load_head(built, drafter_model=make_model(len(tok), layers=1, seed=3))
    with pytest.raises(UserError, match="vocabulary of 300, this drafter has 200"):
        load_head(built, drafter_model=make_model(200, layers=2, seed=3))
    with pytest.raises(UserError, match="another tokenizer"):
        load_head(built, tokenizer=make_tokenizer(200))
    with pytest.raises(UserError, match="no trimmed head"):
        load_head(str(tmp_path))


def test_a_head_file_that_cannot_be_read_is_the_users_unless_the_network_dropped(built, monkeypatch):
    """An unreadable head file is refused in one line; an object store's dropped connection keeps its type,
    so the caller retries it instead of blaming the user's head."""
    from vocabtrim import storage
    from vocabtrim.head.io import read_head_file

    def failing(error):
        def read(path):
            raise error
        return read

    monkeypatch.setattr(storage, "read_bytes", failing(PermissionError(13, "Permission denied")))
    with pytest.raises(UserError, match="cannot read .*head.safetensors: .*Permission denied"):
        read_head_file(built)
    monkeypatch.setattr(storage, "read_bytes", failing(OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7")))
    with pytest.raises(OSError, match="NETWORK_CONNECTION") as raised:
        read_head_file(built)
    assert not isinstance(raised.value, UserError)


# ---------------------------------------------------------------------------------------------
# Object storage: the histogram and the head folder on S3 (a local server: the `s3` fixture)
# ---------------------------------------------------------------------------------------------


def test_build_head_from_and_to_s3_equals_the_local_build(s3, tiny, tmp_path, capsys):
    from vocabtrim import storage

    drafter, calib, counts = tiny
    bucket = s3.bucket()
    for name in ("histogram.parquet", "manifest.json"):
        storage.write_bytes(f"{bucket}/calib/{name}", (Path(calib) / name).read_bytes())
    local = build_head(BuildHeadConfig(histogram=calib, drafter=drafter, top_k=48, export=["sglang", "eagle"], out=str(tmp_path / "h")))

    out = f"{bucket}/heads/h48"
    argv = ["build-head", "--histogram", f"{bucket}/calib", "--drafter", drafter, "--top-k", "48", "--export", "sglang,eagle", "--out", out]
    assert cli(argv) == 0
    assert f"wrote {out}/" in capsys.readouterr().out
    names = [storage.relative(p, out) for p in storage.walk_files(out)]
    assert names == sorted(["coverage.png", "eagle_d2t.safetensors", "head.safetensors", "manifest.json", "sglang_token_map.pt"])
    remote = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert remote["histogram"] == f"{bucket}/calib/histogram.parquet"
    assert {k: v for k, v in remote.items() if k != "histogram"} == {k: v for k, v in local.items() if k != "histogram"}
    assert storage.read_bytes(f"{out}/coverage.png")[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load

    for name in ("head.safetensors", "eagle_d2t.safetensors"):  # (header metadata order may differ: compare tensors)
        remote_tensors, local_tensors = load(storage.read_bytes(f"{out}/{name}")), load_file(str(tmp_path / "h" / name))
        assert remote_tensors.keys() == local_tensors.keys()
        assert all(torch.equal(remote_tensors[k], local_tensors[k]) for k in local_tensors)
    with storage.open_binary(f"{out}/sglang_token_map.pt") as f:
        assert torch.load(f, weights_only=True) == torch.load(tmp_path / "h" / "sglang_token_map.pt", weights_only=True)

    model, tok = load_drafter(drafter)
    a, b = load_head(out, drafter_model=model, tokenizer=tok), load_head(str(tmp_path / "h"))
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.weight, b.weight) and a.bias is None
    # the histogram named as a file, and a missing head, on S3 too
    m = build_head(BuildHeadConfig(histogram=f"{bucket}/calib/histogram.parquet", drafter=drafter, top_k=16, out=f"{bucket}/heads/h16"))
    assert load_head(f"{bucket}/heads/h16").k == m["k"] == 16
    with pytest.raises(UserError, match=f"{bucket}/heads/none holds no trimmed head"):
        load_head(f"{bucket}/heads/none")
    with pytest.raises(UserError, match=f"no calibration folder at {bucket}/none"):
        build_head(BuildHeadConfig(histogram=f"{bucket}/none", drafter=drafter, top_k=16, out=f"{bucket}/heads/x"))
