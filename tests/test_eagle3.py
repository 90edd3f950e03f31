"""EAGLE-3 drafters: the checkpoint layout SpecForge writes, the loader's refusals, the drafter's forward
(cache vs training-time test), the drafter through the Drafter protocol, re-trimming and the exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_engine import drafts_always_win
from tiny import fit_eagle3, make_model, make_tokenizer, save_model, write_specforge_checkpoint
from vocabtrim import eagle3 as e3
from vocabtrim.errors import UserError

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer tiny target (saved), its tokenizer, and a draft vocabulary of 3/4 of the ids."""
    root = tmp_path_factory.mktemp("eagle3")
    tokenizer = make_tokenizer()
    V = len(tokenizer)
    target = make_model(V, layers=4, seed=0)
    target_dir = save_model(target, tokenizer, root / "target")
    draft_ids = sorted(set(range(0, V, 4)) | set(range(1, V, 4)) | set(range(2, V, 4)))
    return {"root": root, "tokenizer": tokenizer, "target": target, "target_dir": target_dir, "V": V, "draft_ids": draft_ids}


def load_for(tiny, folder, **kw):
    t = tiny["target"]
    return e3.load_eagle3(
        folder, target_vocab=tiny["V"], target_hidden=t.config.hidden_size,
        target_embedding=t.get_input_embeddings().weight, **kw,
    )


# ---------------------------------------------------------------------------------------------
# Loading and refusing
# ---------------------------------------------------------------------------------------------


def test_loads_the_specforge_layout_and_keeps_every_tensor(tiny, tmp_path):
    folder = write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"])
    assert e3.is_eagle3_folder(folder) and not e3.is_eagle3_folder(tiny["target_dir"])
    model = load_for(tiny, folder)
    assert model.token_ids.tolist() == tiny["draft_ids"]
    assert model.t2d.shape == (tiny["V"],) and int(model.t2d.sum()) == len(tiny["draft_ids"])
    assert model.feature_layers(4) == (2, 2, 1)  # (2, L // 2, L - 3)
    assert e3.default_feature_layers(32) == (2, 16, 29)
    # Saved again, the folder has exactly SpecForge's names and reloads to the same tensors.
    e3.save_eagle3(model, tmp_path / "again")
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "again" / "model.safetensors")))
    assert names == set(load_file(str(folder / "model.safetensors")))
    again = load_for(tiny, tmp_path / "again")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_draft_vocabulary_out_of_order_is_sorted_with_its_rows(tiny, tmp_path):
    plain = load_for(tiny, write_specforge_checkpoint(tmp_path / "a", tiny["target"], tiny["draft_ids"], seed=3))
    # The same drafter, its draft ids (and lm_head rows) stored in another order.
    shuffled_dir = tmp_path / "b"
    write_specforge_checkpoint(shuffled_dir, tiny["target"], tiny["draft_ids"], seed=3)
    from safetensors.torch import load_file

    t = load_file(str(shuffled_dir / "model.safetensors"))
    perm = torch.randperm(len(tiny["draft_ids"]), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor(tiny["draft_ids"])[perm]
    t["lm_head.weight"] = t["lm_head.weight"][perm].contiguous()
    t["d2t"] = ids - torch.arange(ids.numel())
    save_file(t, str(shuffled_dir / "model.safetensors"))
    shuffled = load_for(tiny, shuffled_dir)
    assert torch.equal(shuffled.token_ids, plain.token_ids)
    assert torch.equal(shuffled.lm_head.weight, plain.lm_head.weight)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"t2d_len": 999}, "t2d length"),
        ({"d2t": "out"}, "outside the vocabulary"),
        ({"target_hidden": 48}, "target hidden size 48"),
    ],
)
def test_refuses_a_checkpoint_for_another_target_in_one_line(tiny, tmp_path, kw, message):
    if kw.get("d2t") == "out":
        K = len(tiny["draft_ids"])
        d2t = torch.tensor(tiny["draft_ids"]) - torch.arange(K)
        d2t[-1] += tiny["V"]
        kw = {"d2t": d2t}
    folder = write_specforge_checkpoint(tmp_path / "bad", tiny["target"], tiny["draft_ids"], **kw)
    with pytest.raises(UserError) as err:
        load_for(tiny, folder)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("config, message", [
    ({"num_attention_heads": 3}, "its config.json does not describe a drafter (ValueError: The hidden size (32) is not a multiple of "
                                 "the number of attention heads (3).)"),
    ({"hidden_size": None}, "not an EAGLE-3 config.json"),
    ("{broken", "config.json is not valid JSON ("),
])
def test_a_config_json_that_describes_no_drafter_is_refused_in_one_line(tiny, tmp_path, config, message):
    folder = write_specforge_checkpoint(tmp_path / "bad", tiny["target"], tiny["draft_ids"])
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps({**raw, **config}))
    with pytest.raises(UserError) as err:
        load_for(tiny, folder)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_load_pair_refuses_an_eagle3_drafter_for_another_target_and_loads_the_right_one(tiny, tmp_path):
    """The pair check in the loader (the CLI's exit 2 for it: test_generate_refuses_a_bad_eagle3_checkpoint_...)."""
    from vocabtrim.models import load_pair

    folder = write_specforge_checkpoint(tmp_path / "bad", tiny["target"], tiny["draft_ids"], t2d_len=1000)
    with pytest.raises(UserError) as err:
        load_pair(tiny["target_dir"], str(folder))
    assert "t2d length" in str(err.value)
    good = write_specforge_checkpoint(tmp_path / "good", tiny["target"], tiny["draft_ids"])
    pair = load_pair(tiny["target_dir"], str(good))
    assert isinstance(pair.drafter, e3.Eagle3Model)
    assert pair.drafter.token_ids.tolist() == tiny["draft_ids"]


def test_generate_refuses_head_and_drafter_layers_with_an_eagle3_drafter_before_any_work(tiny, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vocabtrim import cli

    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), prompts)
    folder = write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"])
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "head.safetensors").write_bytes(b"")  # a head folder's file is there; its content is not read
    for extra, message in ((["--head", str(tmp_path / "head")], "an EAGLE-3 drafter carries its own draft vocabulary"),
                           (["--drafter-layers", "1"], "--drafter-layers does not apply to an EAGLE-3 drafter")):
        out = tmp_path / "out"
        assert cli.main(["generate", "--target", str(tiny["target_dir"]), "--drafter", str(folder), *extra,
                         "--prompts", str(prompts), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    ("t2d", "(t2d length), the target has"),
    ("truncated", "model.safetensors: Error while deserializing header: incomplete metadata, file not fully covered"),
    ("lm_head", "lm_head.weight has shape"),
])
def test_generate_refuses_a_bad_eagle3_checkpoint_before_ray_starts(tiny, tmp_path, capsys, monkeypatch, damage, message):
    """The driver reads the checkpoint's config, safetensors headers, d2t and t2d (no weights): a checkpoint for
    another target or a damaged one is one line, exit 2, before Ray starts or --out is claimed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from vocabtrim import cli, ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), prompts)
    folder = write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"],
                                        **({"t2d_len": tiny["V"] + 8} if damage == "t2d" else {}))
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif damage == "lm_head":
        t = load_file(str(weights))
        t["lm_head.weight"] = t["lm_head.weight"][:-1].contiguous()
        save_file(t, str(weights))
    out = tmp_path / "out"
    import importlib.util
    import os

    with_vllm = importlib.util.find_spec("vllm") is not None or os.environ.get("VOCABTRIM_REQUIRE_VLLM") == "1"
    for engine in ("native", "vllm") if with_vllm else ("native",):  # vLLM: no engine started
        assert cli.main(["generate", "--target", str(tiny["target_dir"]), "--drafter", str(folder), "--engine", engine,
                         "--gamma", "3", "--prompts", str(prompts), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The forward: the position-indexed cache computes exactly what training's TTT computes
# ---------------------------------------------------------------------------------------------


def test_cached_chain_equals_the_training_time_test(tiny, tmp_path):
    torch.manual_seed(0)
    model = load_for(tiny, write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"], std=0.3))
    T, steps, H = 12, 3, model.config.hidden_size
    tokens = torch.randint(0, tiny["V"], (1, T + steps + 1))
    fused = torch.randn(1, T, H)
    emb_steps = [e3.embed(model, tokens[:, 1 + s : 1 + s + T]) for s in range(steps)]
    ttt = e3.ttt_forward(model, emb_steps, fused, torch.ones(1, T, dtype=torch.bool))
    # Inference: entries 0..j by the cache, then a chain of `steps - 1` entries at j+1, j+2, ...
    j = 7
    cache = e3.KVCache.allocate(model, 1, 64)
    rows = torch.tensor([0])
    out = e3.cached_forward(model, cache, rows, emb_steps[0][:, : j + 1], fused[:, : j + 1], torch.arange(j + 1)[None], 40)
    assert torch.allclose(out, ttt[0][:, : j + 1], atol=1e-5)
    h = out[:, -1:]
    for s in range(1, steps):
        emb = e3.embed(model, tokens[:, j + 1 + s : j + 2 + s])
        h = e3.cached_forward(model, cache, rows, emb, h, torch.tensor([[j + s]]), 40)
        assert torch.allclose(h[:, 0], ttt[s][:, j], atol=1e-5), s


# ---------------------------------------------------------------------------------------------
# The drafter through the Drafter protocol, driven by a minimal greedy engine written here
# ---------------------------------------------------------------------------------------------


def _features(target, tokens: torch.Tensor, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], features [T, 3 x hidden]) of the target over one row's tokens [T]."""
    out = target(tokens[None], output_hidden_states=True)
    return out.logits[0], torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)


def _reference_drafts(model, target, layers, row: torch.Tensor, pos: int, gamma: int) -> list[int]:
    """Greedy drafts recomputed from scratch: the TTT over the row's committed tokens, chained."""
    _, feats = _features(target, row[:pos], layers)
    fused = e3.fuse(model, feats[None])  # [1, pos, H]
    drafts: list[int] = []
    seq = row[: pos + 1].tolist()
    for s in range(gamma):
        emb_steps = [e3.embed(model, torch.tensor([seq[1 + i : 1 + i + pos]])) for i in range(s + 1)]
        outs = e3.ttt_forward(model, emb_steps, fused, torch.ones(1, pos, dtype=torch.bool))
        d = int(model.token_ids[e3.logits(model, outs[s][0, pos - 1]).argmax()])
        drafts.append(d)
        seq.append(d)
    return drafts


def drive(target, drafter, prompts, *, max_new: int, gammas, check=None, drop_first_at: int | None = None):
    """Greedy speculative decoding through the protocol: returns each prompt's generated tokens
    and (proposed, accepted) counts. ``check(row_tokens, pos, gamma, proposed)`` sees every proposal."""
    from vocabtrim.engine.drafters.base import CommitInfo, DraftBatch

    n = len(prompts)
    cap = 128
    drafter.allocate(n, cap)
    history = torch.zeros(n, cap, dtype=torch.int64)
    pos = []
    feats = []
    for r, p in enumerate(prompts):
        history[r, : len(p)] = torch.tensor(p)
        pos.append(len(p) - 1)
        feats.append(_features(target, history[r, : len(p) - 1], drafter.feature_layers)[1])
    width = max(f.shape[0] for f in feats)
    padded = torch.zeros(n, width, feats[0].shape[1])
    for r, f in enumerate(feats):
        padded[r, : f.shape[0]] = f
    drafter.admit(list(range(n)), history, [len(p) for p in prompts], padded)
    ids = list(range(n))
    start = [len(p) for p in prompts]
    generated = {i: [] for i in ids}
    proposed = accepted_total = 0
    step = 0
    greedy = lambda logits, i: (logits.argmax(-1), None)  # noqa: E731
    while ids:
        G = gammas[step % len(gammas)]
        m = len(ids)
        pos_t = torch.tensor(pos[:m])
        drafts = torch.zeros(m, 0, dtype=torch.int64)
        if G > 0:
            batch = DraftBatch(m, G, history[torch.arange(m), pos_t], pos_t, list(pos[:m]), history, greedy)
            drafts = drafter.propose(batch).tokens
            proposed += m * G
            if check is not None:
                for r in range(m):
                    check(history[r].clone(), pos[r], G, drafts[r].tolist())
        accepted, features = [], torch.zeros(m, G + 1, 3 * target.config.hidden_size)
        for r in range(m):
            p = pos[r]
            history[r, p + 1 : p + 1 + G] = drafts[r]
            logits, f = _features(target, history[r, : p + G + 1], drafter.feature_layers)
            greedy_t = logits[p : p + G + 1].argmax(-1)
            a = 0
            while a < G and int(drafts[r, a]) == int(greedy_t[a]):
                a += 1
            history[r, p + a + 1] = greedy_t[a]
            history[r, p + a + 2 :] = 0
            features[r] = f[p : p + G + 1]
            accepted.append(a)
            accepted_total += a
        drafter.commit(CommitInfo(n=m, gamma=G, pos=pos_t, pos_host=list(pos[:m]), accepted=torch.tensor(accepted),
                                  accepted_host=accepted, features=features))
        for r in range(m):
            pos[r] += accepted[r] + 1
        step += 1
        finished = [r for r in range(m) if pos[r] - start[ids[r]] + 1 >= max_new]
        if drop_first_at is not None and step == drop_first_at and 0 not in finished:
            finished.append(0)
        for r in sorted(finished, reverse=True):
            generated[ids[r]] = history[r, start[ids[r]] : pos[r] + 1].tolist()[:max_new]
            drafter.release([r])
            last = len(ids) - 1
            if r != last:  # the last row moves down into the freed slot
                drafter.move([last], [r])
                history[r] = history[last]
                pos[r] = pos[last]
                ids[r] = ids[last]
            ids.pop()
            pos.pop()
    return generated, proposed, accepted_total


PROMPTS_TEXT = ["the quick brown fox", "def add(a, b):", "What is the capital of France? Paris", "1 2 3"]


@torch.no_grad()
def test_drafter_proposes_what_a_from_scratch_recompute_gives_through_accepts_rejects_and_moves(tiny, agreeing):
    """Every proposal through the Drafter protocol (gamma changing by step, 0 included; a row leaving early and
    the last row moving into its slot) equals the training-time-test recompute over the row's committed tokens,
    with drafts accepted and rejected (the fitted drafter) so that the drafter's cache is rolled back at every
    accepted length."""
    from vocabtrim.engine.drafters.eagle3 import Eagle3Drafter

    target = tiny["target"]
    model = load_for(tiny, agreeing.folder)
    drafter = Eagle3Drafter(model, target.config.num_hidden_layers)
    assert drafter.feature_layers == (2, 2, 1)
    assert drafter.support.tolist() == tiny["draft_ids"]
    prompts = [tiny["tokenizer"](t)["input_ids"] for t in PROMPTS_TEXT]
    checked = []

    def check(row, pos, gamma, proposed):
        assert proposed == _reference_drafts(model, target, drafter.feature_layers, row, pos, gamma)
        checked.append(1)

    out, proposed, accepted = drive(target, drafter, prompts, max_new=16, gammas=[3, 0, 2, 1, 4], check=check, drop_first_at=3)
    assert len(checked) > 10 and 0 < accepted < proposed, (accepted, proposed)
    for i in range(len(prompts)):  # row 0 left early (after step 3): at least one token a step
        assert 3 <= len(out[i]) <= 16 if i == 0 else len(out[i]) == 16, i


# ---------------------------------------------------------------------------------------------
# Re-trimming with build-head, and the SpecForge export
# ---------------------------------------------------------------------------------------------


def _calibration(folder: Path, tokenizer, seed: int = 0):
    import numpy as np

    from vocabtrim import histogram
    from vocabtrim.models import tokenizer_fingerprint

    rng = np.random.default_rng(seed)
    counts = rng.zipf(1.4, size=len(tokenizer)).clip(max=5000).astype(np.int64)
    folder.mkdir(parents=True)
    histogram.save(counts, str(folder / "histogram.parquet"))
    manifest = {"kind": "vocabtrim-histogram", "version": 1, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "source": "target"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder), counts


@torch.no_grad()
def test_build_head_retrims_an_eagle3_drafter_and_greedy_output_stays_the_targets(tiny, agreeing, tmp_path, capsys):
    from safetensors.torch import load_file

    from vocabtrim.cli import main as cli
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    target = tiny["target"]
    src = agreeing.folder
    calib, counts = _calibration(tmp_path / "calib", tiny["tokenizer"])
    out = tmp_path / "retrimmed"
    code = cli(["build-head", "--histogram", calib, "--drafter", str(src), "--target", tiny["target_dir"], "--top-k", "64",
                "--export", "specforge", "--out", str(out)])
    assert code == 0
    assert f"kept K=64 of {len(tiny['draft_ids'])} draft ids" in capsys.readouterr().out
    before = load_for(tiny, src)
    after = load_for(tiny, out)  # the new folder is itself an EAGLE-3 checkpoint in the same layout
    kept = after.token_ids
    assert kept.numel() == 64 and set(kept.tolist()) <= set(tiny["draft_ids"])
    in_draft = torch.tensor(counts)[torch.tensor(tiny["draft_ids"])]
    # the most frequent draft ids are kept (specials in the draft vocabulary too)
    top = torch.tensor(tiny["draft_ids"])[in_draft.argsort(descending=True, stable=True)[:40]]
    assert set(top.tolist()) <= set(kept.tolist())
    rows = torch.searchsorted(before.token_ids, kept)
    assert torch.equal(after.lm_head.weight, before.lm_head.weight[rows])
    assert torch.equal(after.fc.weight, before.fc.weight)
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(load_file(str(src / "model.safetensors")))
    # The SpecForge export, read as SpecForge reads it (weights_only).
    mapping = torch.load(out / "specforge_vocab_mapping.pt", weights_only=True)
    assert set(mapping) == {"d2t", "t2d"}
    assert mapping["d2t"].dtype == torch.int64 and mapping["t2d"].dtype == torch.bool
    assert mapping["t2d"].shape == (tiny["V"],)
    assert torch.equal(torch.arange(64) + mapping["d2t"], kept)
    assert torch.equal(mapping["t2d"].nonzero()[:, 0], kept)
    # Greedy output with the re-trimmed drafter is still the target's own, with some of its drafts accepted.
    prompts = [tiny["tokenizer"](t)["input_ids"] for t in PROMPTS_TEXT]
    greedy = SamplingParams(temperature=0)
    alone = make_engine(target, None, batch_size=2, max_new_tokens=12, sampling=greedy).generate(prompts, [0, 1, 2, 3])
    spec = make_engine(target, after, batch_size=2, max_new_tokens=12, gamma=3, sampling=greedy).generate(prompts, [0, 1, 2, 3])
    assert [o.token_ids for o in spec] == [o.token_ids for o in alone]
    assert 0 < sum(o.accepted for o in spec) < sum(o.proposed for o in spec)
    # The folder is a drafter, not a trimmed head: generate says so when it is passed as --head.
    capsys.readouterr()
    assert cli(["generate", "--target", tiny["target_dir"], "--drafter", str(src), "--head", str(out), "--prompts", "p.parquet",
                "--out", str(tmp_path / "gen")]) == 2
    assert capsys.readouterr().err == (f"vocabtrim generate: error: --head {out} is a model folder (a re-trimmed EAGLE-3 drafter, say), "
                                       "not a trimmed head: pass it as --drafter and drop --head\n")


def test_retrim_refuses_growing_the_draft_vocabulary_and_a_folder_without_tokenizer(tiny, tmp_path, capsys):
    from vocabtrim.cli import main as cli

    src = write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"])
    calib, _ = _calibration(tmp_path / "calib", tiny["tokenizer"])
    assert cli(["build-head", "--histogram", calib, "--drafter", str(src), "--top-k", "64", "--out", str(tmp_path / "o")]) == 2
    assert "has no tokenizer: pass --target" in capsys.readouterr().err
    args = ["build-head", "--histogram", calib, "--drafter", str(src), "--target", tiny["target_dir"], "--top-k", "999", "--out", str(tmp_path / "o")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "larger than the drafter's draft vocabulary of " in err and err.count("\n") == 1
    # SGLang ignores --speculative-token-map for EAGLE-3 drafters (they carry d2t): that export is refused.
    assert cli([*args[:-4], "--top-k", "64", "--export", "specforge,sglang", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "SGLang ignores for an EAGLE-3 drafter" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_an_eagle3_drafter_where_a_model_must_run_alone_is_refused_in_one_line(tiny, tmp_path, capsys):
    """As a target (generate, calibrate, train-drafter, sweep, build-head's --target) or as the model calibrate counts
    with: one line naming the flag, before any work."""
    from vocabtrim.cli import main as cli

    src = str(write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"]))
    (tmp_path / "c.txt").write_text("hello world\n")
    (tmp_path / "calib").mkdir()
    corpus, calib, out = str(tmp_path / "c.txt"), str(tmp_path / "calib"), str(tmp_path / "o")
    target = tiny["target_dir"]
    for argv, flag in [
        (["generate", "--target", src, "--no-draft", "--prompts", "p.parquet"], "--target"),
        (["calibrate", "--drafter", target, "--target", src, "--source", "target", "--corpus", corpus], "--target"),
        (["calibrate", "--drafter", src, "--corpus", corpus], "--drafter"),  # it counts with the drafter's tokenizer
        (["train-drafter", "--target", src, "--corpus", corpus, "--histogram", calib, "--top-k", "8"], "--target"),
        (["sweep", "--target", src, "--drafter-layers", "1", "--corpus", corpus, "--prompts", "p.parquet"], "--target"),
        (["build-head", "--histogram", calib, "--drafter", src, "--target", src, "--top-k", "8"], "--target"),
    ]:
        assert cli([*argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"error: {flag} {src} is an EAGLE-3 drafter: it drafts from a target's hidden states and does not run alone" in err
        if flag == "--drafter":
            assert err.endswith("pass the target it drafts for (calibrate counts with its tokenizer), then re-trim the EAGLE-3 "
                                "drafter with `vocabtrim build-head --drafter` and the calibration\n")
    assert not (tmp_path / "o").exists()


def test_replayed_chains_accept_what_greedy_speculative_steps_would():
    """Gamma 2 over a 10-token row whose response starts at position 3. target_next[p] is the target's token at
    position p + 1 (here 101 + p); step s at index j predicts the token at position j + 2 + s."""
    from vocabtrim.train import replay_chains

    target_next = [101 + p for p in range(10)]
    # Pending 3: index 2 predicts positions 4 and 5, both right: 2 accepted, pending 6.
    # Pending 6: index 5 predicts position 7 wrong: 0 accepted, pending 7.
    # Pending 7: index 6 predicts position 8 right, position 9 wrong: 1 accepted, pending 9, the row's end.
    step0 = [0, 0, 104, 0, 0, 1, 108, 109]
    step1 = [0, 0, 105, 0, 0, 0, 1]
    assert replay_chains([step0, step1], target_next, 3, 10) == (3, 6, 3)
    # One token before the end a step drafts only that one.
    assert replay_chains([step0, step1], target_next, 8, 10) == (1, 1, 1)


def test_retrim_checks_its_target_keeps_every_eos_and_leaves_no_stale_file(tiny, tmp_path, capsys):
    """A re-trim checks --target against the checkpoint (t2d as long as its vocabulary), keeps the EOS ids the
    target's generation config adds, refuses the drafter's own folder as --out, reports ids the histogram never
    counted, and a rerun into the same --out removes the exports and tokenizer files it no longer writes (those the
    earlier build's manifest lists: a user's own files stay)."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file

    from vocabtrim import histogram
    from vocabtrim.cli import main as cli
    from vocabtrim.models import tokenizer_fingerprint

    src = write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"])
    calib, counts = _calibration(tmp_path / "calib", tiny["tokenizer"])
    other = save_model(make_model(400, layers=4, seed=1), make_tokenizer(400), tmp_path / "other")
    capsys.readouterr()
    other_calib, _ = _calibration(tmp_path / "calib-other", make_tokenizer(400))  # counted for that target: it fits the histogram
    out = tmp_path / "o"
    args = ["build-head", "--histogram", calib, "--drafter", str(src), "--top-k", "64"]
    assert cli([*args[:2], other_calib, *args[3:], "--target", other, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is for a vocabulary of {tiny['V']} ids (t2d length), the target has 400" in err, err
    assert not out.exists()
    # The target's generation config stops on one more id: a rare draft id, which frequency alone would not keep.
    target = tmp_path / "target"
    shutil.copytree(tiny["target_dir"], target)
    rare = max(i for i in tiny["draft_ids"] if counts[i] == counts[tiny["draft_ids"]].min())
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [tiny["tokenizer"].eos_token_id, rare]}))
    with_tokenizer = tmp_path / "d-tok"  # the same checkpoint with the target's tokenizer files beside it
    shutil.copytree(src, with_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target / name, with_tokenizer / name)
    assert cli([*args[:4], str(with_tokenizer), *args[5:], "--target", str(target), "--export", "specforge,eagle", "--out", str(out)]) == 0
    capsys.readouterr()
    kept = load_file(str(out / "model.safetensors"))["t2d"].nonzero()[:, 0].tolist()
    assert rare in kept and rare in json.loads((out / "manifest.json").read_text())["special_ids"]
    assert {p.name for p in out.iterdir()} >= {"specforge_vocab_mapping.pt", "eagle_d2t.safetensors", "tokenizer.json"}
    before = (out / "model.safetensors").read_bytes()
    assert cli([*args[:4], str(out), "--top-k", "32", "--target", str(target), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the drafter's own folder" in err and (out / "model.safetensors").read_bytes() == before
    # A rerun from the folder without tokenizer, with no export and a histogram that counted 6 ids only.
    sparse = np.zeros(tiny["V"], dtype=np.int64)
    sparse[tiny["draft_ids"][10:16]] = 5
    (tmp_path / "sparse").mkdir()
    histogram.save(sparse, str(tmp_path / "sparse" / "histogram.parquet"))
    (tmp_path / "sparse" / "manifest.json").write_text(json.dumps({"kind": "vocabtrim-histogram", "version": 1, "source": "target",
                                                                   "tokenizer_fingerprint": tokenizer_fingerprint(tiny["tokenizer"])}))
    assert cli(["build-head", "--histogram", str(tmp_path / "sparse"), "--drafter", str(src), "--top-k", "40", "--target", str(target),
                "--out", str(out)]) == 0
    captured = capsys.readouterr()
    m = json.loads((out / "manifest.json").read_text())
    assert m["k_frequent"] == 6 and m["k_unseen"] == 40 - 6 - len(m["special_ids"]) > 0 and m["exports"] == {}
    assert f"6 by frequency, {len(m['special_ids'])} special tokens, {m['k_unseen']} never seen" in captured.out
    assert "exceeds the 6 distinct ids counted" in captured.err
    assert not {p.name for p in out.iterdir()} & {"specforge_vocab_mapping.pt", "eagle_d2t.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"}
    # Files of the user's in a folder no build-head wrote stay: only what an earlier build's manifest lists is removed.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("the user's")
    (mine / "eagle_d2t.safetensors").write_text("the user's")
    assert cli([*args, "--target", str(target), "--out", str(mine)]) == 0
    assert (mine / "tokenizer.json").read_text() == (mine / "eagle_d2t.safetensors").read_text() == "the user's"


def test_widen_gives_the_same_drafter_a_full_vocabulary_head_and_retrim_undoes_it(tiny, tmp_path):
    """The full-vocabulary head of the trimmed-vs-full comparison: the drafter's own rows at its draft ids, the
    target's rows elsewhere; on its draft ids its logits are the trimmed drafter's; retrim gives it back."""
    drafter = load_for(tiny, write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"]))
    target_head = tiny["target"].lm_head.weight
    wide = e3.widen(drafter, target_head)
    V, ids = tiny["V"], drafter.token_ids
    assert wide.config.draft_vocab_size == V and torch.equal(wide.token_ids, torch.arange(V)) and bool(wide.t2d.all())
    others = torch.ones(V, dtype=torch.bool)
    others[ids] = False
    assert torch.equal(wide.lm_head.weight[ids], drafter.lm_head.weight)
    assert torch.equal(wide.lm_head.weight[others], target_head[others].to(wide.lm_head.weight.dtype))
    h = torch.randn(2, 3, drafter.config.hidden_size)
    assert torch.allclose(e3.logits(wide, h)[..., ids], e3.logits(drafter, h), atol=1e-6)
    back = e3.retrim(wide, ids)
    for k, v in drafter.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(UserError):
        e3.widen(drafter, target_head[:-1])


def test_a_full_draft_vocabulary_is_saved_without_d2t_as_vllm_loads_it(tiny, tmp_path):
    """vLLM's Eagle3LlamaForCausalLM has no d2t parameter when the draft vocabulary is the target's whole
    vocabulary and refuses a checkpoint that carries one; such a folder (and one without t2d too) loads here."""
    from safetensors.torch import load_file, save_file

    drafter = load_for(tiny, write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"]))
    wide = e3.widen(drafter, tiny["target"].lm_head.weight)
    e3.save_eagle3(wide, tmp_path / "wide")
    stored = load_file(str(tmp_path / "wide" / e3.WEIGHTS_FILE))
    assert "d2t" not in stored and bool(stored["t2d"].all())
    for folder in (tmp_path / "wide", tmp_path / "bare"):
        if folder.name == "bare":  # neither d2t nor t2d: the identity
            folder.mkdir()
            (folder / "config.json").write_text((tmp_path / "wide" / "config.json").read_text())
            save_file({k: v for k, v in stored.items() if k != "t2d"}, str(folder / e3.WEIGHTS_FILE))
        back = load_for(tiny, folder)
        for k, v in wide.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), (folder.name, k)
    # A trimmed draft vocabulary still needs its d2t.
    e3.save_eagle3(drafter, tmp_path / "trimmed")
    assert "d2t" in load_file(str(tmp_path / "trimmed" / e3.WEIGHTS_FILE))


def test_the_engine_refuses_a_draft_vocabulary_out_of_id_order(tiny, tmp_path):
    """A drafter built in Python with its vocabulary out of id order (the loader sorts a checkpoint's) is refused
    in one line: the samplers look q(x) up by binary search over it."""
    from vocabtrim.engine import make_engine

    model = load_for(tiny, write_specforge_checkpoint(tmp_path / "d", tiny["target"], tiny["draft_ids"]))
    ids = model.token_ids.clone()
    ids[[0, 1]] = ids[[1, 0]]
    model.set_vocabulary(ids)
    with pytest.raises(UserError, match="^the drafter's vocabulary must be sorted and unique"):
        make_engine(tiny["target"], model)


def test_specforge_export_of_a_plain_head(tmp_path):
    from vocabtrim.head.export import export_specforge

    ids = torch.tensor([0, 2, 5, 9])
    export_specforge(ids, 12, str(tmp_path / "m.pt"))
    m = torch.load(tmp_path / "m.pt", weights_only=True)
    assert m["d2t"].tolist() == [0, 1, 3, 6] and m["t2d"].tolist() == [i in (0, 2, 5, 9) for i in range(12)]
    with pytest.raises(UserError):
        export_specforge(torch.tensor([0, 12]), 12, str(tmp_path / "bad.pt"))


# ---------------------------------------------------------------------------------------------
# In the engine: greedy identity and chi-square losslessness
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agreeing(tiny, tmp_path_factory):
    """An EAGLE-3 folder fitted to draft the tiny target's greedy continuations of PROMPTS_TEXT (so that at
    temperature 0 on those prompts some drafts are accepted and some rejected), and load_pair on it."""
    from types import SimpleNamespace

    from vocabtrim.models import load_pair

    root = tmp_path_factory.mktemp("e3fit")
    start = load_for(tiny, write_specforge_checkpoint(root / "start", tiny["target"], tiny["draft_ids"], std=0.3))
    start.set_embedding(tiny["target"].get_input_embeddings().weight.detach())
    prompts = [tiny["tokenizer"](t)["input_ids"] for t in PROMPTS_TEXT]
    e3.save_eagle3(fit_eagle3(start, tiny["target"], prompts), root / "fitted")
    return SimpleNamespace(folder=root / "fitted", pair=load_pair(tiny["target_dir"], str(root / "fitted"), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def eagle_pair(tiny, tmp_path_factory):
    """load_pair on the saved tiny target and a SpecForge-layout EAGLE-3 folder."""
    from vocabtrim.models import load_pair

    folder = write_specforge_checkpoint(tmp_path_factory.mktemp("e3pair") / "d", tiny["target"], tiny["draft_ids"], std=0.3)
    return load_pair(tiny["target_dir"], str(folder), dtype="float32", device="cpu")


@pytest.mark.parametrize("batch_size, gamma", [(1, 3), (3, None), (8, 2)])
def test_engine_greedy_output_with_an_eagle3_drafter_is_the_targets(tiny, agreeing, batch_size, gamma):
    """Temperature 0, fixed and adaptive gamma, rows refilled as others finish: the target alone's tokens,
    with drafts both accepted and rejected on the way."""
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.drafters.eagle3 import Eagle3Drafter
    from vocabtrim.engine.sampling import SamplingParams

    pair, greedy = agreeing.pair, SamplingParams(temperature=0)
    prompts = [tiny["tokenizer"](t)["input_ids"] for t in PROMPTS_TEXT * 2]
    alone = make_engine(pair.target, None, batch_size=batch_size, max_new_tokens=16, sampling=greedy)
    engine = make_engine(pair.target, pair.drafter, batch_size=batch_size, max_new_tokens=16, gamma=gamma, max_gamma=4, sampling=greedy)
    assert isinstance(engine.drafter, Eagle3Drafter)
    want = alone.generate(prompts, list(range(len(prompts))))
    spec = engine.generate(prompts, list(range(len(prompts))))
    assert [o.token_ids for o in spec] == [o.token_ids for o in want]
    accepted, proposed = sum(o.accepted for o in spec), sum(o.proposed for o in spec)
    assert 0 < accepted < proposed, (accepted, proposed)


@pytest.mark.parametrize("batch_size, gamma", [(1, 1), (3, 3)])
@torch.no_grad()
def test_engine_drafts_what_the_drafter_was_trained_to_draft(tiny, agreeing, batch_size, gamma, monkeypatch):
    """Every proposal the real engine gets from the EAGLE-3 drafter equals the training-time-test recompute
    over the row's committed tokens: the features the engine hands over after each verify pass sit at the
    positions the drafter reads them from. (Greedy identity alone cannot see a misplaced feature: it only
    lowers acceptance.)"""
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.drafters.eagle3 import Eagle3Drafter
    from vocabtrim.engine.sampling import SamplingParams

    target, model = agreeing.pair.target, agreeing.pair.drafter
    seen = []
    propose = Eagle3Drafter.propose

    def checked(self, batch):
        out = propose(self, batch)
        for r in range(batch.n):
            row = batch.history[r].clone()
            ref = _reference_drafts(model, target, self.feature_layers, row, batch.pos_host[r], batch.gamma)
            seen.append(out.tokens[r].tolist() == ref)
        return out

    monkeypatch.setattr(Eagle3Drafter, "propose", checked)
    prompts = [tiny["tokenizer"](t)["input_ids"] for t in PROMPTS_TEXT * 2]
    engine = make_engine(target, model, sampling=SamplingParams(temperature=0), batch_size=batch_size, max_new_tokens=16,
                         gamma=gamma, max_gamma=gamma)
    outs = engine.generate(prompts, list(range(len(prompts))))
    assert len(seen) > 20 and all(seen), f"{seen.count(False)} of {len(seen)} proposals differ from the recompute"
    assert 0 < sum(o.accepted for o in outs) < sum(o.proposed for o in outs)  # after accepts and after rejects


@torch.no_grad()
def test_compiled_eagle3_drafter_drafts_the_same_with_two_graphs(tiny, eagle_pair, monkeypatch):
    """--compile: the drafter's passes cover every slot (8 rows through 4 slots: padding rows at the tail)
    and round each catch-up window up to a power of two (recomputing entries). Its proposals equal the
    training-time-test recompute, under a verify rule that accepts 0..gamma drafts in turn so that windows
    of every size occur; then, under the real rule, the same engine's greedy output is the target alone's.
    The drafter compiles at most its two graphs (one entry per row; several) beside the target's two, and
    nothing breaks a graph."""
    import itertools

    import torch._dynamo
    import torch._dynamo.utils as dynamo_utils

    from vocabtrim.engine import make_engine, scheduler
    from vocabtrim.engine.drafters.eagle3 import Eagle3Drafter
    from vocabtrim.engine.sampling import SamplingParams, Verdict

    target, model = eagle_pair.target, eagle_pair.drafter
    gamma, seen, windows = 3, [], []
    propose, calls = Eagle3Drafter.propose, itertools.count()

    def checked(self, batch):
        windows.append(max(p - self.done[r] for r, p in enumerate(batch.pos_host[: batch.n])))
        out = propose(self, batch)
        for r in range(batch.n):
            ref = _reference_drafts(model, target, self.feature_layers, batch.history[r].clone(), batch.pos_host[r], batch.gamma)
            seen.append(out.tokens[r].tolist() == ref)
        return out

    def accept_in_turn(draft_tokens, target_tokens, drafts=None):
        accepted = torch.full((draft_tokens.shape[0],), next(calls) % (draft_tokens.shape[1] + 1), dtype=torch.long)
        accepted = accepted if drafts is None else torch.minimum(accepted, drafts)
        return Verdict(accepted=accepted, next_token=target_tokens.gather(1, accepted[:, None])[:, 0])

    prompts = [tiny["tokenizer"](t)["input_ids"] for t in PROMPTS_TEXT * 2]
    seeds = list(range(len(prompts)))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    engine = make_engine(target, model, sampling=SamplingParams(temperature=0), batch_size=4, max_new_tokens=16,
                         gamma=gamma, max_gamma=gamma, compile=True)
    with monkeypatch.context() as m:
        m.setattr(Eagle3Drafter, "propose", checked)
        m.setattr(scheduler, "verify_exact", accept_in_turn)
        engine.generate(prompts, seeds)
    assert len(seen) > 20 and all(seen), f"{seen.count(False)} of {len(seen)} proposals differ from the recompute"
    assert {1, 2, 3, 4} <= set(windows), windows  # 3 is rounded up to 4
    out = engine.generate(prompts, seeds)
    alone = make_engine(target, None, sampling=SamplingParams(temperature=0), max_new_tokens=16).generate(prompts, seeds)
    assert [o.token_ids for o in out] == [o.token_ids for o in alone]
    assert 0 < dynamo_utils.counters["stats"]["unique_graphs"] <= 4
    assert sum(dynamo_utils.counters["graph_break"].values()) == 0


ALPHA = 1e-4  # false-alarm rate of each chi-square check (fixed seeds: deterministic; over fresh seeds, 1 in 10,000)
T_FLAT = 20.0  # a random drafter agrees with the target only where both are flat: acceptance 0.3-0.45 here, 0.003 at T = 1


@torch.no_grad()
def eagle3_two_token_check(tiny, eagle_pair, sampler, n=3000):
    """(first-token p-value, second-token p-value, acceptance): 3,000 rows at T_FLAT, gamma 2, against the exact
    laws p(x1) and sum_x1 p(x1) p(x2 | x1). Rows of 3 tokens, so that both tokens checked come from the first
    step's two drafts (a step drafts at most the room a row has left less one)."""
    from stats import chi_square_pvalue

    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    target = eagle_pair.target
    prompt = tiny["tokenizer"]("the quick brown")["input_ids"]
    engine = make_engine(target, eagle_pair.drafter, batch_size=100, max_new_tokens=3, gamma=2, sampler=sampler,
                         sampling=SamplingParams(temperature=T_FLAT))
    outs = engine.generate([prompt] * n, list(range(n)))
    V = tiny["V"]
    first = torch.tensor([o.token_ids[0] for o in outs])
    second = torch.tensor([o.token_ids[1] for o in outs])
    p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].float() / T_FLAT, -1)
    batch = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], dim=1)
    p2 = (p1[:, None] * torch.softmax(target(batch).logits[:, -1].float() / T_FLAT, -1)).sum(0)
    acceptance = sum(o.accepted for o in outs) / sum(o.proposed for o in outs)
    return (chi_square_pvalue(torch.bincount(first, minlength=V), p1),
            chi_square_pvalue(torch.bincount(second, minlength=V), p2), acceptance)


@pytest.mark.parametrize("sampler", ["rejection", "gumbel"])
def test_engine_with_an_eagle3_drafter_samples_exactly_the_targets_distribution(tiny, eagle_pair, sampler):
    """The first two tokens' laws, with drafts accepted and rejected often (false alarms: 2 x ALPHA)."""
    p_first, p_second, acceptance = eagle3_two_token_check(tiny, eagle_pair, sampler)
    assert 0.05 < acceptance < 0.95, acceptance  # both the accept and the reject paths were taken often
    assert p_first > ALPHA and p_second > ALPHA, (p_first, p_second)


def keep_sampled_drafts(draft_tokens, draft_q, target_p, u_accept, u_recover, draft_support=None, drafts=None):
    """A broken rejection rule: every draft kept, the target sampled only after them."""
    from vocabtrim.engine.sampling import Verdict, sample_from_probs

    b, g = draft_tokens.shape
    accepted = torch.full((b,), g, dtype=torch.long) if drafts is None else drafts
    u = u_recover.gather(1, accepted[:, None])[:, 0] if u_recover.ndim == 2 else u_recover
    return Verdict(accepted=accepted, next_token=sample_from_probs(target_p[torch.arange(b), accepted], u))


@pytest.mark.parametrize("sampler,name,broken", [("rejection", "verify_sampled", keep_sampled_drafts),
                                                 ("gumbel", "verify_exact", drafts_always_win)])
def test_the_eagle3_check_rejects_outputs_that_follow_the_drafter(tiny, eagle_pair, sampler, name, broken, monkeypatch):
    """Power: with the drafts always kept, the same check fails (p below ALPHA)."""
    import vocabtrim.engine.scheduler as scheduler

    monkeypatch.setattr(scheduler, name, broken)
    p_first, p_second, _ = eagle3_two_token_check(tiny, eagle_pair, sampler)
    assert p_first < ALPHA and p_second < ALPHA, (p_first, p_second)


# ---------------------------------------------------------------------------------------------
# train-drafter on a tiny target
# ---------------------------------------------------------------------------------------------


def test_train_drafter_lowers_its_loss_writes_a_loadable_checkpoint_and_resumes(tiny, tmp_path, ray_local, capsys, monkeypatch):
    import dataclasses

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiny import corpus_rows, count_tokens
    from vocabtrim import histogram
    from vocabtrim.cli import main as cli
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.models import load_pair, tokenizer_fingerprint

    tok = tiny["tokenizer"]
    rows = corpus_rows(160, seed=1)
    pq.write_table(pa.table({"text": rows}), tmp_path / "corpus.parquet")
    calib = tmp_path / "calib"
    calib.mkdir()
    histogram.save(count_tokens(tok, rows).astype(np.int64), str(calib / "histogram.parquet"))
    (calib / "manifest.json").write_text(json.dumps({"kind": "vocabtrim-histogram", "version": 1,
                                                     "tokenizer_fingerprint": tokenizer_fingerprint(tok), "source": "corpus"}))
    out = tmp_path / "drafter"
    args = ["train-drafter", "--target", tiny["target_dir"], "--corpus", str(tmp_path / "corpus.parquet"), "--histogram", str(calib),
            "--top-k", "128", "--batch-size", "8", "--ttt-length", "2", "--learning-rate", "3e-3", "--held-out", "0.2",
            "--no-progress", "--out", str(out)]
    assert cli([*args, "--epochs", "4"]) == 0
    assert "held-out acceptance" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    runs = m["epochs_run"]
    assert len(runs) == 4 and m["draft_vocab_size"] == 128 and m["shards_extracted"] == m["shards"] == 5
    assert runs[-1]["loss"] < 0.8 * runs[0]["first_loss"]
    assert runs[-1]["held_out_loss"] < runs[0]["held_out_loss"]
    assert runs[-1]["held_out_acceptance"] > runs[0]["held_out_acceptance"]
    assert 0 <= m["held_out_chain_acceptance"] <= 1 and 1 <= m["held_out_tokens_per_step"] <= 3
    # The checkpoint is SpecForge's layout and the engine runs it; greedy output stays the target's.
    pair = load_pair(tiny["target_dir"], str(out), dtype="float32", device="cpu")
    assert pair.drafter.config.draft_vocab_size == 128
    prompts = [tok(t)["input_ids"] for t in rows[:4]]
    greedy = SamplingParams(temperature=0)
    alone = make_engine(pair.target, None, batch_size=4, max_new_tokens=10, sampling=greedy).generate(prompts, [0, 1, 2, 3])
    spec = make_engine(pair.target, pair.drafter, batch_size=4, max_new_tokens=10, gamma=3, sampling=greedy).generate(prompts, [0, 1, 2, 3])
    assert [o.token_ids for o in spec] == [o.token_ids for o in alone]
    # A rerun with one more epoch resumes: no feature extracted again, one epoch trained, at the rerun's
    # --learning-rate (the optimizer's saved state holds the first run's).
    assert cli([*[("1e-3" if a == "3e-3" else a) for a in args], "--epochs", "5"]) == 0
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["shards_extracted"] == 0 and [r["epoch"] for r in m2["epochs_run"]] == [5]
    assert [r["epoch"] for r in m2["history"]] == [1, 2, 3, 4, 5] and m2["history"][:4] == runs
    assert m2["epochs_run"][0]["first_loss"] < (runs[0]["first_loss"] + runs[-1]["loss"]) / 2  # it went on from epoch 4's weights
    assert [r["learning_rate"] for r in m2["history"]] == [3e-3] * 4 + [1e-3]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert int(state["epoch"]) == 5 and state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    # The training actor killed mid-epoch (as the out-of-memory killer would): the run ends in one line with exit 1,
    # epoch 5's checkpoint kept; the same command then resumes from it and trains epoch 6.
    from vocabtrim.commands import train_drafter as command

    marker = tmp_path / "kill-the-trainer"
    marker.touch()
    built = command.config_from_args
    monkeypatch.setattr(command, "config_from_args", lambda a: dataclasses.replace(built(a), fault_injection=f"sigkill-once:{marker}"))
    args = [("1e-3" if a == "3e-3" else a) for a in args]
    capsys.readouterr()
    assert cli([*args, "--epochs", "6"]) == 1
    err = capsys.readouterr().err
    assert not marker.exists() and err.count("\n") == 1, err
    assert "the training actor failed (" in err and "rerun the same command to resume from its last checkpoint" in err
    assert json.loads((out / "manifest.json").read_text())["history"] == m2["history"]
    assert int(torch.load(out / "train_state.pt", weights_only=True)["epoch"]) == 5
    monkeypatch.undo()
    assert cli([*args, "--epochs", "6"]) == 0
    m3 = json.loads((out / "manifest.json").read_text())
    assert [r["epoch"] for r in m3["epochs_run"]] == [6] and m3["history"][:5] == m2["history"] and m3["shards_extracted"] == 0
    # Resuming with another draft vocabulary, held-out share or batch size is refused in one line, before Ray starts:
    # the held-out figures would count rows trained on, or the drafter would go on under other settings.
    for old, new, what in (("128", "100", "draft_vocabulary '128, sha256 "), ("0.2", "0.4", "train_shards '4, sha256 "),
                           ("8", "4", "batch_size 8 now 4")):
        assert cli([*[(new if a == old else a) for a in args], "--epochs", "7"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"holds a drafter made with other settings ({what}" in err, err
    # Its features removed (they are large, and their ledger's record goes with them), a rerun that would extract other
    # rows is refused all the same: the training record holds the features' settings too.
    import shutil

    shutil.rmtree(out / "features")
    assert cli([*args, "--epochs", "7", "--max-length", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a drafter made with other settings (features 'sha256 " in err, err
    assert json.loads((out / "manifest.json").read_text())["history"] == m3["history"]


@pytest.mark.parametrize("windowed, batch_size, stop", [(False, 4, 4), (True, 3, 6)], ids=["one-shuffle", "windows"])
def test_a_training_stopped_within_an_epoch_goes_on_from_its_checkpoint_as_if_never_stopped(tiny, tmp_path, windowed, batch_size, stop):
    """Within an epoch the trainer writes its resume state every --checkpoint-minutes (the drafter's own files at epoch
    ends only). A trainer stopped mid-epoch and started again from that state ends the epoch with the weights and the
    epoch's figures of one never stopped; a batch trained after the last checkpoint is lost and trained again.
    ``windowed``: --shuffle-gb of about one shard, so the epoch is shuffled window by window; the checkpoint lies past
    the first window (batches of 3 rows: not at a window's end), which the restarted trainer does not read. The restarted
    trainer's --shuffle-gb (the other case's) applies from the next epoch: the stopped epoch goes on with the budget it began
    with, and a state from before the budget (none recorded) with one shuffle of every row."""
    import dataclasses

    import numpy as np

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiny import corpus_rows
    from vocabtrim import corpus, train

    threads = torch.get_num_threads()  # the trainer sets its own
    pq.write_table(pa.table({"text": corpus_rows(64, seed=2)}), tmp_path / "c.parquet")
    shards = corpus.make_shards([str(tmp_path / "c.parquet")], "text", shard_rows=16)
    layers = e3.default_feature_layers(4)
    spec = train.ExtractorSpec(target=tiny["target_dir"], source="corpus", text_column="text", feature_layers=layers, max_length=64,
                               max_new_tokens=5, temperature=0.0, seed=0, dtype="float32", trust_remote_code=False)
    features = [train.FeatureExtractor(spec).extract(s) for s in shards]
    for name in ("whole", "stopped"):
        ledger = train.FeatureLedger(str(tmp_path / name / "features"))
        assert all(ledger.record(f) for f in features)
    ids = [s.shard_id for s in shards]
    layout = [ledger.layout(sid) for sid in ids]
    budget = max(size for size, _ in layout) if windowed else int(8e9)
    windows = train.epoch_windows(ids, [size for size, _ in layout], budget, np.random.default_rng(0))  # epoch 0's, seed 0
    rows = dict(zip(ids, (n for _, n in layout)))
    if windowed:  # the first window ends within a batch, wholly before the checkpoint; the second holds the checkpoint
        first, second = (sum(rows[sid] for sid in w) for w in windows[:2])
        assert len(windows) > 2 and first % batch_size and first < stop * batch_size < first + second
    else:
        assert len(windows) == 1

    def trainer(name, minutes, budget=budget):
        cfg = train.TrainConfig(target=tiny["target_dir"], corpus=[str(tmp_path / "c.parquet")], histogram=None, top_k=None,
                                out=str(tmp_path / name), batch_size=batch_size, ttt_length=2, learning_rate=3e-3,
                                checkpoint_minutes=minutes, shuffle_gb=budget / 1e9)
        t = train.DrafterTrainer(dataclasses.asdict(cfg), tiny["draft_ids"], layers, [s.shard_id for s in shards], [], 1)
        t.pid()
        return t

    try:
        whole = trainer("whole", 0)
        steps = whole.begin_epoch()
        while not whole.train_steps(2)["done"]:
            pass
        reference = whole.end_epoch()
        assert steps == -(-sum(rows.values()) // batch_size)
        stopped = trainer("stopped", 1e-9)  # a checkpoint after every call
        assert stopped.begin_epoch() == steps >= 8
        assert [stopped.train_steps(2)["cursor"] for _ in range(stop // 2)] == list(range(2, stop + 1, 2))
        state = torch.load(tmp_path / "stopped" / train.STATE_FILE, weights_only=True)
        assert json.loads(state["within_epoch"])["cursor"] == stop and int(state["epoch"]) == 0
        assert not (tmp_path / "stopped" / e3.WEIGHTS_FILE).exists()  # no drafter before an epoch ends
        stopped.cfg = dataclasses.replace(stopped.cfg, checkpoint_minutes=0)
        assert stopped.train_steps(1)["cursor"] == stop + 1  # past the last checkpoint: lost when the trainer stops now
        del stopped
        if not windowed:  # as a state written before --shuffle-gb: no budget recorded
            state = torch.load(tmp_path / "stopped" / train.STATE_FILE, weights_only=True)
            position = json.loads(state["within_epoch"])
            assert position.pop("shuffle_bytes") == budget
            torch.save({**state, "within_epoch": json.dumps(position)}, tmp_path / "stopped" / train.STATE_FILE)
        again = trainer("stopped", 0, int(8e9) if windowed else min(size for size, _ in layout))
        read, reads = again.ledger.read, []
        again.ledger.read = lambda sid: reads.append(sid) or read(sid)
        assert again.begin_epoch() == steps
        assert again.train_steps(1)["cursor"] == stop + 1
        while not again.train_steps(2)["done"]:
            pass
        record = again.end_epoch()
    finally:
        torch.set_num_threads(threads)
    assert reads == ([sid for w in windows[1:] for sid in w] if windowed else ids)  # the first window's not read again
    for key in ("steps", "loss", "first_loss", "last_loss", "train_acceptance"):
        assert record[key] == pytest.approx(reference[key], rel=1e-5), key
    for (name, a), b in zip(whole.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    state = torch.load(tmp_path / "stopped" / train.STATE_FILE, weights_only=True)
    assert "within_epoch" not in state and int(state["epoch"]) == 1 and (tmp_path / "stopped" / e3.WEIGHTS_FILE).exists()
    # A rerun with no epoch left whose drafter files were deleted writes them again from the state, no epoch begun.
    (tmp_path / "stopped" / e3.WEIGHTS_FILE).unlink()
    try:
        trainer("stopped", 0).save()
    finally:
        torch.set_num_threads(threads)
    assert e3.load_eagle3(tmp_path / "stopped") is not None


def _synthetic_features(folder, rows_per_shard: list[int], draft_ids: list[int], hidden: int, first: int = 0) -> list[str]:
    """A feature ledger in ``folder``, one shard per entry of ``rows_per_shard`` (ids ``s{first + i:03d}``): row r of
    shard i is 3 to 6 tokens starting (first + i, r), its features random of width ``hidden``, its greedy tokens drawn
    from ``draft_ids``, every token a loss token. Returns the shard ids."""
    from vocabtrim import train

    g = torch.Generator().manual_seed(first)
    ledger = train.FeatureLedger(str(folder))
    shard_ids = []
    for i, n in enumerate(rows_per_shard):
        lengths = torch.randint(3, 7, (n,), generator=g)
        N = int(lengths.sum())
        starts = torch.cumsum(lengths, 0) - lengths
        input_ids = torch.randint(0, 64, (N,), generator=g)
        input_ids[starts], input_ids[starts + 1] = first + i, torch.arange(n)
        tensors = {"input_ids": input_ids, "row_lengths": lengths, "loss_mask": torch.ones(N, dtype=torch.uint8),
                   "aux": torch.randn(N, 3 * hidden, generator=g).bfloat16(), "final": torch.randn(N, hidden, generator=g).bfloat16(),
                   "target_next": torch.tensor(draft_ids)[torch.randint(0, len(draft_ids), (N,), generator=g)]}
        shard_ids.append(f"s{first + i:03d}")
        assert ledger.record(train.FeatureShard(shard_ids[-1], "synthetic", n, N, tensors))
    return shard_ids


@pytest.fixture
def keep_threads():
    """The trainer sets torch's thread count: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _trainer(tiny, out, train_ids, eval_ids, **kw):
    """A ``DrafterTrainer`` of the tiny target on the features in ``out``/features (batches of 4 rows, 2 TTT steps)."""
    import dataclasses

    from vocabtrim import train

    cfg = train.TrainConfig(target=tiny["target_dir"], corpus=["unused.txt"], histogram=None, top_k=None, out=str(out), batch_size=4,
                            ttt_length=2, checkpoint_minutes=0, **kw)
    t = train.DrafterTrainer(dataclasses.asdict(cfg), tiny["draft_ids"], e3.default_feature_layers(4), train_ids, eval_ids, 1)
    t.pid()
    return t


class _Resident:
    """A spy on a ledger's ``read``: at each read, the bytes of the tensors read so far that are still alive (the
    new shard's included: ``bytes``) and how many shards they belong to (``shards``); ``reads``: the shard ids read."""

    def __init__(self, ledger):
        import weakref

        self._finalize, self._real, self._live = weakref.finalize, ledger.read, {}
        self.reads, self.bytes, self.shards = [], [], []
        ledger.read = self.read

    def read(self, shard_id):
        tensors = self._real(shard_id)
        for name, t in tensors.items():
            key = (len(self.reads), name)
            self._live[key] = t.nbytes
            # A row (split_rows) is a view, which keeps its root tensor alive (safetensors' are views of their own).
            self._finalize(t if t._base is None else t._base, self._live.pop, key, None)
        self.reads.append(shard_id)
        self.bytes.append(sum(self._live.values()))
        self.shards.append(len({k[0] for k in self._live}))
        return tensors


def _seen_batches(monkeypatch) -> list:
    """A spy on ``train.pad_rows``: the batches it pads, each a list of rows (the (shard, row) pair each starts with)."""
    from vocabtrim import train

    seen, pad_rows = [], train.pad_rows

    def spy(rows, device=None):
        seen.append([tuple(r["input_ids"][:2].tolist()) for r in rows])
        return pad_rows(rows, device)

    monkeypatch.setattr(train, "pad_rows", spy)
    return seen


def _old_batches(ledger, shard_ids, rng, batch_size):
    """The batches as ``DrafterTrainer._batches`` made them before --shuffle-gb: every row read, one permutation."""
    import numpy as np

    from vocabtrim import train

    rows = []
    for sid in shard_ids:
        rows.extend(train.split_rows(ledger.read(sid)))
    order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
    return [[rows[i] for i in order[k : k + batch_size]] for k in range(0, len(rows), batch_size)]


def test_training_beyond_shuffle_gb_holds_a_window_of_shards_and_sees_every_row_once(tiny, tmp_path, monkeypatch, keep_threads):
    """Features over --shuffle-gb: the trainer holds at most the budget's bytes of features at once (measured: the
    tensors read and still alive at each read), trains on every row exactly once per epoch in full batches (the
    last fewer), shards in an order that differs from epoch to epoch and rows not in their shards' order; max_steps
    cuts the same epoch."""
    rows_per_shard = [5, 7, 3, 6, 9, 4, 2, 9]
    ids = _synthetic_features(tmp_path / "o" / "features", rows_per_shard, tiny["draft_ids"], tiny["target"].config.hidden_size)
    t = _trainer(tiny, tmp_path / "o", ids, [], shuffle_gb=1.0)
    sizes = [t.ledger.layout(sid)[0] for sid in ids]
    assert [t.ledger.layout(sid)[1] for sid in ids] == rows_per_shard
    budget = 2 * max(sizes)
    assert sum(sizes) > 2 * budget
    t.cfg.shuffle_gb = budget / 1e9
    spy = _Resident(t.ledger)
    seen = _seen_batches(monkeypatch)
    every = sorted((i, r) for i, n in enumerate(rows_per_shard) for r in range(n))
    orders = []
    for epoch in range(2):
        del seen[:]
        assert t.begin_epoch() == 12  # 45 rows in batches of 4
        while not t.train_steps(5)["done"]:
            pass
        t.end_epoch()
        assert [len(b) for b in seen] == [4] * 11 + [1]
        order = [row for b in seen for row in b]
        assert sorted(order) == every and order != every
        orders.append(order)
        assert sorted(spy.reads[-len(ids):]) == ids  # each shard read once an epoch
        assert spy.reads[-len(ids):] != ids  # in a shuffled order
    assert orders[0] != orders[1]
    assert max(spy.bytes) <= budget and max(spy.shards) >= 2  # windows of two shards and more, never over the budget
    assert _synthetic_features(tmp_path / "cut" / "features", rows_per_shard, tiny["draft_ids"], tiny["target"].config.hidden_size) == ids
    cut = _trainer(tiny, tmp_path / "cut", ids, [], shuffle_gb=budget / 1e9, max_steps=5)  # epoch 0 again, the same features
    del seen[:]
    assert cut.begin_epoch() == 5
    while not cut.train_steps(2)["done"]:
        pass
    assert [row for b in seen for row in b] == orders[0][:20]  # the uncut epoch's first 5 batches


def test_features_within_shuffle_gb_give_the_batches_of_one_shuffle_and_held_out_figures_stream(tiny, tmp_path, monkeypatch, keep_threads):
    """Within the default --shuffle-gb every epoch's batches are those of one shuffle of every row (the batches made
    before the budget, row for row and tensor for tensor); the held-out shards are read one at a time (no two shards'
    tensors alive at once) into the batches and figures of every held-out row read at once."""
    import numpy as np

    from vocabtrim import train

    hidden = tiny["target"].config.hidden_size
    ids = _synthetic_features(tmp_path / "o" / "features", [5, 7, 3, 6], tiny["draft_ids"], hidden)
    eval_ids = _synthetic_features(tmp_path / "o" / "features", [3, 6, 5], tiny["draft_ids"], hidden, first=10)
    t = _trainer(tiny, tmp_path / "o", ids, eval_ids, seed=5)
    seen = _seen_batches(monkeypatch)
    rows = {}
    for sid in ids + eval_ids:
        for r in train.split_rows(t.ledger.read(sid)):
            rows[tuple(r["input_ids"][:2].tolist())] = r

    def same(batches, old):
        assert [len(b) for b in batches] == [len(b) for b in old]
        for b, o in zip(batches, old):
            for key, r in zip(b, o):
                assert all(torch.equal(rows[key][k], r[k]) for k in r)

    for epoch in range(2):
        del seen[:]
        assert t.begin_epoch() == 6
        while not t.train_steps(4)["done"]:
            pass
        same(seen, _old_batches(t.ledger, ids, np.random.default_rng(5 + epoch), 4))
        t.end_epoch()
    spy = _Resident(t.ledger)
    del seen[:]
    figures = t.evaluate()
    assert spy.reads == eval_ids and max(spy.shards) == 1
    assert [len(b) for b in seen] == [4, 4, 4, 2]
    same(seen, _old_batches(t.ledger, eval_ids, None, 4))
    # evaluate's figures with the batches made as before the budget: the same
    monkeypatch.setattr(train, "window_batches", lambda read, windows, batch_size: _old_batches(t.ledger, [w[0] for w in windows], None, batch_size))
    assert t.evaluate() == figures and figures["held_out_tokens"] > 0


def test_source_target_features_read_message_lists_through_the_chat_template(tiny, tmp_path):
    """train-drafter --source target on a column of {role, content} lists: each training row is the conversation in
    the chat template plus the target's greedy response (the loss on the response only); rows that are no
    conversation are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vocabtrim import corpus, train
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams

    tok = tiny["tokenizer"]
    chats = [[{"role": "user", "content": t}] for t in PROMPTS_TEXT[:2]]
    chats.append([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}])
    column = chats[:1] + [[]] + chats[1:] + [None]
    pq.write_table(pa.table({"messages": column}), tmp_path / "c.parquet")
    (shard,) = corpus.make_shards([str(tmp_path / "c.parquet")], "messages", messages=True)
    spec = train.ExtractorSpec(target=tiny["target_dir"], source="target", text_column="messages",
                               feature_layers=e3.default_feature_layers(4), max_length=64, max_new_tokens=5, temperature=0.0,
                               seed=0, dtype="float32", trust_remote_code=False)
    got = train.split_rows(train.FeatureExtractor(spec).extract(shard).tensors)
    prompts = [tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
               for c in chats]
    greedy = SamplingParams(temperature=0.0)
    outs = make_engine(tiny["target"], None, sampling=greedy, batch_size=3, max_new_tokens=5).generate(prompts, [0, 0, 0])
    assert len(got) == 3 and all(len(o.token_ids) == 5 for o in outs)
    for row, p, o in zip(got, prompts, outs):
        assert row["input_ids"].tolist() == p + list(o.token_ids)
        assert row["loss_mask"].tolist() == [0] * len(p) + [1] * len(o.token_ids)


def test_feature_files_do_not_write_down_a_uris_query(tmp_path):
    """A shard of a corpus on an object store: its feature file names the location without the URI's query, which
    may carry an endpoint or keys."""
    from safetensors import safe_open

    from vocabtrim import train

    ledger = train.FeatureLedger(str(tmp_path / "features"))
    where = "s3://b/c.parquet?endpoint_override=h:1&secret_key=k"
    assert ledger.record(train.FeatureShard("c-1", where, 1, 3, {"input_ids": torch.zeros(3, dtype=torch.int64)}, 0.0))
    with safe_open(str(ledger.path("c-1")), "pt") as f:
        assert f.metadata()["path"] == "s3://b/c.parquet"


def test_source_corpus_features_start_with_the_bos_the_tokenizer_adds(tiny, tmp_path):
    """train-drafter --source corpus: each row is encoded as generate encodes a raw prompt, with the special tokens
    the tokenizer adds (a Llama-3 tokenizer's BOS), so the target's hidden states are the ones the engine reads; the
    loss starts at the first text token. A tokenizer that adds nothing gives the text's own ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import processors

    from vocabtrim import corpus, train

    texts = ["the quick brown fox", "", "ray actors count tokens"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    (shard,) = corpus.make_shards([str(tmp_path / "c.parquet")], "text")
    with_bos = copy.deepcopy(tiny["tokenizer"])
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, bos)])
    folders = {"bos": save_model(tiny["target"], with_bos, tmp_path / "bos"), "plain": tiny["target_dir"]}
    for kind, folder in folders.items():
        spec = train.ExtractorSpec(target=folder, source="corpus", text_column="text",
                                   feature_layers=e3.default_feature_layers(4), max_length=64, max_new_tokens=5,
                                   temperature=0.0, seed=0, dtype="float32", trust_remote_code=False)
        got = train.split_rows(train.FeatureExtractor(spec).extract(shard).tensors)
        own = [tiny["tokenizer"](t, add_special_tokens=False)["input_ids"] for t in texts if t]
        want = [[bos] + ids for ids in own] if kind == "bos" else own
        assert [r["input_ids"].tolist() for r in got] == want, kind
        assert [r["loss_mask"].tolist() for r in got] == [[0] + [1] * (len(w) - 1) for w in want], kind


def test_train_drafter_init_fine_tunes_a_drafter_from_its_weights_and_vocabulary(tiny, tmp_path, ray_local, capsys):
    """--init: the run starts from that drafter (its weights, its draft vocabulary unless a histogram gives one,
    where ids it lacks start from the target's head rows) and trains on from there."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from tiny import corpus_rows
    from vocabtrim.cli import main as cli

    init = write_specforge_checkpoint(tmp_path / "init", tiny["target"], tiny["draft_ids"], std=0.05, with_embedding=True)
    ref = load_file(str(init / "model.safetensors"))
    pq.write_table(pa.table({"text": corpus_rows(160, seed=2)}), tmp_path / "corpus.parquet")
    base = ["train-drafter", "--target", tiny["target_dir"], "--corpus", str(tmp_path / "corpus.parquet"), "--init", str(init),
            "--batch-size", "8", "--ttt-length", "2", "--held-out", "0.2", "--no-progress"]
    # A rate too small to move a weight: what is written is --init's drafter (the target's embedding, not its own).
    out = tmp_path / "own"
    assert cli([*base, "--epochs", "1", "--learning-rate", "1e-12", "--out", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(ref) - {"embed_tokens.weight"}
    for k in got:
        assert torch.equal(got[k], ref[k]) if k in ("d2t", "t2d") else torch.allclose(got[k], ref[k], atol=1e-6), k
    m = json.loads((out / "manifest.json").read_text())
    assert m["init"] == str(init) and m["draft_vocab_size"] == len(tiny["draft_ids"]) and "histogram" not in m
    # Trained on from there (resumed at a real rate): the held-out loss falls from --init's.
    assert cli([*base, "--epochs", "3", "--learning-rate", "3e-3", "--out", str(out)]) == 0
    h = json.loads((out / "manifest.json").read_text())["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3] and h[-1]["held_out_loss"] < 0.9 * h[0]["held_out_loss"]
    # Another draft vocabulary: ids --init drafts keep its head rows, the others start from the target's.
    calib, _ = _calibration(tmp_path / "calib", tiny["tokenizer"])
    out2 = tmp_path / "retrimmed"
    assert cli([*base, "--histogram", calib, "--top-k", "64", "--epochs", "1", "--learning-rate", "1e-12", "--out", str(out2)]) == 0
    got2 = load_file(str(out2 / "model.safetensors"))
    ids = (torch.arange(got2["d2t"].numel()) + got2["d2t"]).tolist()
    own = {t: r for r, t in enumerate(torch.tensor(tiny["draft_ids"]).tolist())}
    target_head = tiny["target"].lm_head.weight.detach()
    assert len(ids) == 64 and 0 < sum(t in own for t in ids) < 64
    for r, t in enumerate(ids):
        assert torch.allclose(got2["lm_head.weight"][r], ref["lm_head.weight"][own[t]] if t in own else target_head[t], atol=1e-6), t
    assert torch.allclose(got2["fc.weight"], ref["fc.weight"], atol=1e-6)


def test_train_drafter_init_from_target_starts_the_layer_as_the_targets_layer(tiny, tmp_path, ray_local):
    """--init-from-target: the new drafter's layer starts as the target decoder layer that reads the highest
    feature layer (its attention, MLP and norms; fc passes that feature layer through), the token half of q/k/v
    and the head as without the flag; then it trains like any drafter."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from tiny import corpus_rows
    from vocabtrim.cli import main as cli

    pq.write_table(pa.table({"text": corpus_rows(160, seed=3)}), tmp_path / "corpus.parquet")
    calib, _ = _calibration(tmp_path / "calib", tiny["tokenizer"])
    base = ["train-drafter", "--target", tiny["target_dir"], "--corpus", str(tmp_path / "corpus.parquet"), "--histogram", calib,
            "--top-k", "64", "--batch-size", "8", "--ttt-length", "2", "--held-out", "0.2", "--epochs", "1",
            "--learning-rate", "1e-12", "--no-progress"]
    assert cli([*base, "--init-from-target", "--out", str(tmp_path / "from")]) == 0
    assert cli([*base, "--out", str(tmp_path / "random")]) == 0
    got, plain = load_file(str(tmp_path / "from" / "model.safetensors")), load_file(str(tmp_path / "random" / "model.safetensors"))
    index = e3.default_feature_layers(4)[-1]  # hidden state i is decoder layer i's input
    assert json.loads((tmp_path / "from" / "manifest.json").read_text())["init_from_target_layer"] == index
    layer = {k: v.detach() for k, v in tiny["target"].model.layers[index].state_dict().items()}
    H = tiny["target"].config.hidden_size
    for name in ("q_proj", "k_proj", "v_proj"):
        w = got[f"midlayer.self_attn.{name}.weight"]
        assert torch.allclose(w[:, H:], layer[f"self_attn.{name}.weight"], atol=1e-6), name
        assert torch.allclose(w[:, :H], plain[f"midlayer.self_attn.{name}.weight"][:, :H], atol=1e-6), name
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"):
        assert torch.allclose(got[f"midlayer.{name}.weight"], layer[f"{name}.weight"], atol=1e-6), name
    assert torch.allclose(got["midlayer.hidden_norm.weight"], layer["input_layernorm.weight"], atol=1e-6)
    fc = torch.zeros(H, 3 * H)
    fc[:, 2 * H :] = torch.eye(H)
    assert torch.allclose(got["fc.weight"], fc, atol=1e-6)
    for k in ("lm_head.weight", "norm.weight", "midlayer.input_layernorm.weight", "d2t", "t2d"):
        assert torch.equal(got[k], plain[k]), k
    # From there it trains: a rerun at a real rate lowers the held-out loss.
    assert cli([*[("3e-3" if a == "1e-12" else a) for a in base], "--epochs", "3", "--init-from-target", "--out", str(tmp_path / "from")]) == 0
    h = json.loads((tmp_path / "from" / "manifest.json").read_text())["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3] and h[-1]["held_out_loss"] < h[0]["held_out_loss"]


def test_train_drafter_refuses_bad_input_in_one_line_before_any_work(tiny, tmp_path, capsys):
    from vocabtrim.cli import main as cli

    other = make_tokenizer(vocab_size=280)
    calib, _ = _calibration(tmp_path / "calib", other)
    (tmp_path / "c.txt").write_text("hello world\n")
    base = ["train-drafter", "--target", tiny["target_dir"], "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o")]
    assert cli([*base, "--histogram", calib, "--top-k", "64"]) == 2
    err = capsys.readouterr().err
    assert "counted with another tokenizer" in err and err.count("\n") == 1
    good, _ = _calibration(tmp_path / "calib2", tiny["tokenizer"])
    assert cli([*base, "--histogram", good, "--top-k", "100000"]) == 2
    assert "--top-k must be at most the target's vocabulary" in capsys.readouterr().err
    assert cli([*base, "--histogram", good, "--top-k", "64", "--ttt-length", "0"]) == 2
    assert "--ttt-length must be >= 1" in capsys.readouterr().err
    assert cli([*base, "--histogram", good, "--top-k", "64", "--intermediate-size", "0"]) == 2
    assert capsys.readouterr().err.endswith("error: --intermediate-size must be >= 1, got 0\n")
    # The draft vocabulary comes from a histogram or from --init; --init must be a drafter for this target and keeps its shape.
    assert cli(base) == 2
    assert "pass --histogram DIR --top-k K (the draft vocabulary), or --init DRAFTER" in capsys.readouterr().err
    assert cli([*base, "--histogram", good]) == 2
    assert "--histogram and --top-k go together" in capsys.readouterr().err
    other_target = write_specforge_checkpoint(tmp_path / "other", tiny["target"], tiny["draft_ids"], t2d_len=tiny["V"] + 8)
    assert cli([*base, "--init", str(other_target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is for a vocabulary of {tiny['V'] + 8} ids (t2d length), the target has {tiny['V']}" in err, err
    init = write_specforge_checkpoint(tmp_path / "init", tiny["target"], tiny["draft_ids"])
    assert cli([*base, "--init", str(init), "--intermediate-size", "7"]) == 2
    assert "--intermediate-size 7 differs from --init's" in capsys.readouterr().err
    # A drafter of another width with its own embedding fits the target as --drafter, but trains on the target's embedding.
    wider = write_specforge_checkpoint(tmp_path / "wider", make_model(tiny["V"], hidden=48), tiny["draft_ids"], with_embedding=True,
                                       target_hidden=tiny["target"].config.hidden_size)
    assert cli([*base, "--init", str(wider)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a drafter of hidden size 48 with its own embedding; train-drafter trains on the target's embedding, of 32" in err, err
    assert cli([*base, "--histogram", good, "--top-k", "64", "--seed", "-1"]) == 2
    assert capsys.readouterr().err.endswith("error: --seed must be >= 0, got -1\n")
    assert cli([*base, "--histogram", good, "--top-k", "64", "--checkpoint-minutes", "-1"]) == 2
    assert capsys.readouterr().err.endswith("error: --checkpoint-minutes must be >= 0, got -1.0\n")
    assert cli([*base, "--histogram", good, "--top-k", "64", "--shuffle-gb", "0"]) == 2
    assert capsys.readouterr().err.endswith("error: --shuffle-gb must be > 0, got 0.0\n")
    assert cli([*base, "--init", tiny["target_dir"]]) == 2
    assert capsys.readouterr().err.endswith(f"error: --init {tiny['target_dir']} is not an EAGLE-3 drafter (no config.json naming an "
                                            "EAGLE-3 architecture): pass one (as SpecForge or train-drafter writes it), or "
                                            "smollm2-135m-eagle3\n")
    assert cli([*base, "--init", str(tmp_path / "nowhere")]) == 2
    assert f"--init {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    # --init-from-target copies a target layer into a new drafter: not with --init, not at another MLP or attention width.
    assert cli([*base, "--init", str(init), "--init-from-target"]) == 2
    assert "--init-from-target starts a new drafter; --init fine-tunes one" in capsys.readouterr().err
    assert cli([*base, "--histogram", good, "--top-k", "64", "--init-from-target", "--intermediate-size", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--intermediate-size 7 differs from the target's" in err, err
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import save_model

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=tiny["V"], hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    wide_dir = save_model(wide, tiny["tokenizer"], tmp_path / "wide")
    capsys.readouterr()
    assert cli([*[wide_dir if a == tiny["target_dir"] else a for a in base], "--histogram", good, "--top-k", "64", "--init-from-target"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the target's attention is 4 heads of 16, not its hidden size of 32" in err, err
    # A target whose layers the trainer cannot read (not the Llama layout) is refused before any feature is extracted.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_dir = save_model(GPT2LMHeadModel(GPT2Config(vocab_size=tiny["V"], n_embd=32, n_layer=4, n_head=4, n_positions=256)),
                          tiny["tokenizer"], tmp_path / "gpt2")
    capsys.readouterr()  # save_model's progress bar, where no earlier test turned transformers' bars off
    assert cli([*[gpt2_dir if a == tiny["target_dir"] else a for a in base], "--histogram", good, "--top-k", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(GPT2LMHeadModel) has no model.norm, model.layers" in err, err
    assert "train-drafter trains EAGLE-3 drafters for targets of the Llama layout" in err
    assert not (tmp_path / "o").exists()
    # Target-generated rows need room for their prompt: a response as long as the row would leave one token of it.
    assert cli([*base, "--histogram", good, "--top-k", "64", "--source", "target", "--max-new-tokens", "512", "--max-length", "512"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-new-tokens 512 leaves no room for the prompt in rows of --max-length 512" in err, err
    # A model's folder as --out (no manifest, no training record): its config.json and weights would be overwritten.
    before = {p.name: p.read_bytes() for p in Path(wide_dir).iterdir() if p.is_file()}
    assert cli([*base[:-1], wide_dir, "--histogram", good, "--top-k", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds config.json but no manifest.json: it is not a 'vocabtrim-eagle3-train' folder" in err, err
    assert {p.name: p.read_bytes() for p in Path(wide_dir).iterdir() if p.is_file()} == before


def test_the_chat_template_prompts_go_through_is_a_training_setting_beside_the_features_hash():
    """--source target renders prompts through the target's chat template: its hash is in the feature ledger's record
    and the training's, beside the features' hash (which leaves it out, so records written before it still match)."""
    from vocabtrim import train

    c = train.TrainConfig(target="t", corpus=["c"], histogram="h", top_k=8, out="o", source="target")
    features = {"version": 1, "source": "target", "tokenizer_fingerprint": "tok-1"}
    before = train.training_settings(c, [1, 2], ["s-1"], [], features)
    now = train.training_settings(c, [1, 2], ["s-1"], [], {**features, "chat_template_sha256": "abc"})
    assert now == {**before, "chat_template_sha256": "abc"} and "chat_template_sha256" in train.Ledger.LATER_KEYS
    assert train.training_settings(c, [1, 2], ["s-1"], [], {**features, "chat_template_sha256": "def"}) != now


def test_the_held_out_split_holds_out_a_shard_whenever_asked_and_never_a_training_one():
    from vocabtrim.train import held_out_split

    ids = [f"s{i}" for i in range(25)]
    assert held_out_split(ids, 0.1) == (ids[:23], ids[23:])
    assert held_out_split(ids[:5], 0.1) == (ids[:4], ids[4:5])  # floor(0.5) shards would hold none out: one is
    assert held_out_split(ids[:1], 0.1) == (ids[:1], [])  # a single shard is trained on; no held-out figure
    assert held_out_split(ids, 0) == (ids, [])


def test_train_drafter_refuses_a_corpus_with_no_row_to_train_on(tiny, tmp_path, ray_local, capsys):
    """Rows of one token each give no training position: one line and exit 2, not an untrained drafter written
    as if trained."""
    from vocabtrim.cli import main as cli

    good, _ = _calibration(tmp_path / "calib", tiny["tokenizer"])
    (tmp_path / "c.txt").write_text("a\nb\n\nc\n")
    out = tmp_path / "o"
    assert cli(["train-drafter", "--target", tiny["target_dir"], "--corpus", str(tmp_path / "c.txt"), "--histogram", good,
                "--top-k", "64", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to train on: every row of the training shards is empty or shorter than 3 tokens" in err
    assert not (out / "model.safetensors").exists()


def test_train_drafter_refuses_a_draft_vocabulary_that_holds_none_of_the_targets_tokens(tiny, tmp_path, ray_local, capsys):
    """A draft vocabulary that holds none of the tokens the target predicts on the training rows gives no position
    to learn from: one line and exit 2, no drafter written (it crashed in backward before)."""
    import numpy as np

    from vocabtrim import histogram
    from vocabtrim.cli import main as cli
    from vocabtrim.models import tokenizer_fingerprint
    from vocabtrim.special_tokens import special_token_ids

    tok, target = tiny["tokenizer"], tiny["target"]
    rows = ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b"]
    (tmp_path / "c.txt").write_text("\n".join(rows) + "\n")
    predicted = set()
    with torch.no_grad():
        for r in rows:
            predicted |= set(target(torch.tensor([tok(r)["input_ids"]])).logits[0].argmax(-1).tolist())
    specials = set(special_token_ids(tok))
    counts = np.zeros(tiny["V"], dtype=np.int64)
    for i in range(tiny["V"]):
        if i not in predicted and i not in specials:
            counts[i] = 1 + i
    calib = tmp_path / "calib"
    calib.mkdir()
    histogram.save(counts, str(calib / "histogram.parquet"))
    (calib / "manifest.json").write_text(json.dumps({"kind": "vocabtrim-histogram", "version": 1,
                                                     "tokenizer_fingerprint": tokenizer_fingerprint(tok), "source": "corpus"}))
    assert not predicted & specials, "a special token is among the target's predictions: pick other rows"
    capsys.readouterr()
    out = tmp_path / "o"
    code = cli(["train-drafter", "--target", tiny["target_dir"], "--corpus", str(tmp_path / "c.txt"), "--histogram", str(calib),
                "--top-k", "32", "--held-out", "0", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nothing to train on: no training row's next token" in err, err
    assert not (out / "model.safetensors").exists()


def test_vocabtrim_generate_with_an_eagle3_drafter_equals_the_target_alone(tiny, agreeing, tmp_path, ray_local, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vocabtrim.cli import main as cli

    folder = agreeing.folder
    pq.write_table(pa.table({"id": list(range(6)), "prompt": (PROMPTS_TEXT + PROMPTS_TEXT)[:6]}), tmp_path / "p.parquet")
    common = ["generate", "--target", tiny["target_dir"], "--prompts", str(tmp_path / "p.parquet"), "--max-new-tokens", "8",
              "--temperature", "0", "--batch-size", "3", "--workers", "1"]
    assert cli([*common, "--drafter", str(folder), "--gamma", "3", "--out", str(tmp_path / "spec")]) == 0
    assert cli([*common, "--no-draft", "--out", str(tmp_path / "alone")]) == 0
    spec = pq.read_table(tmp_path / "spec" / "p.parquet").sort_by("id").to_pylist()
    alone = pq.read_table(tmp_path / "alone" / "p.parquet").sort_by("id").to_pylist()
    assert [r["completion"] for r in spec] == [r["completion"] for r in alone]
    assert 0 < sum(r["draft_accepted"] for r in spec) < sum(r["draft_proposed"] for r in spec)
    summary = json.loads((tmp_path / "spec" / "summary.json").read_text())
    assert summary["settings"]["drafter"] == str(folder)


@pytest.mark.bundled
def test_the_bundled_eagle3_drafter_loads_by_name_and_keeps_greedy_identity():
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.models import load_pair

    pair = load_pair("smollm2-135m", "smollm2-135m-eagle3", dtype="float32", device="cpu")
    assert isinstance(pair.drafter, e3.Eagle3Model) and pair.drafter.t2d.shape == (49152,)
    msgs = [[{"role": "user", "content": "Write a haiku about the sea."}], [{"role": "user", "content": "What is 2 + 2?"}]]
    prompts = [pair.tokenizer.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt")["input_ids"][0].tolist() for m in msgs]
    greedy = SamplingParams(temperature=0)
    alone = make_engine(pair.target, None, batch_size=2, max_new_tokens=12, sampling=greedy).generate(prompts, [0, 1])
    spec = make_engine(pair.target, pair.drafter, batch_size=2, max_new_tokens=12, gamma=3, sampling=greedy).generate(prompts, [0, 1])
    assert [o.token_ids for o in spec] == [o.token_ids for o in alone]
    assert sum(o.accepted for o in spec) > 0
