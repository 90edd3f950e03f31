"""A chi-square goodness-of-fit test with no SciPy (p-value via the regularised upper gamma), and the exact
law a sampler must keep on a tiny vocabulary."""

from __future__ import annotations

import itertools

import torch


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test of counts ``observed`` [C] against probabilities ``expected_probs`` [C].

    Cells with expected count below ``min_expected`` are pooled into one cell (the usual rule for
    the chi-square approximation). Returns the p-value: the chance, if the counts really come from
    ``expected_probs``, of a statistic at least this large.
    """
    observed = observed.double()
    n = observed.sum()
    expected = expected_probs.double() * n
    small = expected < min_expected
    if bool(small.any()):
        obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    else:
        obs, exp = observed, expected
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return 0.0  # counts where the target puts no mass at all
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))


def exact_first_tokens(target, prompt, params=None, n_tokens=3, support=None) -> torch.Tensor:
    """The target's exact joint law of its first ``n_tokens`` tokens after ``prompt``, by enumerating every
    sequence: [V**n], float64. ``params``: the engine's ``SamplingParams`` (temperature, top-k, top-p; None: T=1).
    ``support``: the law of a decoder that renormalises the target over those ids only (a lossy trim)."""
    from vocabtrim.engine.sampling import SamplingParams, logits_to_probs

    v = target.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(v), repeat=n_tokens)))  # [V^n, n]
    inputs = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = target(inputs).logits[:, len(prompt) - 1 : -1].double()  # [V^n, n, V]
    if support is not None:
        mask = torch.full((v,), float("-inf"), dtype=torch.float64)
        mask[support] = 0
        logits = logits + mask
    probs = logits_to_probs(logits, params or SamplingParams(temperature=1.0)).double()
    return probs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).prod(-1)
