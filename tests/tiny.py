"""Tiny models built in the test: a byte-level BPE tokenizer and random Llama configs.

Everything here is deterministic (fixed seeds), takes milliseconds, and touches no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens and the target verifies them",
    "a small drafter proposes and a large target accepts or rejects",
    "def add(a, b):\n    return a + b\n",
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about the sea. Waves fold into foam.",
    "ray actors count tokens in shards and a reducer merges the counts",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
] * 4


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE fast tokenizer with ChatML-style special tokens (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(
    vocab_size: int,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    init_std: float = 0.3,
    max_positions: int = 256,
):
    """A random LlamaForCausalLM with peaky (not near-uniform) next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


def save_model(model, tokenizer, folder: Path) -> str:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def make_pair_dirs(root: Path, *, target_layers: int = 3, drafter_layers: int = 1, vocab_size: int = 300):
    """Save a tiny target and an independent tiny drafter (same tokenizer) under ``root``."""
    tokenizer = make_tokenizer(vocab_size)
    v = len(tokenizer)
    target = make_model(v, layers=target_layers, seed=0)
    drafter = make_model(v, layers=drafter_layers, seed=1)
    return save_model(target, tokenizer, Path(root) / "target"), save_model(drafter, tokenizer, Path(root) / "drafter")


def noisy_copy(model, scale: float = 0.3, seed: int = 7):
    """A drafter that agrees with ``model`` often but not always: its weights plus relative noise."""
    import copy

    drafter = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return drafter


def corpus_rows(n: int, seed: int) -> list[str]:
    """``n`` short text rows built from TRAINING_TEXT, each unique (``#i`` at the end)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TRAINING_TEXT, 2)) + f" #{i}" for i in range(n)]


def count_tokens(tokenizer, texts: list[str]):
    """The reference histogram: every id of every text's encoding, no special tokens added (int64 [V])."""
    import numpy as np

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.bincount(np.concatenate([np.asarray(i) for i in ids]), minlength=len(tokenizer))


# A random-weight EAGLE-3 checkpoint in SpecForge's exact layout (written by hand, not by vocabtrim's saver)


def write_specforge_checkpoint(
    folder: Path, target, draft_ids, *, seed: int = 0, with_embedding: bool = False, std: float = 0.2,
    target_hidden: int | None = None, t2d_len: int | None = None, d2t=None, shuffle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """config.json + model.safetensors as SpecForge's ``LlamaForCausalLMEagle3`` saves them (floating-point
    tensors in ``dtype``)."""
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
        "vocab_size": V, "draft_vocab_size": K, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    if target_hidden:
        config["target_hidden_size"] = target_hidden
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def fit_eagle3(model, target, prompts: list[list[int]], *, new_tokens: int = 24, steps: int = 600, lr: float = 3e-2, seed: int = 0):
    """Train an EAGLE-3 drafter (an ``Eagle3Model``, in place; returned in eval mode without gradients) to
    draft the target's greedy continuations of ``prompts`` (``new_tokens`` each) with vocabtrim's own
    training-time-test loss: a drafter that the target accepts on these prompts often, but not always
    (about 0.4 per draft at gamma 3 after 600 steps; ~10 s), so that accepted and rejected drafts both occur."""
    from vocabtrim import train

    L = target.config.num_hidden_layers
    layers = model.feature_layers(L)
    rows = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(new_tokens):
                seq.append(int(target(torch.tensor([seq])).logits[0, -1].argmax()))
            out = target.model(input_ids=torch.tensor([seq]), output_hidden_states=True)
            final = out.last_hidden_state[0]
            rows.append({
                "input_ids": torch.tensor(seq), "loss_mask": torch.ones(len(seq), dtype=torch.uint8),
                "aux": torch.cat([out.hidden_states[i][0] for i in layers], -1), "final": final,
                "target_next": target.lm_head(final).argmax(-1),
            })
    batch = train.pad_rows(rows)
    head = target.lm_head.weight[model.token_ids].detach()
    torch.manual_seed(seed)
    model.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = train.ttt_loss(model, batch, head, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.requires_grad_(False).eval()
