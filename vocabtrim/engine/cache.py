"""A static KV cache written by position, one row per batch slot (gpt-fast's cache, made per-row).

Each layer holds ``k``/``v`` buffers [slots, kv_heads, capacity, head_dim], allocated once. A forward
writes its new keys and values at each row's own positions, so a row that rejected drafts needs no
rollback: its next step simply overwrites those positions. A query at position t attends to the
positions 0..t of its row (``causal_mask``); whatever lies beyond a row's length is stale and never
read before it is overwritten.

Two modes, set before each forward:
- ``step(n, positions, attend)``: rows are slots 0..n-1; writes at ``positions`` [n, m] and returns
  views of the first ``attend`` positions (no copies).
- ``prefill(slots, length)``: fresh rows in arbitrary ``slots``; writes positions 0..length-1 and
  returns the new keys and values themselves (nothing older exists).

It implements what Hugging Face decoder layers call on a cache (``update``, ``get_seq_length``).
"""

from __future__ import annotations

import torch
import torch._dynamo


class StaticKVCache:
    is_compileable = False
    is_sliding = [False]

    def __init__(self, n_layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        for buf in (*self.k, *self.v):
            # Fixed addresses: a compiled step writes them in place and still replays as a CUDA graph (one
            # whose inputs are mutated is otherwise run without graphs).
            torch._dynamo.mark_static_address(buf)
        self.slots, self.capacity = slots, capacity
        self._mode = None

    @classmethod
    def for_model(cls, model, slots: int, capacity: int) -> "StaticKVCache":
        cfg = model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, slots, kv, capacity, head_dim, p.dtype, p.device)

    # -- modes ------------------------------------------------------------------------------

    def step(self, n: int, positions: torch.Tensor, attend: int) -> None:
        """Rows 0..n-1 write at ``positions`` [n, m] and read positions 0..attend-1."""
        self._mode = ("step", n, positions, attend)

    def prefill(self, slots: torch.Tensor, length: int) -> None:
        """Rows in ``slots`` [b] write positions 0..length-1."""
        self._mode = ("prefill", slots, length)

    # -- what the decoder layers call -------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [b, kv_heads, m, head_dim] → the keys and values to attend to."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._mode[0] == "step":
            _, n, positions, attend = self._mode
            index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            kn, vn = k[:n], v[:n]
            kn.scatter_(2, index, key_states.to(k.dtype))
            vn.scatter_(2, index, value_states.to(v.dtype))
            return kn[:, :, :attend], vn[:, :, :attend]
        _, slots, length = self._mode
        k[:, :, :length].index_copy_(0, slots, key_states.to(k.dtype))
        v[:, :, :length].index_copy_(0, slots, value_states.to(v.dtype))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._mode is None or self._mode[0] == "prefill" else self._mode[3]

    # -- slots ------------------------------------------------------------------------------

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the rows in slots ``src`` [r] to slots ``dst`` [r]."""
        for buf in (*self.k, *self.v):
            buf.index_copy_(0, dst, buf.index_select(0, src))


def causal_mask(positions: torch.Tensor, attend: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """positions: [n, m] query positions → [n, 1, m, attend] bool: key j is seen iff j <= position, and
    j >= start[row] when ``start`` [n] is given (a row whose context begins later; its queries must sit
    at or after its start, or they would see no key)."""
    keys = torch.arange(attend, device=positions.device)
    seen = keys[None, None, :] <= positions[:, :, None]
    if start is not None:
        seen = seen & (keys[None, None, :] >= start[:, None, None])
    return seen.unsqueeze(1)


def prefill_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """lengths: [b] tokens per row (right-padded to ``width``) → [b, 1, width, width] bool.

    Causal within each row; a padding query sees only itself (its output is never used).
    """
    i = torch.arange(width, device=lengths.device)
    causal = i[None, :] <= i[:, None]  # [width, width]
    valid = i[None, :] < lengths[:, None]  # [b, width]
    allowed = causal[None] & valid[:, None, :]
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=lengths.device)[None]
    return allowed.unsqueeze(1)
