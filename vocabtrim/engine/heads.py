"""LM heads as plain tensors: one ``Head`` type, full-vocabulary or trimmed to a support."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vocabtrim.engine.cpu_gemm import linear_fn
from vocabtrim.errors import UserError


@dataclass
class Head:
    """logits = hidden @ weight.T + bias over ``support`` ids.

    weight: [Kq, hidden]; bias: [Kq] or None; support: [Kq] sorted full-vocabulary ids, or None when
    the head covers the full vocabulary (Kq = V, id = row).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    support: torch.Tensor | None = None
    _linear: object = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        self._linear = linear_fn(self.weight, self.bias)  # oneDNN with the weight packed, on CPU

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] → [..., Kq]."""
        return self._linear(hidden)

    def to_vocab(self, index: torch.Tensor) -> torch.Tensor:
        """Head rows → full-vocabulary ids (one gather for a trimmed head)."""
        return index if self.support is None else self.support[index]


def model_head(model) -> Head:
    """The full LM head of a Hugging Face causal LM."""
    lm_head = model.get_output_embeddings()
    return Head(weight=lm_head.weight, bias=getattr(lm_head, "bias", None))


def check_support(token_ids: torch.Tensor, width: int, what: str = "the trimmed head") -> None:
    """One line if ``token_ids`` is not a non-empty, sorted, unique set of ids below ``width``."""
    if token_ids.ndim != 1 or token_ids.numel() == 0:
        raise UserError(f"{what} has no token ids")
    if not bool((token_ids[1:] > token_ids[:-1]).all()):
        raise UserError(f"{what}'s token ids must be sorted and unique")
    if int(token_ids[0]) < 0 or int(token_ids[-1]) >= width:
        raise UserError(f"{what} keeps token id {int(token_ids[-1])} but the drafter has only {width} logits")


def trimmed_head(token_ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, model) -> Head:
    """A trimmed head checked against ``model``'s LM head and placed on its device and dtype."""
    ref = model.get_output_embeddings().weight
    check_support(token_ids, int(ref.shape[0]))
    if tuple(weight.shape) != (token_ids.numel(), ref.shape[1]):
        raise UserError(f"the trimmed head's weight is {tuple(weight.shape)}, expected ({token_ids.numel()}, {ref.shape[1]})")
    return Head(
        weight=weight.to(device=ref.device, dtype=ref.dtype),
        bias=None if bias is None else bias.to(device=ref.device, dtype=ref.dtype),
        support=token_ids.to(ref.device),
    )
