"""Per-case metrics of a prediction against its reference (``case``) and per-hip clinical metrics (``clinical``).

The public names of ``avn_study.metrics.case`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE = "avn_study.metrics.case"
_NAMES = (
    "CALIBRATION_BINS",
    "EMPTY_RULE",
    "calibration_counts",
    "case_metrics",
    "dice",
    "dice_from_counts",
    "hd95_mm",
    "lesion_detection",
    "overlap_metrics",
    "psnr",
    "summarize",
)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
