"""Following a study in the tools Ray Tune users already use: TensorBoard, MLflow, Weights & Biases.

``avn-study sweep --track NAME`` (repeatable) adds Ray Tune's own logger callback for each tool, so every
trial's epoch records (losses, loss weights, ``val_dice`` ...) and its configuration land there as well as
in the study folder, which stays the record that analysis reads. Tune is told only the metric and the
epoch (``study.trainable.driver_view``); the loggers are given the epoch's full record, read from the
trial's folder in the experiment storage (:func:`full_record`).

- ``tensorboard``: event files in each trial's folder (Ray writes them whenever tensorboardX is
  installed, which ``ray[tune]`` brings); ``tensorboard --logdir STORAGE/NAME``.
- ``mlflow``: one MLflow run per trial in the experiment named after the study, tagged with study,
  stage and row; tracking URI from ``MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the
  study folder (a local ``--storage`` only). Needs ``pip install 'avn-study[mlflow]'``.
- ``wandb``: one W&B run per trial in the project named after the study (``WANDB_PROJECT`` overrides),
  grouped by experiment; set ``WANDB_API_KEY``, or ``WANDB_MODE=offline`` to log locally and sync later.
  Needs ``pip install 'avn-study[wandb]'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from avn_study.errors import UsageError

TRACKERS = ("tensorboard", "mlflow", "wandb")
_NEEDS = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "avn-study[mlflow]"),
          "wandb": ("wandb", "avn-study[wandb]")}  # fmt: skip


def check_trackers(names: list[str], storage: str) -> None:
    """Refuse, before anything starts, an unknown tracker, one whose package is missing, or MLflow
    without a tracking URI on a remote ``storage``."""
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--track {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"--track {name} needs the '{module}' package: pip install '{package}'")
        if name == "mlflow" and "://" in storage and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise UsageError("--track mlflow with an object-store --storage needs MLFLOW_TRACKING_URI (an MLflow "
                             "server or database); the default SQLite file lives in a local study folder")  # fmt: skip


def mlflow_uri(study_folder: str) -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///STUDY/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(study_folder).resolve() / 'mlflow.db'}"


def full_record(trial: Any, result: dict[str, Any]) -> dict[str, Any]:
    """A Tune result with the trial's full record of its epoch laid over it (``epochs/epoch_NNN.json`` in the
    trial's folder of the experiment storage, which the trial wrote before reporting); the result as it
    is when there is none (a study from before the records) or it cannot be read."""
    from avn_study.study.folder import epoch_file

    epoch = result.get("epoch")
    if not isinstance(epoch, int):
        return result
    storage = trial.storage
    try:
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/{epoch_file(epoch)}") as stream:
            record = json.loads(stream.read())
    except (OSError, ValueError):  # none written (an older study), or one being replaced by a retry
        return result
    return {**result, **record} if isinstance(record, dict) else result


class _FullRecords:
    """Mixed into a Ray Tune logger callback: it logs every epoch's full record (:func:`full_record`)."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        super().on_trial_result(iteration, trials, trial, full_record(trial, result), **info)  # type: ignore[misc]


def _with_full_records(logger: type) -> type:
    return type(logger.__name__, (_FullRecords, logger), {})


def tracker_callbacks(names: list[str], study: str, study_folder: str, experiment: str) -> list[Any]:
    """Ray Tune logger callbacks for one experiment of a study (see the module docstring)."""
    callbacks: list[Any] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(_with_full_records(TBXLoggerCallback)())
        elif name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            mlflow = _with_full_records(MLflowLoggerCallback)
            tags = {"avn_study": study, "experiment": experiment}
            callbacks.append(mlflow(tracking_uri=mlflow_uri(study_folder), experiment_name=study, tags=tags,
                                    save_artifact=False))  # fmt: skip
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            project = os.environ.get("WANDB_PROJECT") or study
            wandb = _with_full_records(WandbLoggerCallback)
            callbacks.append(wandb(project=project, group=experiment, log_config=True, upload_checkpoints=False))
    return callbacks
