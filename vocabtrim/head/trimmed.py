"""The trimmed head in memory: the drafter's LM-head rows for the kept ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrimmedHead:
    """The LM head restricted to K kept ids.

    token_ids: int64 [K], sorted full-vocabulary ids.
    weight:    [K, hidden], the drafter's LM-head rows for those ids (a copy, never a view of the embedding).
    bias:      [K] or None.
    """

    token_ids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[0])

    def to(self, device=None, dtype=None) -> "TrimmedHead":
        return TrimmedHead(
            token_ids=self.token_ids.to(device),
            weight=self.weight.to(device=device, dtype=dtype),
            bias=None if self.bias is None else self.bias.to(device=device, dtype=dtype),
        )


def head_from_ids(model, token_ids) -> TrimmedHead:
    """Copy the rows of ``model``'s LM head for ``token_ids`` (sorted, deduplicated)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).unique(sorted=True).cpu()
    head = model.get_output_embeddings()
    weight = head.weight.detach()[ids.to(head.weight.device)].clone()
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.detach()[ids.to(bias.device)].clone()
    return TrimmedHead(token_ids=ids, weight=weight, bias=bias)
