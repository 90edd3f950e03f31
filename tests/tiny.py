"""Tiny models built in the test: a byte-level BPE tokenizer and random Llama configs.

Everything here is deterministic (fixed seeds), takes milliseconds, and touches no network.
"""

from __future__ import annotations

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
