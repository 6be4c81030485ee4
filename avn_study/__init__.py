"""avn-study: ablation and hyperparameter studies of a multitask AVN segmentation network on Ray.

The public names below are imported lazily, so ``import avn_study`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # what a script or notebook needs; everything else is imported from its module
    # cohorts
    "PhantomConfig": "avn_study.data.phantom",
    "write_cohort": "avn_study.data.phantom",
    "verify_dataset": "avn_study.data.verify",
    # training, and the registries a new model or schedule plugs into
    "TrainConfig": "avn_study.config",
    "prepare_data": "avn_study.training.fold",
    "TrainingRun": "avn_study.training.run",
    "create_model": "avn_study.models",
    "register_model": "avn_study.models",
    "create_schedule": "avn_study.training.schedules",
    "register_schedule": "avn_study.training.schedules",
    "case_metrics": "avn_study.metrics.case",
    # studies and their results
    "Study": "avn_study.study.driver",
    "load_experiment": "avn_study.analysis",
    "analyze": "avn_study.analysis",
    "write_analysis": "avn_study.analysis",
    # models in use
    "export_bundle": "avn_study.bundle.export",
    "load_bundle": "avn_study.bundle.format",
    "predict": "avn_study.bundle.predict",
    "evaluate_bundle": "avn_study.bundle.evaluate",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def lazy_exports(module: str, names: tuple[str, ...]) -> Any:
    """A module-level ``__getattr__`` (PEP 562) that imports ``module`` only when one of ``names`` is used:
    a package re-exports its main module's names without importing it (and its torch) with the package."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {module.rsplit('.', 1)[0]!r} has no attribute {name!r}")

    return __getattr__


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'avn_study' has no attribute {name!r}")


# ----------------------------------------------------------------------------- modules that moved
# The flat modules of earlier versions live in stage subpackages now. Their old import paths still work (a
# DeprecationWarning, once per name): Ray pickles our searcher, scheduler, trial-name function, progress
# reporter and trainable by import path into a study folder, and old studies must still resume.
_MOVED = {
    "avn_study.engine": "avn_study.training.engine",
    "avn_study.checkpoint": "avn_study.training.checkpoint",
    "avn_study.losses": "avn_study.training.losses",
    "avn_study.schedules": "avn_study.training.schedules",
    "avn_study.stage_timer": "avn_study.training.stage_timer",
    "avn_study.clinical": "avn_study.metrics.clinical",
    "avn_study.space": "avn_study.study.space",
    "avn_study.plan": "avn_study.study.plan",
    "avn_study.sweep": "avn_study.study.driver",
    "avn_study.search": "avn_study.study.search",
    "avn_study.trainable": "avn_study.study.trainable",
    "avn_study.study_folder": "avn_study.study.folder",
    "avn_study.study_results": "avn_study.study.results",
    "avn_study.storage": "avn_study.study.storage",
    "avn_study.tracking": "avn_study.study.tracking",
    "avn_study.progress": "avn_study.study.progress",
    "avn_study.study_check": "avn_study.study.check",
    "avn_study.export": "avn_study.bundle.export",
    "avn_study.onnx_export": "avn_study.bundle.onnx",
    "avn_study.predict": "avn_study.bundle.predict",
    "avn_study.evaluate": "avn_study.bundle.evaluate",
    "avn_study.nnunet": "avn_study.baselines.nnunet.run",
    "avn_study.nnunet_trainer": "avn_study.baselines.nnunet.trainer",
    "avn_study.bench_cluster": "avn_study.bench.cluster",
    "avn_study.calibrate": "avn_study.bench.calibrate",
    "avn_study.loop_profile": "avn_study.bench.loop_profile",
}


class _MovedModules:
    """A meta path finder that answers an old module path with the module that now holds its code."""

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _MOVED:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(fullname, cls())

    def create_module(self, spec: Any) -> Any:
        import warnings

        warnings.warn(f"{spec.name} moved to {_MOVED[spec.name]}; import it from there", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module: Any) -> None:
        pass  # the real module ran when it was imported under its own name


if not any(isinstance(f, type) and f.__name__ == "_MovedModules" for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules)  # before the path finders: only old names, which no file holds
