"""Experiment folders -> tidy tables, paired statistics per ablation row, plots and a Markdown report.

Everything is computed from the per-case metrics stored in the trial folders, read from JSON only
(Ray's pickles are never opened). ``tables`` reads, ``stats`` tests, ``plots`` draws, ``report``
puts it together for ``avn-study analyze``.
"""

from avn_study.analysis.report import Analysis, analyze, write_analysis
from avn_study.analysis.stats import (
    METRICS,
    ablation_table,
    bootstrap_ci,
    compare_paired,
    compare_rows,
    holm,
    patient_values,
    seed_spread,
)
from avn_study.analysis.tables import Experiment, load_experiment, write_tables

__all__ = [
    "METRICS",
    "Analysis",
    "Experiment",
    "ablation_table",
    "analyze",
    "bootstrap_ci",
    "compare_paired",
    "compare_rows",
    "holm",
    "load_experiment",
    "patient_values",
    "seed_spread",
    "write_analysis",
    "write_tables",
]
