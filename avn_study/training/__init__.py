"""One training run without Ray: fold data and the epoch loop (``engine``), the resumable run
(``run.TrainingRun``), losses, loss-weight schedules, pickle-free checkpoints.

The public names of ``avn_study.training.run`` are importable from here too, as they were before the package
existed.
"""

from __future__ import annotations

from avn_study import lazy_exports

__getattr__ = lazy_exports(
    "avn_study.training.run",
    (
        "TrainingRun",
        "is_run_folder",
        "resolve_channels",
        "write_run_outputs",
    ),
)
