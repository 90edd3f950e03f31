"""A Hugging Face causal LM as a drafter (a smaller model of the same family, or the target's first
N layers), with its full LM head or a trimmed one.

Its static cache is written by position like the target's. ``valid[s]``: positions below it hold
KV computed from the row's committed tokens. Each ``propose`` first feeds a window of the last m
tokens ending at the pending one, m being the largest lag among the rows (1 after a step in which a
draft was rejected, 2 after one that accepted all G, more after target-alone steps); rows that lag
less re-feed tokens they already hold, which rewrites the same positions with the same values.

While drafting is off, ``admit(defer=True)`` skips the prompt's prefill and the rows fall behind by a
token per step; a probe (``max_catch_up`` = W) restarts every row more than W tokens behind at its last
W tokens: ``start[s]`` is then the first position the row's queries see (``causal_mask``), so the probe
costs W tokens per row, not the whole context. A restarted row keeps that shorter context until it ends.
"""

from __future__ import annotations

import numpy as np
import torch

from vocabtrim.engine.drafters.base import CommitInfo, DraftBatch, Proposal
from vocabtrim.engine.heads import Head, model_head
from vocabtrim.engine.model import ModelRunner


def attend_length(last_position: int, capacity: int, bucket: int = 32) -> int:
    """Keys to read when the latest query sits at ``last_position``: rounded up to ``bucket`` so few
    distinct shapes occur, and never past ``capacity``."""
    return min(capacity, -(-(last_position + 1) // bucket) * bucket)


class CausalLMDrafter:
    feature_layers: tuple[int, ...] = ()

    def __init__(self, model, head: Head | None = None):
        self.runner = ModelRunner(model, head if head is not None else model_head(model), "drafter")
        self.support = self.runner.head.support
        self.valid = np.zeros(0, dtype=np.int64)
        self.start = np.zeros(0, dtype=np.int64)
        self.capacity = 0

    def compile(self) -> None:
        self.runner.compile()

    def allocate(self, slots: int, capacity: int) -> None:
        self.runner.allocate(slots, capacity)
        self.valid = np.zeros(slots, dtype=np.int64)
        self.start = np.zeros(slots, dtype=np.int64)
        self.capacity = capacity

    def admit(self, slots, history, lengths, features, defer: bool = False) -> None:
        self.start[slots] = 0
        self.valid[slots] = 0
        if defer:  # the next propose feeds what these rows need
            return
        width = max(lengths) - 1
        if width > 0:
            index = torch.tensor(slots, device=history.device)
            fed = torch.tensor([n - 1 for n in lengths], device=history.device)
            self.runner.prefill(history.index_select(0, index)[:, :width], fed, index)
        self.valid[slots] = np.asarray(lengths) - 1

    def propose(self, batch: DraftBatch) -> Proposal:
        n, g = batch.n, batch.gamma
        pos_host = np.asarray(batch.pos_host)
        valid, start = self.valid[:n], self.start[:n]  # views
        if batch.max_catch_up is not None:
            far = pos_host - valid > batch.max_catch_up
            start[far] = pos_host[far] - batch.max_catch_up
            valid[far] = start[far]
        m = int((pos_host - valid).max()) + 1
        offsets = torch.arange(-(m - 1), 1, device=batch.pos.device)
        positions = batch.pos[:, None] + offsets[None]  # [n, m]
        first = torch.as_tensor(start, device=batch.pos.device) if start.any() else None
        positions = positions.clamp(min=0) if first is None else torch.maximum(positions, first[:, None])
        tokens = batch.history[:n].gather(1, positions)
        top = int(pos_host.max())
        head = self.runner.head
        drafts, qs = [], []
        for i in range(g):
            hidden, _ = self.runner.step(tokens, positions, attend_length(top + i, self.capacity), first)
            index, q = batch.choose(head.logits(hidden[:, -1]), i)
            drafts.append(head.to_vocab(index))
            qs.append(q)
            tokens, positions = drafts[-1][:, None], (batch.pos + i + 1)[:, None]
        return Proposal(tokens=torch.stack(drafts, 1), q=None if qs[0] is None else torch.stack(qs, 1))

    def commit(self, info: CommitInfo) -> None:
        if info.gamma > 0:  # it fed pending and drafts 1..G-1: those accepted are now valid
            acc = np.minimum(np.asarray(info.accepted_host), info.gamma - 1)
            self.valid[: info.n] = np.asarray(info.pos_host) + acc + 1

    def move(self, src, dst) -> None:
        device = self.runner.device
        self.runner.move(torch.tensor(src, device=device), torch.tensor(dst, device=device))
        self.valid[dst] = self.valid[src]
        self.start[dst] = self.start[src]

    def release(self, slots) -> None:
        self.valid[slots] = 0
        self.start[slots] = 0
