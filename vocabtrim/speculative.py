"""Batched speculative decoding over Hugging Face causal LMs, with an optional trimmed drafter head.

One step for a batch of rows (gamma = G):
1. the drafter proposes G tokens, one forward each, from its own KV cache (its head may be a
   trimmed head: its distribution q lives on K ids);
2. the target scores the pending token and the G drafts in ONE forward pass (G + 1 positions);
3. the rejection sampler (``vocabtrim.engine.sampling``) decides, per row, how many drafts are accepted
   and draws the recovered or bonus token;
4. both caches keep exactly the accepted prefix.

Cache layout ("slot" caches, NOTES design lead (a)): every row of the batch appends the same number
of slots per forward; a per-row validity mask hides padding and rejected drafts from attention, and
each row carries its own position ids, so nothing is rolled back or re-padded per step. Rejected
slots are squeezed out (and finished rows dropped) by an occasional compaction. Rows therefore
accept different numbers of tokens per step and finish on their own, and a row's arithmetic never
depends on its batch-mates beyond floating-point summation order.

Per-row determinism: every random draw of a row comes from that row's own ``torch.Generator``,
seeded by the caller (``vocabtrim.engine.sampling.row_seed``), and each step draws a fixed number of
uniforms per row, so the same row and seed give the same tokens at any batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from vocabtrim.errors import UserError
from vocabtrim.head import TrimmedHead
from vocabtrim.models import logits_width
from vocabtrim.engine.sampling import SamplingParams, logits_to_probs, sample_from_probs, verify_greedy, verify_sampled

# ---------------------------------------------------------------------------------------------
# Slot KV cache
# ---------------------------------------------------------------------------------------------


class SlotLayer(DynamicLayer):
    """A KV layer preallocated along the sequence axis and written by slot (no concatenation per step).

    ``keys`` / ``values`` are views [B, H, length, D] of buffers [B, H, capacity, D].
    """

    def __init__(self):
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        if self._k is not None and self._k.shape[2] >= need:
            return
        cap = max(need, 64, 0 if self._k is None else 2 * self._k.shape[2])
        b, h, _, d = like.shape
        k = like.new_empty((b, h, cap, d))
        v = like.new_empty((b, h, cap, d))
        if self._k is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def _publish(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self.length + n, key_states)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def regather(self, rows: torch.Tensor, slots: torch.Tensor, headroom: int) -> None:
        """Keep batch ``rows`` [B'] and, for each, the cache ``slots`` [B', L'] in that order."""
        if self._k is None:
            return
        b, lnew = slots.shape
        h, d = self._k.shape[1], self._k.shape[3]
        index = slots[:, None, :, None].expand(b, h, lnew, d)
        k = self._k[:, :, : self.length].index_select(0, rows).gather(2, index)
        v = self._v[:, :, : self.length].index_select(0, rows).gather(2, index)
        self._k = self._v = None
        self.length = 0
        self._reserve(lnew + headroom, k)
        self._k[:, :, :lnew] = k
        self._v[:, :, :lnew] = v
        self.length = lnew
        self._publish()


def new_slot_cache(model) -> Cache:
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[SlotLayer() for _ in range(n_layers)])


def compaction_slots(valid: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept row's valid slots go when squeezed to the right (left padding).

    valid: [B, L] bool; rows: [B'] int64. Returns (slots [B', L'] int64 source slot per new slot,
    new_valid [B', L'] bool) with L' = the largest valid count among kept rows.
    """
    kept = valid.index_select(0, rows)
    new_len = int(kept.sum(1).max().item()) if kept.numel() else 0
    # Stable sort puts invalid slots first and keeps valid ones in their original order.
    order = torch.sort(kept.to(torch.int8), dim=1, stable=True).indices
    slots = order[:, kept.shape[1] - new_len :]
    return slots, kept.gather(1, slots)


def attention_mask_4d(valid_cache: torch.Tensor, valid_new: torch.Tensor, additive_dtype=None) -> torch.Tensor:
    """The attention mask for ``n`` new slots appended after ``L`` cached slots.

    valid_cache: [B, L] bool; valid_new: [B, n] bool. Returns [B, 1, n, L + n]: query i sees slot j
    iff j is valid and j <= L + i; a query always sees its own slot (so padding queries stay finite).
    Bool (True = attend) for SDPA, or additive floats of ``additive_dtype`` for eager attention.
    """
    b, length = valid_cache.shape
    n = valid_new.shape[1]
    valid = torch.cat([valid_cache, valid_new], dim=1)  # [B, L+n]
    j = torch.arange(length + n, device=valid.device)
    i = torch.arange(n, device=valid.device) + length
    causal = j[None, :] <= i[:, None]  # [n, L+n]
    own = j[None, :] == i[:, None]
    allowed = (valid[:, None, :] & causal[None]) | own[None]
    allowed = allowed[:, None]  # [B, 1, n, L+n]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=valid.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


@dataclass
class Head:
    """An LM head as plain tensors: logits = hidden @ weight.T + bias over ``support`` ids.

    weight: [Kq, hidden]; bias: [Kq] or None; support: [Kq] sorted full-vocabulary ids, or None
    when the head covers the full vocabulary (Kq = V, id = index).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    support: torch.Tensor | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] → [..., Kq]."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    def to_vocab(self, index: torch.Tensor) -> torch.Tensor:
        """Head-row indices → full-vocabulary ids (one gather for a trimmed head)."""
        return index if self.support is None else self.support[index]


def model_head(model) -> Head:
    lm_head = model.get_output_embeddings()
    return Head(weight=lm_head.weight, bias=getattr(lm_head, "bias", None), support=None)


def trimmed_head(head: TrimmedHead, drafter) -> Head:
    """Check a trimmed head against its drafter and place it on the drafter's device and dtype."""
    width = logits_width(drafter)
    ids = head.token_ids
    if ids.ndim != 1 or ids.numel() == 0:
        raise UserError("the trimmed head has no token ids")
    if int(ids.max()) >= width or int(ids.min()) < 0:
        raise UserError(f"the trimmed head keeps token id {int(ids.max())} but the drafter has only {width} logits")
    if not bool((ids[1:] > ids[:-1]).all()):
        raise UserError("the trimmed head's token ids must be sorted and unique")
    ref = drafter.get_output_embeddings().weight
    if head.weight.shape != (ids.numel(), ref.shape[1]):
        raise UserError(f"the trimmed head's weight is {tuple(head.weight.shape)}, expected ({ids.numel()}, {ref.shape[1]})")
    placed = head.to(device=ref.device, dtype=ref.dtype)
    return Head(weight=placed.weight, bias=placed.bias, support=placed.token_ids)


def base_model(model):
    """The decoder stack without its head (returns hidden states after the final norm)."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or base is model:
        raise UserError(f"{type(model).__name__} has no separate base model: not supported as target or drafter")
    return base


def check_supported(model, role: str) -> None:
    """Fail loudly, at construction, on models whose logits are not lm_head(base(x))."""
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "final_logit_softcapping", None):
        raise UserError(f"the {role} uses final logit softcapping, which vocabtrim's engine does not support")
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise UserError(f"the {role} uses attention implementation {impl!r}: load it with sdpa or eager")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and "sliding" in str(
        getattr(cfg, "layer_types", "")
    ):
        raise UserError(f"the {role} uses sliding-window attention, which the engine does not support yet")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class RowOutput:
    """What one row generated.

    token_ids: generated ids only (EOS included when the row stopped on it).
    finish_reason: "stop" (EOS) or "length" (max_new_tokens).
    proposed / accepted: drafts proposed and accepted over all steps.
    target_passes: target forward passes this row took part in (prefill excluded).
    accepted_hist: [gamma + 1] steps that accepted exactly j drafts.
    """

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    accepted_hist: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    """Timings of the last ``generate`` call (seconds; device-synchronised)."""

    drafter_seconds: float = 0.0
    drafter_forwards: int = 0
    target_seconds: float = 0.0
    target_passes: int = 0
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def drafter_step_ms(self) -> float:
        return 1000.0 * self.drafter_seconds / self.drafter_forwards if self.drafter_forwards else 0.0


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


class _Model:
    """A model's decoder, head and slot cache for one batch, with per-row slot validity."""

    def __init__(self, model, head: Head):
        self.base = base_model(model)
        self.head = head
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        self.additive = model.dtype if impl == "eager" else None
        self.model = model
        self.cache: Cache | None = None
        self.valid: torch.Tensor | None = None  # [B, L] bool

    def reset(self, batch: int, device) -> None:
        self.cache = new_slot_cache(self.model)
        self.valid = torch.zeros((batch, 0), dtype=torch.bool, device=device)

    def forward(self, tokens: torch.Tensor, valid_new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, valid_new, positions: [B, n] → hidden states [B, n, hidden]; appends n slots."""
        mask = attention_mask_4d(self.valid, valid_new, self.additive)
        out = self.base(
            input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        self.valid = torch.cat([self.valid, valid_new], dim=1)
        return out.last_hidden_state

    def set_step_validity(self, ok: torch.Tensor) -> None:
        """ok: [B, m] — validity of the last m slots (marks rejected drafts invalid)."""
        m = ok.shape[1]
        if m:
            self.valid[:, -m:] = ok

    def compact(self, rows: torch.Tensor, headroom: int) -> None:
        slots, new_valid = compaction_slots(self.valid, rows)
        for layer in self.cache.layers:
            layer.regather(rows, slots, headroom)
        self.valid = new_valid

    def wasted_slots(self) -> int:
        return int(self.valid.shape[1] - self.valid.sum(1).max().item()) if self.valid.numel() else 0


class SpeculativeEngine:
    """Batched speculative decoding: ``drafter`` proposes ``gamma`` tokens, ``target`` verifies.

    target, drafter: Hugging Face causal LMs sharing a tokenizer and logits width (checked by the
    caller, ``vocabtrim.models.load_pair``). ``drafter=None`` is the target-alone baseline with the
    same batching and sampling. ``head``: a ``TrimmedHead`` replacing the drafter's LM head.
    """

    def __init__(
        self,
        target,
        drafter=None,
        head: TrimmedHead | None = None,
        *,
        gamma: int = 4,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids=(),
        max_new_tokens: int = 64,
        pad_token_id: int = 0,
        compact_slack: int = 32,
    ):
        if drafter is None and head is not None:
            raise UserError("a trimmed head needs a drafter (drop --no-draft or --head)")
        if drafter is not None and not 1 <= gamma <= 64:
            raise UserError(f"--gamma must be between 1 and 64, got {gamma}")
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        check_supported(target, "target")
        if drafter is not None:
            check_supported(drafter, "drafter")
            if logits_width(target) != logits_width(drafter):
                raise UserError(f"target and drafter logits widths differ: {logits_width(target)} vs {logits_width(drafter)}")
        self.device = next(target.parameters()).device
        self.target = _Model(target, model_head(target))
        self.drafter = None
        if drafter is not None:
            self.drafter = _Model(drafter, trimmed_head(head, drafter) if head is not None else model_head(drafter))
        self.gamma = gamma if drafter is not None else 0
        self.sampling = sampling
        self.eos = set(int(t) for t in eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.compact_slack = compact_slack
        self.context_length = int(getattr(target.config, "max_position_embeddings", 0) or 0)
        self.last_stats = EngineStats()

    # -- public -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int | None = None) -> list[RowOutput]:
        """Generate for every prompt (token ids) in one batch; ``seeds[i]`` seeds row i's randomness."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token")
        limit = max_new_tokens or self.max_new_tokens
        stats = EngineStats()
        self.last_stats = stats
        outs = [RowOutput(accepted_hist=[0] * (self.gamma + 1)) for _ in prompts]
        if not prompts:
            return outs
        wall = time.perf_counter()
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        state = self._prefill(prompts, stats)
        active = list(range(len(prompts)))  # batch index -> row index
        while active:
            if self.drafter is None:
                accepted, drafts, next_token = self._target_only_step(state, [gens[r] for r in active], stats)
            else:
                accepted, drafts, next_token = self._speculative_step(state, [gens[r] for r in active], stats)
            self._advance(state, accepted, next_token)
            done = self._commit(outs, active, accepted, drafts, next_token, limit)
            stats.target_passes += 1
            keep = [i for i, d in enumerate(done) if not d]
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long, device=self.device)
                self._select(state, rows)
                active = [active[i] for i in keep]
            elif self.target.wasted_slots() > self.compact_slack:
                self._select(state, torch.arange(len(active), device=self.device))
        stats.wall_seconds = time.perf_counter() - wall
        stats.generated_tokens = sum(len(o.token_ids) for o in outs)
        return outs

    # -- steps --------------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]], stats: EngineStats) -> dict:
        """Feed each prompt but its last token to both caches (left-padded); the last token is pending."""
        b = len(prompts)
        width = max(len(p) for p in prompts) - 1
        tokens = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((b, width), dtype=torch.bool)
        positions = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            n = len(p) - 1
            if n:
                tokens[i, width - n :] = torch.tensor(p[:-1])
                valid[i, width - n :] = True
                positions[i, width - n :] = torch.arange(n)
        tokens, valid, positions = (t.to(self.device) for t in (tokens, valid, positions))
        with _Timer(self.device) as t:
            for m in filter(None, (self.target, self.drafter)):
                m.reset(b, self.device)
                if width:
                    m.forward(tokens, valid, positions)
        stats.prefill_seconds += t.seconds
        return {
            "pending": torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=self.device),
            "pos": torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=self.device),
            # A draft the drafter's cache has not seen yet (all drafts accepted last step).
            "extra": torch.full((b,), self.pad_token_id, dtype=torch.long, device=self.device),
            "has_extra": torch.zeros(b, dtype=torch.bool, device=self.device),
        }

    def _uniforms(self, gens: list[torch.Generator], n: int) -> torch.Tensor:
        """[B, n] uniforms, row i from its own generator (a fixed count per step)."""
        return torch.stack([torch.rand(n, generator=g) for g in gens]).to(self.device)

    def _target_only_step(self, state: dict, gens, stats: EngineStats):
        b = state["pending"].shape[0]
        ones = torch.ones((b, 1), dtype=torch.bool, device=self.device)
        with _Timer(self.device) as t:
            hidden = self.target.forward(state["pending"][:, None], ones, state["pos"][:, None])
            logits = self.target.head.logits(hidden[:, -1])  # [B, V]
            if self.sampling.greedy:
                next_token = logits.argmax(-1)
            else:
                u = self._uniforms(gens, 1)[:, 0]
                next_token = sample_from_probs(logits_to_probs(logits, self.sampling), u)
        stats.target_seconds += t.seconds
        accepted = torch.zeros(b, dtype=torch.long, device=self.device)
        drafts = torch.zeros((b, 0), dtype=torch.long, device=self.device)
        return accepted, drafts, next_token

    def _speculative_step(self, state: dict, gens, stats: EngineStats):
        g = self.gamma
        b = state["pending"].shape[0]
        greedy = self.sampling.greedy
        u = None if greedy else self._uniforms(gens, 2 * g + 1)  # [B, 2G+1]: draft | accept | recover
        d = self.drafter
        pos = state["pos"]
        drafts, qs = [], []
        with _Timer(self.device) as t:
            # First drafter forward: [extra, pending] when some row owes its cache last step's final draft.
            if bool(state["has_extra"].any()):
                tokens = torch.stack([state["extra"], state["pending"]], dim=1)
                valid = torch.stack([state["has_extra"], torch.ones_like(state["has_extra"])], dim=1)
                positions = torch.stack([(pos - 1).clamp(min=0), pos], dim=1)
            else:
                tokens, positions = state["pending"][:, None], pos[:, None]
                valid = torch.ones((b, 1), dtype=torch.bool, device=self.device)
            for i in range(g):
                if i > 0:
                    tokens, positions = drafts[-1][:, None], (pos + i)[:, None]
                    valid = torch.ones((b, 1), dtype=torch.bool, device=self.device)
                hidden = d.forward(tokens, valid, positions)[:, -1]
                logits = d.head.logits(hidden)  # [B, Kq]
                if greedy:
                    index = logits.argmax(-1)
                else:
                    q = logits_to_probs(logits, self.sampling)
                    index = sample_from_probs(q, u[:, i])
                    qs.append(q)
                drafts.append(d.head.to_vocab(index))
        stats.drafter_seconds += t.seconds
        stats.drafter_forwards += g
        draft_tokens = torch.stack(drafts, dim=1)  # [B, G]

        with _Timer(self.device) as t:
            tokens = torch.cat([state["pending"][:, None], draft_tokens], dim=1)  # [B, G+1]
            positions = pos[:, None] + torch.arange(g + 1, device=self.device)[None]
            hidden = self.target.forward(tokens, torch.ones_like(tokens, dtype=torch.bool), positions)
            target_logits = self.target.head.logits(hidden)  # [B, G+1, V]
            if greedy:
                verdict = verify_greedy(draft_tokens, target_logits)
            else:
                p = logits_to_probs(target_logits, self.sampling)
                verdict = verify_sampled(draft_tokens, torch.stack(qs, dim=1), p, u[:, g : 2 * g], u[:, 2 * g], d.head.support)
        stats.target_seconds += t.seconds

        accepted = verdict.accepted
        j = torch.arange(1, g + 1, device=self.device)[None]  # draft number of each slot
        self.target.set_step_validity(j <= accepted[:, None])  # pending slot stays valid
        d.set_step_validity((j[:, : g - 1]) <= accepted[:, None])  # drafter holds drafts 1..G-1
        state["has_extra"] = accepted == g
        state["extra"] = draft_tokens[:, -1]
        return accepted, draft_tokens, verdict.next_token

    def _commit(self, outs, active, accepted, drafts, next_token, limit) -> list[bool]:
        """Append each row's accepted drafts and its next token; stop at EOS or the token limit."""
        acc = accepted.tolist()
        drafts_l = drafts.tolist()
        nxt = next_token.tolist()
        done = []
        for i, r in enumerate(active):
            out = outs[r]
            n = acc[i]
            out.proposed += self.gamma
            out.accepted += n
            out.target_passes += 1
            out.accepted_hist[n] += 1
            finished = False
            for tok in drafts_l[i][:n] + [nxt[i]]:
                out.token_ids.append(tok)
                if tok in self.eos:
                    out.finish_reason, finished = "stop", True
                    break
                if len(out.token_ids) >= limit:
                    out.finish_reason, finished = "length", True
                    break
            done.append(finished)
        return done

    def _advance(self, state: dict, accepted: torch.Tensor, next_token: torch.Tensor) -> None:
        state["pos"] = state["pos"] + accepted + 1
        state["pending"] = next_token

    def _select(self, state: dict, rows: torch.Tensor) -> None:
        headroom = 2 * (self.gamma + 2) + self.compact_slack
        for m in filter(None, (self.target, self.drafter)):
            m.compact(rows, headroom)
        for key in ("pending", "pos", "extra", "has_extra"):
            state[key] = state[key].index_select(0, rows)
