"""avn-study: ablation and hyperparameter studies of a multitask AVN segmentation network on Ray.

The public names below are imported lazily, so ``import avn_study`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # what a script or notebook needs; everything else is imported from its module
    # cohorts
    "PhantomConfig": "avn_study.data.phantom",
    "write_cohort": "avn_study.data.phantom",
    "verify_dataset": "avn_study.data.verify",
    # training, and the registries a new model or schedule plugs into
    "TrainConfig": "avn_study.config",
    "prepare_data": "avn_study.engine",
    "TrainingRun": "avn_study.training",
    "create_model": "avn_study.models",
    "register_model": "avn_study.models",
    "create_schedule": "avn_study.schedules",
    "register_schedule": "avn_study.schedules",
    "case_metrics": "avn_study.metrics",
    # studies and their results
    "Study": "avn_study.sweep",
    "load_experiment": "avn_study.analysis",
    "analyze": "avn_study.analysis",
    "write_analysis": "avn_study.analysis",
    # models in use
    "export_bundle": "avn_study.export",
    "load_bundle": "avn_study.bundle",
    "predict": "avn_study.predict",
    "evaluate_bundle": "avn_study.evaluate",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'avn_study' has no attribute {name!r}")
