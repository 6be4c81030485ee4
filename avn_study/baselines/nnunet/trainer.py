"""nnU-Net's trainer with the row's epochs and iterations, reporting each epoch to the trial (imports nnU-Net).

Imported only by :func:`avn_study.baselines.nnunet.run.run_trial`, inside a trial, with nnU-Net's folders set.
nnU-Net's own checkpoints are pickled objects (NumPy scalars among them) that it loads by unpickling;
this trainer writes none of them. The trial's checkpoint (:func:`save_state`) holds tensors and plain
Python values only, and :func:`load_state` reads it with ``weights_only=True``: resuming never runs
code from a file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import load_json

from avn_study.data.layout import DATASET_JSON
from avn_study.study.folder import NNUNET_CHECKPOINT

_CUDA = torch.device("cuda")  # nnU-Net's default (its checkpoints record these init arguments by name)


class AvnNnUNetTrainer(nnUNetTrainer):
    """nnU-Net's default trainer; epochs and iterations from the row, each epoch reported to the trial."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = _CUDA) -> None:  # fmt: skip
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.avn_hooks: Any = None
        self.avn_last_record: dict[str, Any] = {}

    def on_epoch_end(self) -> None:
        epoch = self.current_epoch
        super().on_epoch_end()  # nnU-Net's logging; advances current_epoch (its own checkpoints are off)
        log = self.logger
        record = {
            "epoch": epoch,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "nnunet_train_loss": float(log.get_value("train_losses", step=-1)),
            "nnunet_val_loss": float(log.get_value("val_losses", step=-1)),
            "nnunet_pseudo_dice": float(log.get_value("mean_fg_dice", step=-1)),
            "nnunet_ema_pseudo_dice": float(log.get_value("ema_fg_dice", step=-1)),
            "epoch_s": float(
                log.get_value("epoch_end_timestamps", step=-1) - log.get_value("epoch_start_timestamps", step=-1)
            ),
        }
        self.avn_last_record = record
        if epoch + 1 == self.num_epochs:  # the last epoch is reported with its scores, after prediction
            return
        hooks = self.avn_hooks
        if (epoch + 1) % hooks.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_state(self, Path(tmp) / NNUNET_CHECKPOINT)
                hooks.report(record, Path(tmp))
        else:
            hooks.report(record, None)


def build_trainer(preprocessed: Path, cfg: Any, device: torch.device, hooks: Any,
                  resume_from: Path | None) -> AvnNnUNetTrainer:  # fmt: skip
    """The trainer of ``cfg``'s fold on the preprocessed data in ``preprocessed``, resumed when asked."""
    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = resume_from is not None
    dataset_json = load_json(str(preprocessed / DATASET_JSON))  # nnU-Net copies the raw one
    trainer = AvnNnUNetTrainer(plans, cfg.configuration, cfg.base.data.fold, dataset_json, device)
    trainer.num_epochs = cfg.epochs
    trainer.num_iterations_per_epoch = cfg.iterations
    trainer.num_val_iterations_per_epoch = cfg.val_iterations
    trainer.avn_hooks = hooks
    trainer.disable_checkpointing = True  # nnU-Net's pickled checkpoints: the trial keeps its own (save_state)
    if resume_from is not None:
        load_state(trainer, resume_from)  # like nnU-Net's --c: epoch, weights, optimiser, logs
    return trainer


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays (in nnU-Net's logs) as Python values, so ``weights_only`` can read them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, torch.Tensor) else value


def save_state(trainer: AvnNnUNetTrainer, path: Path) -> None:
    """What resuming needs (weights, optimiser, grad scaler, logs, the next epoch), tensors and plain values."""
    network = getattr(trainer.network, "_orig_mod", trainer.network)
    scaler = trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None
    torch.save({"network_weights": network.state_dict(), "optimizer_state": trainer.optimizer.state_dict(),
                "grad_scaler_state": scaler, "logging": _plain(trainer.logger.get_checkpoint()),
                "best_ema": _plain(trainer._best_ema), "current_epoch": int(trainer.current_epoch),
                "mirroring_axes": _plain(trainer.inference_allowed_mirroring_axes)}, path)  # fmt: skip


def load_state(trainer: AvnNnUNetTrainer, path: Path) -> None:
    """Restore a :func:`save_state` file into a fresh trainer; tensors and plain values only (no code)."""
    if not trainer.was_initialized:
        trainer.initialize()
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    getattr(trainer.network, "_orig_mod", trainer.network).load_state_dict(state["network_weights"])
    trainer.optimizer.load_state_dict(state["optimizer_state"])
    if trainer.grad_scaler is not None and state["grad_scaler_state"] is not None:
        trainer.grad_scaler.load_state_dict(state["grad_scaler_state"])
    trainer.logger.load_checkpoint(state["logging"])
    trainer.current_epoch, trainer._best_ema = state["current_epoch"], state["best_ema"]
    axes = state["mirroring_axes"]
    trainer.inference_allowed_mirroring_axes = tuple(axes) if axes is not None else None


def predict_cases(trainer: AvnNnUNetTrainer, images: dict[str, list[Path]], out: Path, tta: bool) -> dict[str, Path]:
    """nnU-Net's prediction of each case (its image files) in the case's own geometry, in this process."""
    if not images:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    trainer.set_deep_supervision_enabled(False)
    network = getattr(trainer.network, "_orig_mod", trainer.network)
    network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)  # fmt: skip
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)  # fmt: skip
    io = SimpleITKIO()
    written = {}
    for case, files in images.items():
        data, properties = io.read_images([str(f) for f in files])
        seg = predictor.predict_single_npy_array(data, properties, None, None, False)
        path = out / f"{case}.nii.gz"
        io.write_seg(seg, str(path), properties)
        written[case] = path
    return written
