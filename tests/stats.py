"""A chi-square goodness-of-fit test with no SciPy: p-value via the regularised upper gamma."""

from __future__ import annotations

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
