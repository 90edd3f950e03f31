"""Linear layers through oneDNN with the weight packed once, on CPU.

A decode or verify step multiplies a few rows (1 to batch x (gamma + 1)) by every weight of the model.
On a CPU, ``F.linear`` does that with the weight as stored; oneDNN with the weight reordered once into
its blocked layout (what PyTorch's inductor does when it freezes a model, and vLLM's CPU build for every
linear layer) is 1.3-1.5x faster at 8 rows on the bundled model's layer shapes (0.8x on its small key
and value projections) and 2.6x on its 49,152-row head (``benchmarks/bench_engine.py --cases gemm``).
The packed copy is made once per weight and costs the weight's size again in memory.

``VOCABTRIM_PACKED_GEMM=0`` turns it off (``F.linear`` everywhere, no packed copies). Only forward
passes without autograd use it: under ``torch.compile`` (traced as plain linears) or with gradients on,
``F.linear`` runs as before. A weight changed in place after packing is packed again.
"""

from __future__ import annotations

import os

import torch
from torch import nn

# The row count oneDNN chooses the packed layout for (any row count then runs on it).
PACK_ROWS = 8
# One or two rows (a batch-1 decode step, a batch-1 verify of one draft) times a weight smaller than this
# run F.linear: there the packed product measured 0.4-0.9x (the bundled model's layers), against 1.0-1.4x on
# its 28M-element head.
SINGLE_ROW_MIN_WEIGHT = 1 << 22
# Up to four rows times a weight smaller than this (the bundled model's attention projections) run F.linear
# too: 0.4-0.7x packed, where its MLP weights (885K elements) gain 1.5x from packing at four rows.
SMALL_WEIGHT = 1 << 19


def plain_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """At most two rows of x times a weight under ``SINGLE_ROW_MIN_WEIGHT`` elements, or at most four rows
    times one under ``SMALL_WEIGHT``."""
    rows = x.numel() // x.shape[-1]
    return (rows <= 2 and weight.numel() < SINGLE_ROW_MIN_WEIGHT) or (rows <= 4 and weight.numel() < SMALL_WEIGHT)


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN serves this weight: CPU, float32 (or bfloat16 where the CPU has it), 2-D."""
    if weight.device.type != "cpu" or weight.ndim != 2 or not torch.backends.mkldnn.is_available():
        return False
    if os.environ.get("VOCABTRIM_PACKED_GEMM", "1") == "0":
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear:
    """``x @ weight.T + bias`` for x [..., in] -> [..., out], through the packed weight when it may.

    The packed copy is keyed by the weight's storage, dtype and version, so ``.double()``, ``.to()`` or an
    in-place update is followed; copies and pickles leave it out (it is made again on first use)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None  # None: F.linear (not packable)
        self.key: tuple | None = None

    def __getstate__(self):
        return {**self.__dict__, "packed": None, "key": None}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() or not x.is_cpu or x.dtype != w.dtype or torch.compiler.is_compiling()
                or plain_is_faster(x, w)):
            return nn.functional.linear(x, w, self.bias)
        key = (w.data_ptr(), w.dtype, 0 if w.is_inference() else w._version)  # inference tensors never change
        if self.key != key:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS) if packable(w) else None
            self.key = key
        if self.packed is None:
            return nn.functional.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def linear_fn(weight: torch.Tensor, bias: torch.Tensor | None):
    """A callable x -> x @ weight.T + bias: packed where ``packable``, else ``F.linear``."""
    if packable(weight):
        return PackedLinear(weight, bias)
    return lambda x: nn.functional.linear(x, weight, bias)


def pack_linears(module: nn.Module) -> int:
    """Route every ``nn.Linear`` under ``module`` with a packable weight through ``PackedLinear`` (its
    instance ``forward``; the module and its parameters are unchanged). Returns how many were routed;
    a layer already routed is left as it is."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and not isinstance(m.__dict__.get("forward"), _LinearForward) and packable(m.weight):
            m.forward = _LinearForward(m)
            count += 1
    return count


def unpack_linears(module: nn.Module) -> None:
    """Undo ``pack_linears``: every ``nn.Linear`` under ``module`` runs its own forward again."""
    for m in module.modules():
        if isinstance(m.__dict__.get("forward"), _LinearForward):
            del m.forward


class _LinearForward:
    """An ``nn.Linear``'s forward through ``PackedLinear``; reads the module's weight and bias each call,
    so a parameter replaced on the module is used (and packed) from then on."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.linear = PackedLinear(module.weight, module.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, lin = self.module, self.linear
        if plain_is_faster(x, m.weight):
            return nn.functional.linear(x, m.weight, m.bias)  # without PackedLinear's checks
        if lin.weight is not m.weight or lin.bias is not m.bias:
            self.linear = lin = PackedLinear(m.weight, m.bias)
        return lin(x)
