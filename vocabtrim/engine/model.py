"""One Hugging Face decoder driven by the engine: its base model, a ``Head`` and a static KV cache.

The target and the causal-LM drafter are both a ``ModelRunner``. Only models whose logits are
``head(base(x))`` are accepted (``check_supported``), since the engine computes logits itself (the
trimmed head needs the hidden states, and the verify pass needs logits at every position).
"""

from __future__ import annotations

import inspect

import torch

from vocabtrim.engine.attention import ATTENTION, TAKEN_OVER, use_engine_attention
from vocabtrim.engine.cache import StaticKVCache, causal_mask, prefill_mask
from vocabtrim.engine.cpu_gemm import pack_linears, unpack_linears
from vocabtrim.engine.heads import Head
from vocabtrim.errors import UserError


STATIC_CAPACITY_STEP = 256  # a compiled runner's cache grows in these steps (each growth compiles again)


def pad_rows(tokens: torch.Tensor, positions: torch.Tensor, start: torch.Tensor | None, slots: int):
    """tokens, positions: [n, m]; start: [n] or None → the same for ``slots`` rows, the rows n.. being
    padding that writes position 0 of slots holding no row (a row writes every position before it reads
    it, so nothing reads those writes) and sees only that key."""
    n, m = tokens.shape
    pad = slots - n
    tokens = torch.cat([tokens, tokens.new_zeros(pad, m)])
    positions = torch.cat([positions, positions.new_zeros(pad, m)])
    if start is not None:
        start = torch.cat([start, start.new_zeros(pad)])
    return tokens, positions, start


def static_cache_shape(have: tuple[int, int] | None, slots: int, capacity: int) -> tuple[int, int] | None:
    """The (slots, capacity) a compiled runner's cache needs, given the one it has (``have``; None before
    any): None while ``have`` is large enough to keep, else never fewer slots than before and the
    capacity rounded up to ``STATIC_CAPACITY_STEP`` (each new shape compiles again)."""
    if have is not None and have[0] >= slots and have[1] >= capacity:
        return None
    return max(slots, have[0] if have else 0), -(-capacity // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP


def compile_step(fn, device: torch.device):
    """``fn`` through ``torch.compile`` as the engine's fixed-shape steps are: shapes specialised until a
    second size is seen (then that size symbolic), replayed as CUDA graphs on a GPU."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=None, mode="reduce-overhead" if device.type == "cuda" else None)


def base_model(model):
    """The decoder stack without its head (hidden states after the final norm)."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or base is model:
        raise UserError(f"{type(model).__name__} has no separate base model: not supported as target or drafter")
    return base


def check_supported(model, role: str) -> None:
    """One line, at construction, for models whose logits are not lm_head(base(x)) or whose attention
    the static cache cannot serve."""
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "final_logit_softcapping", None):
        raise UserError(f"the {role} uses final logit softcapping, which vocabtrim's engine does not support")
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in (*TAKEN_OVER, ATTENTION):
        raise UserError(f"the {role} uses attention implementation {impl!r}: load it with attn_implementation=\"sdpa\" "
                        "(or \"eager\"), as vocabtrim.models.load_model does")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and "sliding" in str(
        getattr(cfg, "layer_types", "")
    ):
        raise UserError(f"the {role} uses sliding-window attention, which the engine does not support yet")


class ModelRunner:
    """Forward passes of one model over the engine's slots.

    feature_layers: indices into the model's ``hidden_states`` (0 = embeddings, i = output of decoder
    layer i-1) returned, concatenated on the last axis, with every forward; () for none.
    """

    def __init__(self, model, head: Head, role: str, feature_layers: tuple[int, ...] = ()):
        check_supported(model, role)
        use_engine_attention(model)
        self.model = model
        self.base = base_model(model)
        pack_linears(self.base)  # on CPU, the layers' matmuls through oneDNN with packed weights
        self.head = head
        self.feature_layers = tuple(feature_layers)
        self.device = next(model.parameters()).device
        self.cache: StaticKVCache | None = None
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); vLLM's CPU build pins an older one.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.forward_fn = self._forward  # decode and verify steps; ``compile`` swaps in a compiled one
        self.static = False  # steps at fixed shapes (set by ``compile``)

    def compile(self) -> None:
        """Run decode and verify steps through ``torch.compile`` (CPU inductor; CUDA graphs on a GPU) at
        fixed shapes: every step covers all the cache's slots (rows not in flight are padding) and reads
        all its positions, so the graph depends only on the tokens per row (one graph for 1, one with that
        size symbolic for the rest) and a graph is compiled again only when the cache grows.

        On a CPU a step's cost grows with its rows, so the padding costs time at a run's tail (when
        fewer rows than slots are left)."""
        unpack_linears(self.base)  # the layers traced as plain linears
        self.forward_fn = compile_step(self._forward, self.device)
        self.static = True

    def allocate(self, slots: int, capacity: int) -> None:
        """A cache of at least ``slots`` rows and ``capacity`` positions (exactly ``slots`` when eager;
        compiled, it is kept while large enough and grows by ``STATIC_CAPACITY_STEP`` positions)."""
        if self.static:
            shape = static_cache_shape(None if self.cache is None else (self.cache.slots, self.cache.capacity), slots, capacity)
            if shape is not None:
                self.cache = StaticKVCache.for_model(self.model, *shape)
        elif self.cache is None or self.cache.slots != slots or self.cache.capacity < capacity:
            self.cache = StaticKVCache.for_model(self.model, slots, capacity)

    def _forward(self, tokens, positions, mask):
        out = self.base(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
            output_hidden_states=bool(self.feature_layers),
        )
        feats = None
        if self.feature_layers:
            feats = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        return out.last_hidden_state, feats

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor):
        """tokens: [b, W] right-padded (row r has lengths[r] real tokens at positions 0..);
        slots: [b]. Writes the cache; returns (hidden [b, W, H], features [b, W, F] or None)."""
        width = tokens.shape[1]
        positions = torch.arange(width, device=tokens.device).expand(tokens.shape[0], -1)
        self.cache.prefill(slots, width)
        return self._forward(tokens, positions, prefill_mask(lengths, width))  # eager: prefill shapes vary

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attend: int, start: torch.Tensor | None = None):
        """tokens, positions: [n, m] for slots 0..n-1; keys read: positions 0..attend-1 (from start[row]
        on when ``start`` [n] is given). Returns (hidden [n, m, H], features [n, m, F] or None)."""
        n = tokens.shape[0]
        if self.static:
            tokens, positions, start = pad_rows(tokens, positions, start, self.cache.slots)
            attend = self.cache.capacity
        self.cache.step(tokens.shape[0], positions, attend)
        mask = causal_mask(positions, attend, start)
        if self.static and tokens.shape[1] > 1:  # one graph for every verify length: gamma varies by step
            for t, dim in ((tokens, 1), (positions, 1), (mask, 2)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        hidden, feats = self.forward_fn(tokens, positions, mask)
        if self.static:
            hidden, feats = hidden[:n], None if feats is None else feats[:n]
        return hidden, feats

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.cache.move(src, dst)
