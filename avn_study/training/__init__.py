"""One training run without Ray, in the order a trial runs it: the fold's data (``fold``), the resumable run
(``run.TrainingRun``), the epoch loop (``loop``) and validation (``validation``); losses, loss-weight schedules,
pickle-free checkpoints. (``engine`` re-exports the names these had when they were one module.)

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
