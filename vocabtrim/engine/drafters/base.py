"""The seam between the engine and its drafters: one protocol, whatever the drafter is.

The engine keeps up to ``slots`` rows in flight; the rows being stepped are always slots
``0..n-1`` (it moves rows down when others finish). A row's tokens live in the engine's
``history`` buffer [slots, capacity] by position: the prompt, then every committed token, and the
*pending* token (the latest token, whose KV is in no cache yet) at position ``pos``.

Per step with ``gamma`` = G > 0:
1. ``propose(batch)``: the drafter returns G draft tokens per row (full-vocabulary ids) and the
   logits it drew them from (over its own support);
2. the target verifies pending + G drafts in one pass (G + 1 positions ``pos .. pos+G``);
3. ``commit(result)``: the drafter learns how many drafts each row accepted, and receives the
   target's hidden states of the verified positions when it asked for them (``feature_layers``).
With gamma 0 the target steps alone, and ``commit`` is still called (accepted = 0, one position),
so a drafter never misses a committed token or a feature.

Rows enter with ``admit`` (after the target's prefill, with the target's features of the prompt)
and leave with ``release``; ``move`` renumbers slots.

While adaptive gamma has drafting off, the engine tells ``admit`` it may defer its work (the rows may
never be drafted for), and marks the step that probes the drafter again with ``max_catch_up``: a
drafter that has fallen far behind may then rebuild a row's context from its last tokens only. Both
change what the drafter proposes, never what the engine emits being lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

# choose(logits [n, Kq], draft_index i) -> (index [n] int64 into the support, q [n, Kq] float32 or None)
Choose = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class DraftBatch:
    """What a drafter sees when asked to propose.

    n:        rows stepped (slots 0..n-1).
    gamma:    drafts to propose per row (>= 1).
    pending:  [n] int64, each row's pending token (in ``history`` at ``pos``).
    pos:      [n] int64, the pending token's position.
    pos_host: the same positions as a host list (no device sync needed to read them).
    history:  [slots, capacity] int64, every row's tokens by position (prompt, committed, pending).
    choose:   the sampler's rule for turning the drafter's logits at draft i into a token
              (argmax, Gumbel-max with the row's noise at that position, or an inverse-CDF draw);
              it also returns the processed distribution q when the verifier needs it.
    max_catch_up: None, or (a probe after target-alone steps) the most tokens per row the drafter
              should feed to catch up: a row further behind may restart its context at its last
              ``max_catch_up`` tokens.
    """

    n: int
    gamma: int
    pending: torch.Tensor
    pos: torch.Tensor
    pos_host: list[int]
    history: torch.Tensor
    choose: Choose
    max_catch_up: int | None = None


@dataclass
class Proposal:
    """tokens: [n, G] int64 full-vocabulary ids; q: [n, G, Kq] float32 distributions they were drawn
    from (None when the sampler does not need them, e.g. greedy or Gumbel coupling)."""

    tokens: torch.Tensor
    q: torch.Tensor | None


@dataclass
class CommitInfo:
    """The outcome of one step, per row.

    n:             rows stepped (slots 0..n-1).
    gamma:         drafts proposed this step (0 for a target-alone step).
    pos:           [n] int64 position of the pending token *before* the step; pos_host the same on host.
    accepted:      [n] int64 drafts accepted (0..gamma); accepted_host the same as a list.
    features:      [n, gamma + 1, F] the target's hidden states (``feature_layers`` concatenated on
                   the last axis) at positions pos .. pos+gamma, or None when the drafter reads none.
                   Positions pos .. pos+accepted hold committed tokens; later ones were rejected.
    """

    n: int
    gamma: int
    pos: torch.Tensor
    pos_host: list[int]
    accepted: torch.Tensor
    accepted_host: list[int]
    features: torch.Tensor | None


class Drafter(Protocol):
    """A drafter as the engine sees it. Implementations: ``causal_lm.CausalLMDrafter`` (a Hugging Face
    causal LM, full or trimmed head) and ``eagle3.Eagle3Drafter`` (reads the target's hidden states)."""

    #: [Kq] sorted full-vocabulary ids the drafter can propose, or None for the full vocabulary.
    support: torch.Tensor | None
    #: indices into the target's ``hidden_states`` (0 = embeddings, i = output of decoder layer i-1)
    #: whose states the drafter reads, concatenated in this order; () for a drafter that reads none.
    feature_layers: tuple[int, ...]

    def compile(self) -> None:
        """Run the drafter's passes through ``torch.compile`` from now on (``EngineConfig.compile``)."""

    def allocate(self, slots: int, capacity: int) -> None:
        """Preallocate per-slot state for ``slots`` rows of up to ``capacity`` positions."""

    def admit(self, slots: list[int], history: torch.Tensor, lengths: list[int], features: torch.Tensor | None,
              defer: bool = False) -> None:
        """Rows just prefilled by the target into ``slots``: their prompt tokens are ``history[slots, :length]``
        (the last one is pending); ``features`` [b, max(lengths) - 1, F] are the target's hidden states at
        positions 0 .. length-2 (right-padded), or None. ``defer``: drafting is off; work that can wait
        for the next ``propose`` may wait."""

    def propose(self, batch: DraftBatch) -> Proposal:
        """Draft ``batch.gamma`` tokens for rows 0..n-1."""

    def commit(self, info: CommitInfo) -> None:
        """Learn the step's outcome (called after every step, gamma 0 included)."""

    def move(self, src: list[int], dst: list[int]) -> None:
        """Slot ``src[i]``'s row now lives in slot ``dst[i]`` (copy its state)."""

    def release(self, slots: list[int]) -> None:
        """These slots' rows have finished."""
