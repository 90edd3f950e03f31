"""The coverage plot of a head folder."""

from __future__ import annotations

import numpy as np

from vocabtrim import histogram, storage


def plot_coverage(counts: np.ndarray, k: int, coverage: float, path: str, title: str = "") -> None:
    """Coverage against K (log-scaled K axis), the chosen K marked; written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = histogram.coverage_curve(counts)
    ks = np.arange(1, curve.shape[0] + 1)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks, curve, color="tab:blue", lw=1.6, label="top-K coverage")
    ax.axvline(k, color="tab:red", ls="--", lw=1)
    ax.axhline(coverage, color="tab:red", ls=":", lw=0.8)
    ax.plot([k], [coverage], "o", color="tab:red", label=f"chosen K = {k:,} ({coverage:.2%})")
    ax.set_xscale("log")
    ax.set_xlim(1, max(2, curve.shape[0]))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("K (kept token ids, log scale)")
    ax.set_ylabel("share of counted tokens covered")
    ax.set_title(title or "Coverage of the calibration histogram")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    storage.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
