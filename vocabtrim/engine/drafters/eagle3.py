"""The EAGLE-3 drafter behind the engine's ``Drafter`` seam.

It reads the target's hidden states of three layers (``feature_layers``) from every prefill and verify
pass, fuses them with ``fc`` and keeps them by slot and position; its one decoder layer has its own
position-indexed KV cache (``vocabtrim.eagle3.KVCache``).

Entry p of a row (its KV at position p) reads the target's fused feature at p and the token at p + 1,
and its output predicts the token at p + 2. With the pending token at ``pos``, entries 0..pos-1 can be
computed from committed tokens and the target's features; ``propose`` first computes the ones not yet
computed (``done[slot]`` .. pos-1: the step's accepted tokens, one more per target-alone step), whose
last output gives draft 1. Draft i + 1 comes from entry pos-1+i, which reads draft i's embedding and,
as its feature, entry pos-2+i's own pre-norm output (EAGLE's chain). These chain entries are written
at their positions and overwritten when the row's real tokens get there: a rejected draft needs no
rollback.

Compiled (``compile``), each pass covers every slot and attends to every position, rows not stepped
being padding (position -1: they write the cache's scratch column), and the catch-up window is rounded
up to a power of two (recomputing an entry rewrites the same values): one graph for the chain's single
entries and one for the windows, as the ``ModelRunner``'s steps.
"""

from __future__ import annotations

import torch

from vocabtrim import eagle3 as e3
from vocabtrim.engine.cpu_gemm import pack_linears, unpack_linears
from vocabtrim.engine.drafters.base import CommitInfo, DraftBatch, Proposal
from vocabtrim.engine.model import compile_step, static_cache_shape


class Eagle3Drafter:
    """``Drafter`` over an ``Eagle3Model``; ``support`` is its draft vocabulary (sorted target ids)."""

    def __init__(self, model: e3.Eagle3Model, target_layers: int):
        self.model = model
        pack_linears(model)  # on CPU, its matmuls through oneDNN with packed weights
        self.device = model.fc.weight.device
        self.support = model.token_ids.to(self.device)
        self.feature_layers = tuple(model.feature_layers(target_layers))
        self.cache: e3.KVCache | None = None
        self.fused: torch.Tensor | None = None  # [slots, capacity + 1, hidden]
        self.done: list[int] = []
        self.static = False  # passes at fixed shapes (set by ``compile``)
        self.pass_fn = self._pass

    def compile(self) -> None:
        """Run the drafter's passes through ``torch.compile`` at fixed shapes (CUDA graphs on a GPU)."""
        unpack_linears(self.model)  # traced as plain linears
        self.pass_fn = compile_step(self._pass, self.device)
        self.static = True

    # -- slots --------------------------------------------------------------------------------

    def allocate(self, slots: int, capacity: int) -> None:
        """Compiled, the cache is kept while large enough (``static_cache_shape``), as the ``ModelRunner``'s."""
        if self.static:
            shape = static_cache_shape(
                None if self.cache is None else (self.cache.k.shape[0], self.cache.capacity), slots, capacity)
            if shape is None:
                self.done = [0] * self.cache.k.shape[0]
                return
            slots, capacity = shape
        self.cache = e3.KVCache.allocate(self.model, slots, capacity, self.device)
        hidden = self.model.config.hidden_size
        self.fused = torch.zeros(slots, capacity + 1, hidden, dtype=self.model.fc.weight.dtype, device=self.device)
        self.done = [0] * slots

    def _store_features(self, rows: torch.Tensor, start: torch.Tensor, features: torch.Tensor) -> None:
        """Fuse features [b, P, 3 x target_hidden] and store them at positions start[i] + 0..P-1 of slot rows[i]."""
        cap = self.cache.capacity
        P = features.shape[1]
        cols = start[:, None] + torch.arange(P, device=self.device)[None]
        cols = torch.where(cols < cap, cols, torch.full_like(cols, cap))
        with torch.no_grad():
            self.fused[rows[:, None].expand_as(cols), cols] = e3.fuse(self.model, features.to(self.device))

    @torch.no_grad()
    def admit(self, slots: list[int], history: torch.Tensor, lengths: list[int], features: torch.Tensor | None,
              defer: bool = False) -> None:
        """The prompt's entries are computed now, ``defer`` or not: the target's prompt features exist only now
        (and one layer over them costs little)."""
        rows = torch.tensor(slots, dtype=torch.int64, device=self.device)
        for s in slots:
            self.done[s] = 0
        longest = max(lengths) - 1
        if longest < 1 or features is None:
            return
        self._store_features(rows, torch.zeros_like(rows), features[:, :longest])
        # Entries 0..length-2 of each row: feature at p, token at p + 1.
        lengths_t = torch.tensor(lengths, device=self.device)
        p = torch.arange(longest, device=self.device)[None].expand(len(slots), longest)
        positions = torch.where(p < (lengths_t[:, None] - 1), p, torch.full_like(p, -1))
        tokens = history.to(self.device)[rows][:, 1 : longest + 1]
        self._entries(rows, tokens, self.fused[rows, :longest], positions, longest)
        for s, n in zip(slots, lengths):
            self.done[s] = n - 1

    def _entries(self, rows, tokens, feature, positions, span) -> torch.Tensor:
        emb = e3.embed(self.model, tokens)
        return e3.cached_forward(self.model, self.cache, rows, emb, feature, positions, span)

    def _pass(self, tokens, feature, positions, span: int):
        """Entries for rows 0..n-1 (tokens, positions [n, Q]; feature [n, Q, hidden]) → (the last entry's
        output [n, 1, hidden], its logits over the draft vocabulary [n, K] float32)."""
        out = self._entries(None, tokens, feature, positions, span)[:, -1:]
        return out, e3.logits(self.model, out[:, 0]).float()

    def _step(self, n: int, tokens, feature, positions, span: int):
        """``_pass`` for rows 0..n-1; compiled, over every slot with the others as padding."""
        if not self.static:
            return self.pass_fn(tokens, feature, positions, span)
        pad = self.cache.k.shape[0] - n
        tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])])
        feature = torch.cat([feature, feature.new_zeros(pad, *feature.shape[1:])])
        positions = torch.cat([positions, positions.new_full((pad, positions.shape[1]), -1)])
        graphs = self.device.type == "cuda"  # compile_step replays CUDA graphs there
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last pass's outputs are consumed or cloned
        out, step_logits = self.pass_fn(tokens, feature, positions, self.cache.capacity)
        return (out[:n].clone() if graphs else out[:n]), step_logits[:n]

    # -- drafting -----------------------------------------------------------------------------

    @torch.no_grad()
    def propose(self, batch: DraftBatch) -> Proposal:
        n, G = batch.n, batch.gamma
        rows = torch.arange(n, device=self.device)
        pos = batch.pos.to(self.device)
        pos_host = batch.pos_host
        M = max(1, max(p - self.done[r] for r, p in enumerate(pos_host[:n])))
        if self.static:
            M = 1 << (M - 1).bit_length()  # few window sizes, few graphs
        # Catch-up: entries pos-M .. pos-1 of every row (recomputing a computed one is harmless).
        p = pos[:, None] - M + torch.arange(M, device=self.device)[None]
        positions = torch.where(p >= 0, p, torch.full_like(p, -1))
        safe = p.clamp(min=0)
        history = batch.history.to(self.device)
        tokens = history[rows[:, None], (safe + 1).clamp(max=history.shape[1] - 1)]
        feature = self.fused[rows[:, None], safe]
        span = max(1, min(max(pos_host[:n]) + G, self.cache.capacity))
        out, step_logits = self._step(n, tokens, feature, positions, span)  # [n, 1, hidden], [n, K]
        for r in range(n):
            self.done[r] = pos_host[r]
        draft_tokens, qs = [], []
        for i in range(G):
            if i > 0:
                last = draft_tokens[-1][:, None]
                out, step_logits = self._step(n, last, out, (pos - 1 + i)[:, None], span)
            index, q = batch.choose(step_logits, i)
            draft_tokens.append(self.support[index])
            qs.append(q)
        tokens_out = torch.stack(draft_tokens, dim=1)
        q_out = None if qs[0] is None else torch.stack(qs, dim=1)
        return Proposal(tokens=tokens_out, q=q_out)

    @torch.no_grad()
    def commit(self, info: CommitInfo) -> None:
        if info.features is None:
            return
        rows = torch.arange(info.n, device=self.device)
        self._store_features(rows, info.pos.to(self.device), info.features[: info.n])

    def move(self, src: list[int], dst: list[int]) -> None:
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        self.cache.k[d] = self.cache.k[s]
        self.cache.v[d] = self.cache.v[s]
        self.fused[d] = self.fused[s]
        done = list(self.done)
        for a, b in zip(src, dst):
            done[b] = self.done[a]
        self.done = done

    def release(self, slots: list[int]) -> None:
        for s in slots:
            self.done[s] = 0
