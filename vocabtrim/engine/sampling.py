"""Logits processing, counter-based noise and the two lossless samplers: pure tensor functions.

Words (as in Leviathan et al. 2023 and Chen et al. 2023, and vLLM's rejection sampler):
- ``q``: the drafter's distribution at a draft position (after temperature / top-k / top-p);
  with a trimmed head it lives on the K kept ids and is zero everywhere else.
- ``p``: the target's distribution at the same position, same processing.
- accepted: draft token x is accepted with probability min(1, p(x) / q(x)).
- recovered: at the first rejected position the token is drawn from the residual
  normalize(max(0, p − q)) over the FULL vocabulary.
- bonus: when all gamma drafts are accepted, one more token is drawn from the target's p at
  position gamma.
These rules make the output distribution exactly the target's, whatever q is. At temperature 0
(greedy) a draft is accepted while it equals the target's argmax, and the recovered/bonus token is
the target's argmax.

Two samplers (``--sampler``):
- ``gumbel`` (default): the drafter-invariant Gumbel-max coupling (Daliri, Musco, Suresh 2024). At
  every output position the target's token is argmax(log p + g) and a draft is argmax(log q + g)
  with the SAME noise g, a function of (row seed, position, token id) only. A draft is accepted
  while it equals the target's token; the first disagreement emits the target's token. Every
  emitted token is the target's own Gumbel-max sample, so the output is exactly the target's
  distribution, and a completion depends only on the target, the prompt, the sampling settings and
  the seed: not on the drafter, its head, gamma, the batch or the worker.
- ``rejection``: the optimal-acceptance rule above (min(1, p/q), residual); lossless too, and it
  accepts at least as often, but which tokens come out depends on the drafter.

All randomness is counter-based: ``noise_uniform`` and ``gumbel_noise`` hash (row seed, position, stream,
token id) on the tensor's device, so a row's samples never depend on its batch-mates or on any generator
state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        from vocabtrim import validate

        validate.sampling(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_seed(seed: int, row_id: str) -> int:
    """A 63-bit seed for one row, from the run's seed and the row's id (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p: float32 scores, -inf on filtered ids.

    logits: [..., V] (any float dtype). Returns [..., V] float32 with softmax = the sampling law.
    Requires params.temperature > 0.
    """
    x = logits.float()
    # The max first: no overflow at any temperature > 0. A temperature under float32's smallest normal (a divisor
    # that would round to 0, and 0/0 at the max) divides as that smallest one: the law is the argmax's either way.
    x = (x - x.amax(dim=-1, keepdim=True)) / max(params.temperature, torch.finfo(torch.float32).tiny)
    v = x.shape[-1]
    if 0 < params.top_k < v:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``process_logits`` then softmax: [..., V] float32 summing to 1, exactly zero on filtered ids."""
    return torch.softmax(process_logits(logits, params), dim=-1)


# ---------------------------------------------------------------------------------------------
# Counter-based noise
# ---------------------------------------------------------------------------------------------

# Streams: which draw at a position a uniform is for (at most 4).
STREAM_GUMBEL, STREAM_DRAFT, STREAM_ACCEPT, STREAM_RECOVER = 0, 1, 2, 3
_M1, _M2 = -2048144789, -1028477387  # 0x85ebca6b, 0xc2b2ae35 as int32
_GOLDEN = -1640531527  # 0x9e3779b9 as int32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int32 tensors (multiplication wraps modulo 2**32)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def seed_words(seeds: torch.Tensor) -> torch.Tensor:
    """seeds: [n] int64 row seeds (``row_seed``) → [n, 2] int32, their low and high 32 bits."""
    lo = (seeds & 0xFFFFFFFF).to(torch.int64)
    hi = (seeds >> 32) & 0x7FFFFFFF
    lo = torch.where(lo >= 2**31, lo - 2**32, lo)
    return torch.stack([lo, hi], dim=-1).to(torch.int32)


_KEY_SALT, _LOW_SALT = 0x1234567, 0x3C6EF372  # the key of a draw; a second, independent one (``noise_uniform``)


def noise_keys(words: torch.Tensor, positions: torch.Tensor, stream: int, salt: int = _KEY_SALT) -> torch.Tensor:
    """words: [n, 2] int32 (``seed_words``); positions: [n, m] int64 → [n, m] int32 keys."""
    counter = positions.to(torch.int32) * 4 + stream  # distinct for every (position < 2**29, stream)
    x = _mix32(counter * _GOLDEN + salt)
    x = _mix32(x ^ words[:, 1:2])
    return _mix32(x ^ words[:, 0:1])


def _token_hash(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """keys [n, m] int32, token ids [K] → [n, m, K] int32: one hash per (row, position, token id)."""
    return _mix32(keys.unsqueeze(-1) ^ (token_ids.to(torch.int32) * _GOLDEN))


def _unsigned(x: torch.Tensor) -> torch.Tensor:
    """int32 → its 32 bits as a non-negative int64."""
    return x.to(torch.int64) & 0xFFFFFFFF


def noise_uniform(words: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniforms in (0, 1) on a grid of 2**-53, a pure function of (row seed, position, stream): words [n, 2] int32
    (``seed_words``), positions [n, m] → float64 [n, m]. (k + 0.5) / 2**53 from two independent 32-bit keys (27 and
    26 of their bits; one key alone holds only 2**32 values) is exact in float64 and never 0 or 1, so inverse-CDF
    sampling and the acceptance test resolve probabilities far below float32's 2**-24.
    """
    hi = _unsigned(noise_keys(words, positions, stream)) >> 5
    lo = _unsigned(noise_keys(words, positions, stream, salt=_LOW_SALT)) >> 6
    return ((hi << 26) + lo).to(torch.float64).add_(0.5).mul_(2.0**-53)


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise per (row, position, token id): [n, m] keys, [K] ids → [n, m, K] float32."""
    return gumbel_of_hash(_token_hash(keys, token_ids))


def gumbel_of_hash(h: torch.Tensor) -> torch.Tensor:
    """Signed 32-bit hashes (int32, uniform) → standard Gumbel noise, float32 of the same shape.

    -log(-log(1 - w)) with w = (|h| + 0.5) / 2**31: uniform on a grid of 2**-31, and exact in float32 near 0,
    where the largest noise comes from; so the noise reaches 22.2 and an id as unlikely as about 2e-10
    against the top one can still win (from a float32 uniform u, -log(-log(u)) stops at 16.6: about 6e-8).
    Away from 0, float32 rounds w to 24 bits (kept below 1), far from any winner's noise.
    """
    w = h.to(torch.float32).abs_().add_(0.5).mul_(2.0**-31).clamp_(max=1 - 2.0**-24)
    return w.neg_().log1p_().neg_().log_().neg_()


def gumbel_argmax(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max sample: argmax(process(logits) + noise). logits, noise: [..., K] → [...] int64.

    Its law is exactly softmax(process_logits(logits)); at temperature 0 it is the plain argmax.
    """
    if params.greedy:
        return logits.argmax(-1)
    return (process_logits(logits, params) + noise).argmax(-1)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling that never returns a zero-probability id.

    probs: [N, V] non-negative (need not be normalised); u: [N] uniforms in [0, 1). Returns [N] int64.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)
    total = cdf[:, -1:]
    x = u.double().unsqueeze(-1) * total
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    # u * total can round up to total: fall back to the last id with positive mass.
    last_positive = (probs.shape[-1] - 1) - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(idx, last_positive)


@dataclass
class Verdict:
    """The outcome of verifying one step's drafts, per row.

    accepted:   [B] int64, number of leading drafts accepted (0..gamma).
    next_token: [B] int64, the recovered token (rejection) or bonus token (all accepted).
    """

    accepted: torch.Tensor
    next_token: torch.Tensor


def first_rejection(accept: torch.Tensor) -> torch.Tensor:
    """accept: [B, G] bool → [B] int64, the number of leading True values."""
    return torch.cumprod(accept.to(torch.int64), dim=-1).sum(-1)


def _made(accept: torch.Tensor, drafts: torch.Tensor | None) -> torch.Tensor:
    """accept [B, G] with the positions at or past ``drafts`` [B] (the drafts each row made) never accepted."""
    if drafts is None:
        return accept
    return accept & (torch.arange(accept.shape[1], device=accept.device)[None] < drafts[:, None])


def verify_exact(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, drafts: torch.Tensor | None = None) -> Verdict:
    """Accept while the draft equals the target's own choice; emit the target's choice after.

    draft_tokens: [B, G] full-vocabulary ids; target_tokens: [B, G + 1] the target's token at each
    verified position (its argmax at temperature 0, or its Gumbel-max sample with the noise the
    drafter used). The output is the target's choices, whatever the drafts were.
    drafts: [B] int64, the drafts each row made where some made fewer than G (the others pad the batch): the
    verdict is the one a step of that many drafts gives the row.
    """
    g = draft_tokens.shape[1]
    accepted = first_rejection(_made(draft_tokens == target_tokens[:, :g], drafts))
    next_token = target_tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)
    return Verdict(accepted=accepted, next_token=next_token)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Temperature 0: ``verify_exact`` against the target's argmax. target_logits: [B, G + 1, V]."""
    return verify_exact(draft_tokens, target_logits.argmax(dim=-1))


def verify_sampled(
    draft_tokens: torch.Tensor,
    draft_q: torch.Tensor,
    target_p: torch.Tensor,
    u_accept: torch.Tensor,
    u_recover: torch.Tensor,
    draft_support: torch.Tensor | None = None,
    drafts: torch.Tensor | None = None,
) -> Verdict:
    """Lossless rejection sampling for one step of a batch.

    draft_tokens: [B, G] int64 full-vocabulary ids proposed by the drafter.
    draft_q:      [B, G, Kq] the drafter's distributions the drafts were drawn from; Kq = V for a
                  full head, or K for a trimmed head whose ids are ``draft_support``.
    target_p:     [B, G + 1, V] the target's distributions at the same positions (+ the bonus one).
    u_accept:     [B, G] uniforms; draft i is accepted iff u < p(x) / q(x).
    u_recover:    [B] uniforms for the recovered or bonus token, or [B, G + 1]: one per position,
                  the one at the emitted token's position is used.
    draft_support: [K] int64 sorted full-vocabulary ids of a trimmed head, or None.
    drafts:       [B] int64, the drafts each row made where some made fewer than G (the others pad the
                  batch): the verdict is the one a step of that many drafts gives the row, its bonus token
                  drawn from p at that position.
    """
    b, g = draft_tokens.shape
    v = target_p.shape[-1]
    p_x = target_p[:, :g].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, G]
    if draft_support is None:
        q_x = draft_q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    else:
        q_idx = torch.searchsorted(draft_support, draft_tokens)  # ids were drawn from the support
        q_x = draft_q.gather(-1, q_idx.unsqueeze(-1)).squeeze(-1)
    accept = u_accept * q_x < p_x  # u < p/q without dividing; q_x > 0 for a drawn token
    accepted = first_rejection(_made(accept, drafts))  # [B]

    rows = torch.arange(b, device=draft_tokens.device)
    p_at = target_p[rows, accepted]  # [B, V]: p at the first rejected position, or the bonus position
    rejected = accepted < (g if drafts is None else drafts)
    q_at = torch.zeros_like(p_at)
    if bool(rejected.any()):
        q_pos = accepted.clamp(max=g - 1)
        q_rows = draft_q[rows, q_pos].to(p_at.dtype)  # [B, Kq]
        if draft_support is None:
            q_at = q_rows
        else:
            q_at = q_at.scatter(-1, draft_support.unsqueeze(0).expand(b, -1), q_rows)
        q_at = q_at * rejected.unsqueeze(-1).to(q_at.dtype)  # bonus rows sample from p itself
    if u_recover.ndim == 2:
        u_recover = u_recover.gather(1, accepted.unsqueeze(1)).squeeze(1)
    residual = (p_at - q_at).clamp(min=0)
    # Rounding can leave an all-zero residual (p == q): sample from p then, as the limit does.
    empty = residual.sum(-1) <= 0
    if bool(empty.any()):
        residual = torch.where(empty.unsqueeze(-1), p_at, residual)
    next_token = sample_from_probs(residual.reshape(b, v), u_recover)
    return Verdict(accepted=accepted, next_token=next_token)
