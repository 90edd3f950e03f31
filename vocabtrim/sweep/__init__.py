"""``vocabtrim sweep``: the VocabTrim study on one target/drafter pair: K sweep × calibration source.

``cells``: the configuration, the cells and their metrics (MBSU, c, the knee); ``run``: claiming the
sweep folder and running every cell, each stage resumable; ``report``: report.md and the plots.
"""

from vocabtrim.sweep.cells import (
    SOURCES,
    Cell,
    SweepConfig,
    knee_k,
    load_outliers,
    mbsu,
    param_ratio,
    parse_k,
    parse_sources,
    plan_cells,
)
from vocabtrim.sweep.report import PLOTS, REPORT_FILE
from vocabtrim.sweep.run import RESULTS_FILE, SETTINGS_FILE, run_sweep

__all__ = [
    "PLOTS", "REPORT_FILE", "RESULTS_FILE", "SETTINGS_FILE", "SOURCES", "Cell", "SweepConfig", "knee_k", "load_outliers",
    "mbsu", "param_ratio", "parse_k", "parse_sources", "plan_cells", "run_sweep",
]
