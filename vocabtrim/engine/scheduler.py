"""The engine: continuous batching over a stream of rows, one speculative step at a time.

Up to ``batch_size`` rows are in flight, in slots 0..n-1 of static caches (``cache.py``). Each step:
1. ``GammaController`` picks gamma (0 = the target alone), at most the drafts the rows' remaining room can keep;
2. the drafter proposes gamma tokens per row (``drafters/``), drawn with the sampler's ``choose``;
3. the target scores the pending token and the drafts in one pass;
4. the sampler (``sampling.py``) decides how many drafts each row accepts (of those its room can keep) and the
   next token;
5. one device→host transfer brings back, per row, the accepted count, the tokens kept and whether
   the row stopped (EOS or the token limit): the only host sync of the step.
Rows that finish are returned at once; waiting rows are prefilled together into the freed slots;
when none wait, the last rows move down so the rows stepped stay a prefix of the slots.

A row's tokens are a function of its prompt, its seed and the sampling settings only: the noise is
keyed by (row seed, position), never by slot or batch; with ``sampler="gumbel"`` (the default) the
drafter, its head and gamma do not matter either.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from vocabtrim import validate
from vocabtrim.engine.drafters.base import CommitInfo, DraftBatch, Drafter
from vocabtrim.engine.drafters.causal_lm import attend_length
from vocabtrim.engine.gamma import GammaController
from vocabtrim.engine.heads import model_head
from vocabtrim.engine.model import ModelRunner
from vocabtrim.engine.sampling import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_GUMBEL,
    STREAM_RECOVER,
    SamplingParams,
    gumbel_argmax,
    gumbel_noise,
    logits_to_probs,
    noise_keys,
    noise_uniform,
    sample_from_probs,
    seed_words,
    verify_exact,
    verify_sampled,
)
from vocabtrim.errors import UserError

SAMPLERS = ("gumbel", "rejection")
# Tokens per row a drafter feeds at most when a probe turns it on again after target-alone steps.
PROBE_CONTEXT = 32


@dataclass(frozen=True)
class EngineConfig:
    """How the engine generates. ``gamma`` None means adaptive (0..max_gamma, chosen each step)."""

    sampling: SamplingParams = SamplingParams()
    sampler: str = "gumbel"
    gamma: int | None = None
    max_gamma: int = 6
    batch_size: int = 8
    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] = ()
    compile: bool = False

    def __post_init__(self):
        validate.one_of("sampler", self.sampler, SAMPLERS)
        validate.max_gamma(self.max_gamma)
        validate.gamma(self.gamma)
        validate.at_least("batch_size", self.batch_size, 1)
        validate.at_least("max_new_tokens", self.max_new_tokens, 1)

    @property
    def top_gamma(self) -> int:
        """The largest gamma a step may use."""
        return self.max_gamma if self.gamma is None else self.gamma


@dataclass
class RowOutput:
    """What one row generated.

    token_ids: generated ids only (EOS included when the row stopped on it).
    finish_reason: "stop" (EOS) or "length" (max_new_tokens).
    proposed / accepted: drafts proposed and accepted over all steps; a step's drafts past the row's room left less
        one are padding for the other rows and no draft of this row (drafts past its EOS are).
    target_passes: target forward passes this row took part in (prefill excluded).
    accepted_hist: [top_gamma + 1] steps that accepted exactly j drafts (gamma-0 steps count at 0).
    reached_hist: [top_gamma] steps that reached draft i + 1: drafted it, and accepted every draft before it.
    """

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    accepted_hist: list[int] = field(default_factory=list)
    reached_hist: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    """Timings and counts of the last ``stream``/``generate`` call (seconds, measured on the host
    after the step's sync).

    rows_stepped: sum over target passes of the rows in that pass (occupancy = rows_stepped /
    (target_passes * batch_size)). gamma_hist[g]: steps run with gamma g.
    """

    drafter_seconds: float = 0.0
    drafter_forwards: int = 0
    target_seconds: float = 0.0
    target_passes: int = 0
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0
    generated_tokens: int = 0
    rows_stepped: int = 0
    batch_size: int = 0
    gamma_hist: list[int] = field(default_factory=list)

    @property
    def drafter_step_ms(self) -> float:
        return 1000.0 * self.drafter_seconds / self.drafter_forwards if self.drafter_forwards else 0.0

    @property
    def occupancy(self) -> float | None:
        return self.rows_stepped / (self.target_passes * self.batch_size) if self.target_passes else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Speculative decoding with continuous batching.

    target: a Hugging Face causal LM. drafter: a ``Drafter`` (``CausalLMDrafter``, ``Eagle3Drafter``)
    or None for the target alone (every step gamma 0). The pair check (tokenizer, logits width) is
    the caller's (``vocabtrim.models.load_pair``); the engine checks the drafter's support fits.
    """

    def __init__(self, target, drafter: Drafter | None = None, config: EngineConfig = EngineConfig()):
        self.config = config
        feature_layers = tuple(getattr(drafter, "feature_layers", ()) or ()) if drafter is not None else ()
        self.target = ModelRunner(target, model_head(target), "target", feature_layers)
        self.drafter = drafter
        self.device = self.target.device
        self.vocab = int(self.target.head.weight.shape[0])
        support = getattr(drafter, "support", None)
        if support is not None and int(support.max()) >= self.vocab:
            raise UserError(f"the drafter proposes token id {int(support.max())} but the target has only {self.vocab} logits")
        if support is not None and not bool((support[1:] > support[:-1]).all()):
            # the samplers find q(x) by binary search over the support
            raise UserError("the drafter's vocabulary must be sorted and unique (its head's rows in token-id order)")
        self.top_gamma = config.top_gamma if drafter is not None else 0
        self.context_length = int(getattr(target.config, "max_position_embeddings", 0) or 0)
        self.vocab_ids = torch.arange(self.vocab, device=self.device)
        self.draft_ids = support.to(self.device) if support is not None else self.vocab_ids
        self.eos = torch.tensor(sorted(set(int(t) for t in config.eos_token_ids)) or [-1], device=self.device)
        self.last_stats = EngineStats()
        self.last_controller: GammaController | None = None
        if config.compile:
            self._compile()

    @property
    def gamma(self) -> int:
        """The largest gamma a step may use (0 without a drafter)."""
        return self.top_gamma

    def _compile(self) -> None:
        self.target.compile()
        if self.drafter is not None:
            self.drafter.compile()

    # -- public -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int | None = None,
                 batch_size: int | None = None) -> list[RowOutput]:
        """Generate for every prompt (token ids); ``seeds[i]`` keys row i's randomness. Input order."""
        outs: list[RowOutput | None] = [None] * len(prompts)
        for i, out in self.stream(prompts, seeds, max_new_tokens, batch_size):
            outs[i] = out
        return outs

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int | None = None,
               batch_size: int | None = None):
        """Yield ``(index, RowOutput)`` for every prompt as it finishes (any order); ``batch_size`` overrides
        the configured rows in flight for this call (a smaller one after running out of memory)."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token")
        batch_size = batch_size or self.config.batch_size
        stats = EngineStats(batch_size=batch_size, gamma_hist=[0] * (self.top_gamma + 1))
        self.last_stats = stats
        if not prompts:
            return
        wall = time.perf_counter()
        run = _Run(self, prompts, seeds, max_new_tokens or self.config.max_new_tokens, stats, batch_size)
        yield from run.loop()
        stats.wall_seconds = time.perf_counter() - wall

    def open(self, max_new_tokens: int | None = None, batch_size: int | None = None) -> "_Run":
        """A run that takes rows while it runs (``add``), stepped by its caller (``advance``): continuous batching
        across calls, so rows added later fill the slots that earlier rows free instead of waiting for them all
        to end. Its statistics are its ``stats`` (not ``last_stats``)."""
        batch_size = batch_size or self.config.batch_size
        stats = EngineStats(batch_size=batch_size, gamma_hist=[0] * (self.top_gamma + 1))
        return _Run(self, [], [], max_new_tokens or self.config.max_new_tokens, stats, batch_size, slots=batch_size)


class _Run:
    """The state of one ``Engine.stream`` call or ``Engine.open`` run: slots, their rows, the controller.

    Rows are numbered in the order they are added; ``prompts``/``seeds`` hold the waiting rows' (a row's go once it
    is admitted: a worker's run lives as long as the worker). The caches hold ``capacity`` positions a slot: a
    prompt, the token limit and a step's drafts. A row that needs more waits at the head of the queue until no
    row is in flight; then the caches grow to fit every waiting row (in steps of ``CAPACITY_STEP`` positions)."""

    CAPACITY_STEP = 256

    def __init__(self, engine: Engine, prompts, seeds, limit: int, stats: EngineStats, batch_size: int,
                 slots: int | None = None):
        self.e, self.limit, self.stats = engine, limit, stats
        self.prompts = dict(enumerate(prompts))
        self.seeds = {r: int(s) for r, s in enumerate(seeds)}
        self.added = len(self.prompts)
        self.slots = slots or min(batch_size, len(prompts))
        self.capacity = 0
        if self.prompts:
            self._allocate(max(map(self._needs, self.prompts)))
        s = self.slots
        self.pos_np = np.zeros(s, dtype=np.int64)
        self.start_np = np.zeros(s, dtype=np.int64)  # prompt length
        self.gen_np = np.zeros(s, dtype=np.int64)  # tokens generated so far
        self.row = np.full(s, -1, dtype=np.int64)  # prompt index held by each slot
        self.proposed = np.zeros(s, dtype=np.int64)
        self.passes = np.zeros(s, dtype=np.int64)
        self.hist = np.zeros((s, engine.top_gamma + 1), dtype=np.int64)
        self.reached = np.zeros((s, engine.top_gamma), dtype=np.int64)
        self.waiting = deque(range(self.added))
        self.n = 0
        self.controller = GammaController(engine.top_gamma, None if engine.drafter is None else engine.config.gamma)
        engine.last_controller = self.controller

    def _needs(self, row: int) -> int:
        """The cache positions row ``row`` needs: its prompt, its token limit and a step's drafts."""
        return len(self.prompts[row]) + self.limit + self.e.top_gamma + 1

    def _allocate(self, capacity: int) -> None:
        """Caches of ``capacity`` positions a slot (only while no row is in flight: their contents go)."""
        e, dev = self.e, self.e.device
        self.capacity = capacity
        e.target.allocate(self.slots, capacity)
        if e.drafter is not None:
            e.drafter.allocate(self.slots, capacity)
        self.history = torch.zeros((self.slots, capacity), dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.slots, dtype=torch.long, device=dev)
        self.words = torch.zeros((self.slots, 2), dtype=torch.int32, device=dev)

    # -- a run that takes rows while it runs (``Engine.open``) ---------------------------------

    def add(self, prompts: list[list[int]], seeds: list[int]) -> list[int]:
        """Queue rows (token ids; ``seeds[i]`` keys row i's randomness); returns their row indices."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token")
        rows = list(range(self.added, self.added + len(prompts)))
        self.prompts.update(zip(rows, prompts))
        self.seeds.update((r, int(s)) for r, s in zip(rows, seeds))
        self.added += len(rows)
        self.waiting.extend(rows)
        return rows

    @property
    def busy(self) -> bool:
        """Rows are in flight or waiting."""
        return bool(self.n or self.waiting)

    @torch.inference_mode()
    def advance(self) -> list[tuple[int, "RowOutput"]]:
        """Admit waiting rows into free slots, then run one step; ``(row index, RowOutput)`` of the rows it finished."""
        wall = time.perf_counter()
        self._fill()
        done = []
        if self.n:
            finished = self._step(min(self.controller.choose(), self._draft_room()))
            if finished:
                done = self._finish(finished)
        self.stats.wall_seconds += time.perf_counter() - wall
        return done

    def drop(self) -> None:
        """Give the run up (its rows not finished are the caller's to add to another): nothing to free, the caches
        are the engine's and the next run's."""

    def _fill(self) -> None:
        """Admit waiting rows into the free slots (the caches grown first when the next one needs it and none
        is in flight)."""
        if self.waiting and not self.n and self._needs(self.waiting[0]) > self.capacity:
            step = self.CAPACITY_STEP
            self._allocate(-(-max(map(self._needs, self.waiting)) // step) * step)
        free = [s for s in range(self.slots) if self.row[s] < 0]
        take = self._admissible(free)
        if take:
            self._admit(take)

    def _admissible(self, free: list[int]) -> list[int]:
        """The first of ``free`` slots, one for each waiting row in order that fits the caches."""
        k = 0
        while k < min(len(free), len(self.waiting)) and self._needs(self.waiting[k]) <= self.capacity:
            k += 1
        return free[:k]

    # -- the loop -----------------------------------------------------------------------------

    def loop(self):
        self._fill()
        while self.n:
            finished = self._step(min(self.controller.choose(), self._draft_room()))
            if finished:
                yield from self._finish(finished)

    def _draft_room(self) -> int:
        """The most drafts a step can use: a row keeps at most its accepted drafts + 1 tokens, so drafts past
        every live row's remaining room - 1 would be drafted and verified for nothing (at ``max_new_tokens`` 1, a
        drafter would cost its gamma forwards a row and add no token)."""
        return int((self.limit - self.gen_np[: self.n]).max()) - 1

    def _finish(self, slots: list[int]):
        done = []
        for s in slots:
            start, count = int(self.start_np[s]), int(self.gen_np[s])
            tokens = self.history[s, start : start + count].tolist()
            last_is_eos = bool(tokens) and tokens[-1] in self._eos_set()
            hist = self.hist[s].tolist()
            done.append((int(self.row[s]), RowOutput(
                token_ids=tokens,
                finish_reason="stop" if last_is_eos else "length",
                proposed=int(self.proposed[s]),
                accepted=int(sum(j * c for j, c in enumerate(hist))),
                target_passes=int(self.passes[s]),
                accepted_hist=hist,
                reached_hist=self.reached[s].tolist(),
            )))
            self.row[s] = -1
        self.stats.generated_tokens += sum(len(o.token_ids) for _, o in done)
        if self.e.drafter is not None:
            self.e.drafter.release(slots)
        take = self._admissible(sorted(slots))
        if take:
            self._admit(take)
        self._compact()
        return done

    def _eos_set(self) -> set[int]:
        return set(int(t) for t in self.e.config.eos_token_ids)

    def _compact(self) -> None:
        """Move the highest live slots into the holes below, so live slots are 0..n-1."""
        live = [s for s in range(self.slots) if self.row[s] >= 0]
        n = len(live)
        src = [s for s in live if s >= n]
        dst = [s for s in range(n) if self.row[s] < 0]
        if src:
            index_src = torch.tensor(src, device=self.e.device)
            index_dst = torch.tensor(dst, device=self.e.device)
            self.e.target.move(index_src, index_dst)
            if self.e.drafter is not None:
                self.e.drafter.move(src, dst)
            for t in (self.history, self.pos, self.words):
                t.index_copy_(0, index_dst, t.index_select(0, index_src))
            for a in (self.pos_np, self.start_np, self.gen_np, self.row, self.proposed, self.passes, self.hist, self.reached):
                a[dst] = a[src]
            self.row[src] = -1
        self.n = n

    def _admit(self, slots: list[int]) -> None:
        """Prefill the next waiting rows into ``slots`` together (each prompt but its last token)."""
        e, dev = self.e, self.e.device
        rows = [self.waiting.popleft() for _ in slots]
        prompts, seeds = [self.prompts.pop(r) for r in rows], [self.seeds.pop(r) for r in rows]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        block = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            block[i, : lengths[i]] = torch.tensor(p, dtype=torch.long)
        index = torch.tensor(slots, device=dev)
        self.history[:, :width].index_copy_(0, index, block.to(dev))
        self.pos.index_copy_(0, index, torch.tensor(lengths, device=dev) - 1)
        self.words.index_copy_(0, index, seed_words(torch.tensor(seeds, dtype=torch.long)).to(dev))
        self.pos_np[slots] = np.asarray(lengths) - 1
        self.start_np[slots] = lengths
        self.gen_np[slots] = 0
        self.row[slots] = rows
        self.proposed[slots] = 0
        self.passes[slots] = 0
        self.hist[slots] = 0
        self.reached[slots] = 0
        t0 = time.perf_counter()
        features = None
        if width > 1:
            fed = torch.tensor(lengths, device=dev) - 1
            _, features = e.target.prefill(self.history.index_select(0, index)[:, : width - 1], fed, index)
        if e.drafter is not None:
            e.drafter.admit(slots, self.history, lengths, features, defer=self.controller.off)
        _sync(dev)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.n = max(self.n, max(slots) + 1)

    # -- one step -----------------------------------------------------------------------------

    def _step(self, gamma: int) -> list[int]:
        e, cfg, n = self.e, self.e.config, self.n
        params = cfg.sampling
        dev = e.device
        pos = self.pos[:n].clone()  # self.pos moves on below; CommitInfo.pos is the step's starting position
        words = self.words[:n]
        pending = self.history[:n].gather(1, pos[:, None])  # [n, 1]
        pos_host = self.pos_np[:n].copy()

        t0 = time.perf_counter()
        q = None
        if gamma > 0:
            proposal = e.drafter.propose(DraftBatch(
                n=n, gamma=gamma, pending=pending[:, 0], pos=pos, pos_host=pos_host.tolist(),
                history=self.history, choose=self._choose(pos, words),
                max_catch_up=PROBE_CONTEXT if self.controller.probing else None,
            ))
            drafts, q = proposal.tokens, proposal.q
            tokens = torch.cat([pending, drafts], dim=1)  # [n, G+1]
        else:
            drafts = pending[:, :0]
            tokens = pending
        _sync(dev)
        t1 = time.perf_counter()

        # The drafts each row can keep (its room left less one): past them a row's verdict is the one a step of
        # that many drafts gives, so a row's tokens and figures depend on no other row in the batch.
        room_np = self.limit - self.gen_np[:n]  # tokens each row may still add
        made_np = np.minimum(gamma, room_np - 1)
        room = torch.as_tensor(room_np, device=dev)
        made = None if gamma == 0 else (room - 1).clamp(max=gamma)  # ``made_np`` on the device
        positions = pos[:, None] + torch.arange(gamma + 1, device=dev)[None]  # [n, G+1]
        hidden, features = e.target.step(tokens, positions, attend_length(int(pos_host.max()) + gamma, self.capacity))
        logits = e.target.head.logits(hidden)  # [n, G+1, V]
        out_positions = positions + 1  # the position of the token each verified slot predicts
        if params.greedy or cfg.sampler == "gumbel":
            noise = None if params.greedy else gumbel_noise(noise_keys(words, out_positions, STREAM_GUMBEL), e.vocab_ids)
            verdict = verify_exact(drafts, gumbel_argmax(logits, params, noise), made)
        else:
            p = logits_to_probs(logits, params)
            u_recover = noise_uniform(words, out_positions, STREAM_RECOVER)  # [n, G+1]
            if gamma > 0:
                u_accept = noise_uniform(words, out_positions[:, :gamma], STREAM_ACCEPT)
                verdict = verify_sampled(drafts, q, p, u_accept, u_recover, e.drafter.support, made)
            else:
                verdict = verify_exact(drafts, sample_from_probs(p[:, 0], u_recover[:, 0])[:, None])
        accepted, next_token = verdict.accepted, verdict.next_token

        # Write the step's tokens by position: drafts (the rejected ones are overwritten later), then
        # the next token right after the accepted ones.
        if gamma > 0:
            self.history[:n].scatter_(1, positions[:, 1:], drafts)
        new_pos = pos + accepted + 1
        self.history[:n].scatter_(1, new_pos[:, None], next_token[:, None])
        # Which tokens the row keeps: up to and including its first EOS, and at most up to the limit.
        emitted = self.history[:n].gather(1, out_positions)  # [n, G+1]; valid where j <= accepted
        j = torch.arange(gamma + 1, device=dev)[None]
        is_eos = torch.isin(emitted, e.eos) & (j <= accepted[:, None])
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), gamma + 1)
        kept = torch.minimum(torch.minimum(accepted + 1, first_eos + 1), room)
        stopped = (first_eos + 1 <= kept) | (kept >= room)
        self.pos[:n] = new_pos
        result = torch.stack([accepted, kept, stopped.long()], dim=1).cpu().numpy()  # the one transfer
        t2 = time.perf_counter()

        acc, kept_np, stop_np = result[:, 0], result[:, 1], result[:, 2]
        self.pos_np[:n] += acc + 1
        self.gen_np[:n] += kept_np
        self.proposed[:n] += made_np
        self.passes[:n] += 1
        self.hist[np.arange(n), acc] += 1
        i = np.arange(gamma)[None, :]
        self.reached[:n, :gamma] += (i <= acc[:, None]) & (i < made_np[:, None])  # draft i + 1 made, i accepted before it
        if e.drafter is not None:
            e.drafter.commit(CommitInfo(
                n=n, gamma=gamma, pos=pos, pos_host=pos_host.tolist(), accepted=accepted,
                accepted_host=acc.tolist(), features=features,
            ))
        self.controller.observe(gamma, acc, t1 - t0, t2 - t1, made_np)
        st = self.stats
        st.drafter_seconds += t1 - t0
        st.drafter_forwards += gamma
        st.target_seconds += t2 - t1
        st.target_passes += 1
        st.rows_stepped += n
        st.gamma_hist[gamma] += 1
        return np.flatnonzero(stop_np).tolist()

    def _choose(self, pos: torch.Tensor, words: torch.Tensor):
        """The sampler's rule for the drafter's i-th draft (at position pos + i + 1)."""
        e, cfg = self.e, self.e.config
        params = cfg.sampling

        def choose(logits: torch.Tensor, i: int):
            at = (pos + i + 1)[:, None]
            if params.greedy:
                return logits.argmax(-1), None
            if cfg.sampler == "gumbel":
                noise = gumbel_noise(noise_keys(words, at, STREAM_GUMBEL), e.draft_ids)[:, 0]
                return gumbel_argmax(logits, params, noise), None
            q = logits_to_probs(logits, params)
            return sample_from_probs(q, noise_uniform(words, at, STREAM_DRAFT)[:, 0]), q

        return choose
