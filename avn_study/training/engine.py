"""The old home of one run's training code, kept so existing imports keep working.

The code now lives by stage, in the order a trial runs it:

- :mod:`avn_study.training.fold`: the fold's data (:func:`prepare_data`, :class:`RunData`, :func:`cohort_split`);
- :mod:`avn_study.models.runtime`: the device, autocast and the arm's model (:func:`resolve_device`,
  :func:`build_model`, ...);
- :mod:`avn_study.training.loop`: the epoch loop (:func:`train_one_epoch`, :func:`reference_losses`,
  :func:`cosine_lr`);
- :mod:`avn_study.training.validation`: validation (:func:`evaluate`, :func:`predict_slices`).

Import from those; this module only re-exports their names.
"""

from __future__ import annotations

from avn_study.models.runtime import (
    arm_branches,
    autocast_context,
    autocast_dtype,
    build_model,
    move_batch,
    resolve_device,
)
from avn_study.training.fold import RunData, cohort_split, prepare_data, require_head_labels, usable_unlabelled
from avn_study.training.loop import (
    REFERENCE_SLICES,
    NonFiniteLossError,
    cosine_lr,
    reference_indices,
    reference_losses,
    train_one_epoch,
)
from avn_study.training.validation import evaluate, predict_slices

_move = move_batch  # the names these helpers had here
_autocast = autocast_context

__all__ = [
    "REFERENCE_SLICES",
    "NonFiniteLossError",
    "RunData",
    "arm_branches",
    "autocast_dtype",
    "build_model",
    "cohort_split",
    "cosine_lr",
    "evaluate",
    "predict_slices",
    "prepare_data",
    "reference_indices",
    "reference_losses",
    "require_head_labels",
    "resolve_device",
    "train_one_epoch",
    "usable_unlabelled",
]
