"""One training run without Ray: fold data and the epoch loop (``engine``), the resumable run
(``run.TrainingRun``), losses, loss-weight schedules, pickle-free checkpoints.

The public names of ``avn_study.training.run`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE = "avn_study.training.run"
_NAMES = (
    "TrainingRun",
    "is_run_folder",
    "resolve_channels",
    "write_run_outputs",
)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
