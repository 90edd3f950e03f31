"""Adaptive speculation length: each step, the gamma in 0..max_gamma with the most expected tokens per
second, from the engine's own measured costs and a running estimate of acceptance.

Model (Leviathan et al. 2023, with measured costs in place of a fixed cost ratio):
- acceptance alpha: the chance a draft is accepted given the drafts before it were, estimated from
  the accepted counts with exponential forgetting (``decay`` per ``decay_rows`` row-steps, so the estimate
  remembers as many row-steps at batch 1 as at batch 8): a row that proposed G and accepted a made
  min(a + 1, G) trials with a successes.
- expected tokens per row and step with gamma g: (1 - alpha^(g+1)) / (1 - alpha).
- cost of a step with gamma g: g * (drafter forward) + verify(g), each an exponential moving average
  of measured seconds; a verify length never measured is interpolated linearly from those that were.
The first step of a run measures first touches, not costs (the caches were just allocated, and the drafter
may never have run in this process: measured at batch 8 on the bundled pair, a first target step took
218 ms against 62 ms for the next ones), so its timings are not cost samples; the run starts with two
steps at ``warmup_gamma`` and one without drafting, so both sides are measured warm.
gamma 0 is the target alone, and drafting is chosen only when its expected rate beats the target
alone's by ``margin`` (5%). While drafting is off nothing new is learnt about alpha, so it probes
with gamma 1 after ``probe_after`` target-alone steps, doubling that wait (up to ``max_probe_after``)
each time the probe leaves drafting off. While drafting is off (chosen so, not the warm-up's planned step, or
gamma fixed at 0) the engine lets the drafter skip its prefill of new rows (``off``), and a probe bounds how far
back the drafter catches up (``probing``). The first drafting step after a target-alone step catches the drafter
up on what it skipped: its drafting time is no cost sample either. (A catch-up over eight new 500-token prompts,
tiny models, every draft accepted: 13x a drafter forward's usual cost; as a cost sample it switched drafting off
for the rest of the run, 75 target passes where drafting on took 29.)
"""

from __future__ import annotations

import numpy as np


def expected_tokens(alpha: float, gamma: np.ndarray) -> np.ndarray:
    """Tokens a row emits per step with ``gamma`` drafts accepted i.i.d. with probability alpha."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class GammaController:
    """``choose()`` the next step's gamma; ``observe()`` what the step did."""

    def __init__(self, max_gamma: int, fixed: int | None = None, *, warmup_gamma: int = 3, decay: float = 0.9,
                 decay_rows: int = 8, ema: float = 0.3, probe_after: int = 8, max_probe_after: int = 256, margin: float = 1.05):
        self.max_gamma = max_gamma
        self.fixed = fixed
        self.decay, self.decay_rows, self.ema, self.margin = decay, decay_rows, ema, margin
        self.successes, self.trials = 1.0, 2.0  # prior: alpha 0.5
        self.draft_seconds: float | None = None  # one drafter forward
        self.verify_seconds = np.full(max_gamma + 1, np.nan)  # one target pass, by gamma
        w = min(warmup_gamma, max_gamma)
        self.plan = [w, w, 0] if max_gamma > 0 else []  # measure both sides first (the first step is cold)
        self.steps = 0  # steps observed
        self.probe_after = self.base_probe_after = probe_after
        self.max_probe_after = max_probe_after
        self.off_steps = 0
        self.probing = False  # the last choice was a probe
        self.last: int | None = None  # the last choice
        self.planned = False  # the last choice was the warm-up's
        self.before_last: int | None = None  # the choice before it

    @property
    def off(self) -> bool:
        """Drafting is off: gamma fixed at 0, or adaptive and the last step ran the target alone by choice (the
        warm-up's planned target-alone step leaves it on)."""
        return self.fixed == 0 or (self.fixed is None and self.last == 0 and not self.planned)

    @property
    def alpha(self) -> float:
        return self.successes / self.trials

    def costs(self) -> np.ndarray:
        """Estimated seconds of a step for each gamma 0..max_gamma (nan where nothing is known)."""
        known = ~np.isnan(self.verify_seconds)
        g = np.arange(self.max_gamma + 1)
        verify = self.verify_seconds.copy()
        if known.sum() >= 2:
            slope, intercept = np.polyfit(g[known], self.verify_seconds[known], 1)
            verify[~known] = intercept + np.maximum(slope, 0.0) * g[~known]
        elif known.sum() == 1:
            verify[~known] = self.verify_seconds[known][0]
        if known[0]:  # a verify pass of more positions is never cheaper than the target alone's step: noise
            verify[1:] = np.maximum(verify[1:], verify[0])
        return g * (self.draft_seconds or 0.0) + verify

    def best(self) -> int:
        costs = self.costs()
        if np.isnan(costs).all():
            return 0
        rate = expected_tokens(self.alpha, np.arange(self.max_gamma + 1, dtype=float)) / costs
        best = int(np.nanargmax(rate))
        if best > 0 and not np.isnan(rate[0]) and rate[best] < self.margin * rate[0]:
            return 0  # drafting must win clearly: timings are noisy, and the target alone is the safe choice
        return best

    def choose(self) -> int:
        self.before_last, self.planned = self.last, bool(self.plan) and self.fixed is None and self.max_gamma > 0
        self.last = self._choose()
        return self.last

    def _choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.max_gamma == 0:
            return 0
        if self.plan:
            return self.plan.pop(0)
        g = self.best()
        if g > 0:
            self.off_steps, self.probing = 0, False
            self.probe_after = self.base_probe_after
            return g
        if self.probing:  # the last probe left drafting off: wait longer before the next one
            self.probing = False
            self.probe_after = min(2 * self.probe_after, self.max_probe_after)
        self.off_steps += 1
        if self.off_steps > self.probe_after:
            self.off_steps, self.probing = 0, True
            return 1
        return 0

    def observe(self, gamma: int, accepted: np.ndarray, draft_seconds: float, verify_seconds: float,
                made: np.ndarray | None = None) -> None:
        """accepted: [n] drafts accepted per row this step, of ``made`` [n] (gamma for every row when None: a row
        near its end makes fewer); seconds: this step's drafting and verify (the first step's are not cost samples)."""
        cold, self.steps = self.steps == 0, self.steps + 1
        if gamma > 0:
            trials = np.minimum(accepted + 1, gamma if made is None else made).sum()
            keep = self.decay ** (len(accepted) / self.decay_rows)
            self.successes = keep * self.successes + float(accepted.sum())
            self.trials = keep * self.trials + float(trials)
        if cold:
            return
        if gamma > 0:
            per_forward = draft_seconds / gamma
            if self.probing or self.before_last == 0:  # its first forward caught up on target-alone steps: no cost sample
                per_forward = self.draft_seconds if self.draft_seconds is not None else per_forward
            self.draft_seconds = per_forward if self.draft_seconds is None else (
                (1 - self.ema) * self.draft_seconds + self.ema * per_forward)
        old = self.verify_seconds[gamma]
        self.verify_seconds[gamma] = verify_seconds if np.isnan(old) else (1 - self.ema) * old + self.ema * verify_seconds
