"""The engine's attention: PyTorch SDPA over grouped KV heads without copying them.

Transformers' own SDPA wrapper repeats the key/value heads (``repeat_kv``) whenever a mask is passed
on CPU and CUDA; with a static cache of ``capacity`` positions that is a copy of every layer's cache
per step. This function passes ``enable_gqa=True`` instead, and is registered once under
``ATTENTION`` through transformers' ``AttentionInterface``. Calls without a 4-D boolean mask (plain
Hugging Face use of the same model object) go to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "vocabtrim_sdpa"
TAKEN_OVER = ("sdpa", "eager")  # the attentions ``use_engine_attention`` switches a model from


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query: [b, heads, m, d]; key, value: [b, kv_heads, L, d]; attention_mask: [b, 1, m, L] bool.

    Returns ([b, m, heads, d], None) as transformers' attention functions do.
    """
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.ndim != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # From the module's config when it says (a plain bool): under torch.compile with dynamic shapes the head
    # counts are symbolic, and SDPA refuses a symbolic enable_gqa (a graph break at every layer).
    groups = getattr(module, "num_key_value_groups", None)
    gqa = groups > 1 if isinstance(groups, int) else bool(query.shape[1] != key.shape[1])
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, gqa_sdpa_forward)


def use_engine_attention(model) -> None:
    """Switch ``model`` (one of ``TAKEN_OVER``) to ``ATTENTION``; its plain use keeps working (see above)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == ATTENTION:
        return
    model.set_attn_implementation(ATTENTION)
