"""Per-case metrics of a prediction against its reference (``case``) and per-hip clinical metrics (``clinical``).

The public names of ``avn_study.metrics.case`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

from avn_study import lazy_exports

__getattr__ = lazy_exports(
    "avn_study.metrics.case",
    (
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
    ),
)
