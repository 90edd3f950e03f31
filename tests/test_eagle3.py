"""EAGLE-3 drafters: the checkpoint layout SpecForge writes, the loader's refusals, the drafter's forward
(cache vs training-time test), the drafter through the Drafter protocol, re-trimming and the exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tiny import make_model, make_tokenizer, save_model
from vocabtrim import eagle3 as e3
from vocabtrim.errors import UserError

# ---------------------------------------------------------------------------------------------
# A random-weight checkpoint in SpecForge's exact layout (written by hand, not by our saver)
# ---------------------------------------------------------------------------------------------


def write_specforge_checkpoint(
    folder: Path, target, draft_ids, *, seed: int = 0, with_embedding: bool = False, std: float = 0.2,
    target_hidden: int | None = None, t2d_len: int | None = None, d2t=None, shuffle: bool = False,
) -> Path:
    """config.json + model.safetensors as SpecForge's ``LlamaForCausalLMEagle3`` saves them."""
    t = target.config
    H, V = t.hidden_size, t.vocab_size
    heads, kv = t.num_attention_heads, t.num_key_value_heads
    hd = H // heads
    inter = t.intermediate_size
    Ht = target_hidden or H
    ids = torch.as_tensor(sorted(draft_ids), dtype=torch.int64)
    if shuffle:
        ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]
    K = ids.numel()
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    tensors = {
        "midlayer.self_attn.q_proj.weight": r(heads * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": r(kv * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": r(kv * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": r(H, heads * hd),
        "midlayer.mlp.gate_proj.weight": r(inter, H),
        "midlayer.mlp.up_proj.weight": r(inter, H),
        "midlayer.mlp.down_proj.weight": r(H, inter),
        "midlayer.input_layernorm.weight": 1 + r(H),
        "midlayer.hidden_norm.weight": 1 + r(H),
        "midlayer.post_attention_layernorm.weight": 1 + r(H),
        "fc.weight": r(H, 3 * Ht),
        "norm.weight": 1 + r(H),
        "lm_head.weight": r(K, H) * 10,
        "d2t": (ids - torch.arange(K)) if d2t is None else torch.as_tensor(d2t, dtype=torch.int64),
    }
    t2d = torch.zeros(t2d_len or V, dtype=torch.bool)
    t2d[ids[ids < t2d.numel()]] = True
    tensors["t2d"] = t2d
    if with_embedding:
        tensors["embed_tokens.weight"] = r(V, H)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": H, "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "rope_theta": 10000.0,
        "vocab_size": V, "draft_vocab_size": K, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    if target_hidden:
        config["target_hidden_size"] = target_hidden
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


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


def test_cli_refuses_a_mismatched_eagle3_drafter_with_exit_2(tiny, tmp_path, capsys):
    from vocabtrim.models import load_pair

    folder = write_specforge_checkpoint(tmp_path / "bad", tiny["target"], tiny["draft_ids"], t2d_len=1000)
    with pytest.raises(UserError) as err:
        load_pair(tiny["target_dir"], str(folder))
    assert "t2d length" in str(err.value)
    good = write_specforge_checkpoint(tmp_path / "good", tiny["target"], tiny["draft_ids"])
    pair = load_pair(tiny["target_dir"], str(good))
    assert isinstance(pair.drafter, e3.Eagle3Model)
    assert pair.drafter.token_ids.tolist() == tiny["draft_ids"]


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
