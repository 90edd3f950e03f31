"""The special token ids of a model: which ids end generation, which id pads, which ids a drafter must keep.

One rule for every stage and engine. ``generation`` is the model's generation config: a transformers
``GenerationConfig`` (``model.generation_config``), the dict of a ``generation_config.json``, or None. Its
``eos_token_id`` may be an int or a list.
"""

from __future__ import annotations


def _field(generation, name: str):
    if generation is None:
        return None
    return generation.get(name) if isinstance(generation, dict) else getattr(generation, name, None)


def _ids(value) -> list[int]:
    """An id field (None, an int, or a list of ints) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]


def eos_ids(tokenizer, generation=None) -> list[int]:
    """The ids that end generation, sorted: the tokenizer's EOS and every EOS of the generation config."""
    return sorted({*_ids(getattr(tokenizer, "eos_token_id", None)), *_ids(_field(generation, "eos_token_id"))})


def pad_id(tokenizer, generation=None) -> int | None:
    """The padding id: the tokenizer's, else the generation config's, else the tokenizer's EOS, else the
    generation config's first EOS (None when there is none of them)."""
    for value in (getattr(tokenizer, "pad_token_id", None), _field(generation, "pad_token_id"),
                  getattr(tokenizer, "eos_token_id", None), _field(generation, "eos_token_id")):
        ids = _ids(value)
        if ids:
            return ids[0]
    return None


def of_model(model):
    """A loaded model's generation config (None when it has none)."""
    return getattr(model, "generation_config", None) if model is not None else None


def special_token_ids(tokenizer, generation=None) -> list[int]:
    """Ids a drafter must always be able to propose, sorted: every EOS (``eos_ids``), the padding id
    (``pad_id``), BOS and UNK (tokenizer and generation config), and every special / added-special token
    (chat-template markers such as ``<|im_end|>``)."""
    ids = set(eos_ids(tokenizer, generation))
    pad = pad_id(tokenizer, generation)
    if pad is not None:
        ids.add(pad)
    for attr in ("bos_token_id", "unk_token_id"):
        ids.update(_ids(getattr(tokenizer, attr, None)))
    for attr in ("bos_token_id", "pad_token_id"):
        ids.update(_ids(_field(generation, attr)))
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None)
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return sorted(ids)
