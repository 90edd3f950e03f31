"""A Llama draft model with a trimmed LM head, as a vLLM out-of-tree model (imported only where vLLM is installed).

vLLM's ``draft_model`` proposer calls the drafter's ``compute_logits`` (and, with
``use_local_argmax_reduction``, its ``get_top_tokens``) and has no hook for a reduced vocabulary.
``TrimmedHeadLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` whose head is replaced by the K kept rows
of a vocabtrim head:

- ``compute_logits(hidden [n, hidden]) -> [n, V]``: the K logits placed at their full-vocabulary ids,
  every other id ``-inf``. The drafter never proposes a dropped id and, where vLLM uses draft
  probabilities, gives it probability 0, so vLLM's rejection sampler works unchanged and stays lossless.
- ``get_top_tokens(hidden [n, hidden]) -> [n]``: the argmax over the K rows mapped to its
  full-vocabulary id, with no vocabulary-wide tensor at all (vLLM's greedy drafting path when
  ``use_local_argmax_reduction`` is on).

The model folder vLLM loads (``vocabtrim.vllm_backend.drafter_folder`` writes it) is the drafter's own
folder plus ``vocabtrim_head.safetensors`` (``vocabtrim_head.token_ids`` int64 [K],
``vocabtrim_head.weight`` [K, hidden], optional ``vocabtrim_head.bias`` [K]) and a ``config.json``
naming ``ARCHITECTURE`` with ``vocabtrim_head_k`` and ``vocabtrim_head_bias``. vLLM's weight loader
reads the head file with the rest of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM

ARCHITECTURE = "VocabtrimTrimmedLlamaForCausalLM"  # vocabtrim.vllm_backend.TRIMMED_ARCHITECTURE


class TrimmedLMHead(nn.Module):
    """The K kept rows of an LM head and their full-vocabulary ids.

    weight: [K, hidden]; bias: [K] or None; token_ids: int64 [K], sorted full-vocabulary ids.
    """

    def __init__(self, k: int, hidden: int, vocab_size: int, has_bias: bool, dtype: torch.dtype):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(k, hidden, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(k, dtype=dtype), requires_grad=False) if has_bias else None
        self.register_buffer("token_ids", torch.empty(k, dtype=torch.long), persistent=True)
        # [rows, V]: -inf everywhere but the K kept columns, which every call overwrites. Allocated once
        # (grown when a call has more rows), so a call writes n*K values instead of filling n*V.
        self._placed: torch.Tensor | None = None
        self._linear = nn.functional.linear  # (x, weight, bias) -> x @ weight.T + bias; see prepare()

    def prepare(self) -> None:
        """Once the weights are loaded: on CPU, the matmul through vLLM's own CPU GEMM (oneDNN with the
        weight packed once, as vLLM does for every linear layer and the target's head); ``F.linear``
        takes several times longer per row there. Elsewhere ``F.linear`` is what vLLM itself runs."""
        if self.weight.device.type != "cpu":
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(self, remove_weight=False)  # sets self.cpu_linear(x, weight, bias)
        self._linear = self.cpu_linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [n, hidden] -> logits on the kept ids [n, K]."""
        return self._linear(hidden_states.to(self.weight.dtype), self.weight, self.bias)

    def place(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, K] -> [n, V]: column token_ids[i] holds logits[:, i], every other column -inf.

        The result is a view of a buffer that the next call overwrites on the same K columns; callers
        that change it in place (vLLM divides draft logits by the temperature) leave the -inf columns -inf.
        """
        n = logits.shape[0]
        buf = self._placed
        if buf is None or buf.shape[0] < n or buf.dtype != logits.dtype or buf.device != logits.device:
            rows = max(n, 0 if buf is None else buf.shape[0])
            buf = torch.full((rows, self.vocab_size), float("-inf"), dtype=logits.dtype, device=logits.device)
            self._placed = buf
        out = buf[:n]
        out.index_copy_(1, self.token_ids, logits)
        return out

    def top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [n, hidden] -> the full-vocabulary id of each row's largest kept logit [n]."""
        return self.token_ids[self(hidden_states).argmax(dim=-1)]


class TrimmedHeadLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with its logits computed on the K rows of a vocabtrim head (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        if float(getattr(config, "logit_scale", 1.0)) != 1.0:
            raise ValueError(f"{ARCHITECTURE} does not support logit_scale != 1")
        self.vocabtrim_head = TrimmedLMHead(
            k=int(config.vocabtrim_head_k),
            hidden=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            has_bias=bool(getattr(config, "vocabtrim_head_bias", False)),
            dtype=vllm_config.model_config.dtype,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.vocabtrim_head.place(self.vocabtrim_head(hidden_states))

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.vocabtrim_head.top_tokens(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        head = {}

        def rest():
            for name, tensor in weights:
                if name.startswith("vocabtrim_head."):
                    head[name] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(rest()))
        params = dict(self.vocabtrim_head.named_parameters())
        params.update(self.vocabtrim_head.named_buffers())
        for name, tensor in head.items():
            short = name.removeprefix("vocabtrim_head.")
            if short not in params:
                raise ValueError(f"unexpected tensor {name} in the trimmed head")
            target = params[short]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{name} is {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.data.copy_(tensor.to(target.dtype))
            loaded.add(name)
        missing = {"vocabtrim_head." + n for n in params} - loaded
        if missing:
            raise ValueError(f"the trimmed-head drafter folder lacks {sorted(missing)}")
        self.vocabtrim_head.prepare()
        return loaded
