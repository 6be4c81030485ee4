"""avn-study: ablation and hyperparameter studies of a multitask AVN segmentation network on Ray.

The public names below are imported lazily, so ``import avn_study`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PhantomConfig": "avn_study.data.phantom",
    "write_cohort": "avn_study.data.phantom",
    "synth_case": "avn_study.data.phantom",
    "verify_dataset": "avn_study.data.verify",
    "open_cohort": "avn_study.data.layout",
    "LABELS": "avn_study.data.layout",
    "PreprocessConfig": "avn_study.data.preprocess",
    "build_cache": "avn_study.data.cache",
    "make_splits": "avn_study.data.splits",
    "load_or_create_splits": "avn_study.data.splits",
    "SliceConfig": "avn_study.data.slices",
    "SliceDataset": "avn_study.data.slices",
    "EpochSampler": "avn_study.data.slices",
    "AugmentConfig": "avn_study.data.slices",
    "augment_batch": "avn_study.data.slices",
    "load_ras": "avn_study.data.nifti",
    "TrainConfig": "avn_study.config",
    "create_model": "avn_study.models",
    "list_models": "avn_study.models",
    "model_for_arm": "avn_study.models",
    "LossConfig": "avn_study.losses",
    "branch_losses": "avn_study.losses",
    "Schedule": "avn_study.schedules",
    "create_schedule": "avn_study.schedules",
    "list_schedules": "avn_study.schedules",
    "register_schedule": "avn_study.schedules",
    "case_metrics": "avn_study.metrics",
    "summarize": "avn_study.metrics",
    "train_one_epoch": "avn_study.engine",
    "evaluate": "avn_study.engine",
    "prepare_data": "avn_study.engine",
    "TrainingRun": "avn_study.training",
    "save_in_geometry": "avn_study.data.nifti",
    "load_experiment": "avn_study.analysis",
    "analyze": "avn_study.analysis",
    "write_analysis": "avn_study.analysis",
    "export_bundle": "avn_study.export",
    "load_bundle": "avn_study.bundle",
    "predict": "avn_study.predict",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'avn_study' has no attribute {name!r}")
