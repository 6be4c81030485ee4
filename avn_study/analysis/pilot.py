"""Variance components of a finished (pilot) study, for ``avn-study plan --pilot STUDY``."""

from __future__ import annotations

from pathlib import Path

from avn_study.analysis.design import Components, estimate_components
from avn_study.analysis.stats import METRICS, run_values
from avn_study.analysis.tables import load_experiment
from avn_study.errors import UsageError


def pilot_components(study: str | Path, metric: str = "dice") -> Components:
    """The components of ``metric`` in a study's reported (stage-2) runs, each run's cases averaged per
    patient; what the design cannot separate keeps its default (:func:`estimate_components`).

    Raises:
        UsageError: a folder with no finished stage-2 trial (tuning results say nothing about a rerun).
    """
    experiment = load_experiment(study)
    if experiment.reported_stage != 2:
        raise UsageError(f"{study}: no finished stage-2 trial: a pilot needs an ablation's reported runs")
    runs = run_values(experiment.evaluation_cases(), metric)
    if runs.empty:
        raise UsageError(f"{study}: no per-case {metric} in its stage-2 trials")
    runs = runs.assign(run=[f"{f}:{s}:{r}" for f, s, r in zip(runs["fold"], runs["seed"], runs["repeat"], strict=True)])
    spec = METRICS[metric]
    return estimate_components(runs, Components(low=spec.low, high=min(spec.high, 1e9)))
