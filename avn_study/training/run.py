"""One training run, an epoch at a time: what ``avn-study train`` and the Ray trainable both drive."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from avn_study.config import TrainConfig
from avn_study.data.batches import batch_source
from avn_study.data.slices import AugmentConfig, SliceConfig, SliceDataset, UnlabelledBatches, interleave
from avn_study.models.runtime import autocast_dtype, build_model, resolve_device
from avn_study.training.checkpoint import load_training_state, load_weights, save_checkpoint, save_weights
from avn_study.training.fold import RunData
from avn_study.training.loop import cosine_lr, reference_indices, reference_losses, train_one_epoch
from avn_study.training.losses import LossConfig
from avn_study.training.schedules import create_schedule
from avn_study.training.stage_timer import NO_TIMER, Timer
from avn_study.training.validation import evaluate


def resolve_channels(config: TrainConfig, data: RunData) -> TrainConfig:
    """``in_channels`` set to the cohort's channel count (0 means "the cohort's"), or checked against it.

    Raises:
        DataError: the config asks for another number of channels than the cohort has.
    """
    from avn_study.errors import DataError

    n = data.train[0].n_channels
    if config.model.in_channels == 0:
        return config.replace(in_channels=n)
    if config.model.in_channels != n:
        raise DataError(f"in_channels={config.model.in_channels}, but the cohort has {n} channel(s) "
                        f"({', '.join(data.channels)}); use in_channels=0 to follow the cohort")  # fmt: skip
    return config


class TrainingRun:
    """Model, optimizer, loss schedule and data of one run; :meth:`run_epoch` advances one epoch.

    Attributes:
        history: one record per finished epoch: ``epoch, lr, w_<branch>, loss_<branch>, loss_total,
            train_slices, train_seconds`` and, on evaluated epochs, the validation summary
            (``val_dice``, ``val_dice_all``, ...; HD95 and lesion metrics on every
            ``full_metrics_every``-th validation and the last).
        last_per_case: per-case metrics of the latest evaluation.
    """

    def __init__(self, config: TrainConfig, data: RunData) -> None:
        self.config, self.data = resolve_channels(config, data), data
        config = self.config
        rt = config.runtime
        if rt.threads > 0:
            torch.set_num_threads(rt.threads)
        self.device = resolve_device(rt.device)
        self.amp_dtype = autocast_dtype(rt.amp, self.device)
        torch.manual_seed(rt.seed)
        self.model = build_model(config).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = create_schedule(
            config.optim.schedule, tuple(self.model.branches), **config.optim.schedule_params
        )
        groups = [{"params": list(self.model.parameters()), "weight_decay": config.optim.weight_decay}]
        if self.schedule.parameters():
            groups.append({"params": self.schedule.parameters(), "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.optim.lr)
        self.loss_config = LossConfig(seg_dice_weight=config.optim.seg_dice_weight, recon_kind=config.optim.recon_kind)
        d = config.data
        self.slice_config = SliceConfig(d.slice_size, d.loc_margin_mm, d.empty_slice_fraction, d.necrosis_oversample)
        self.dataset = SliceDataset(data.train, self.slice_config)
        self.batches = batch_source(
            self.dataset,
            batch_size=config.optim.batch_size,
            seed=rt.seed,
            device=self.device,
            resident=rt.resident,
            memory_fraction=rt.resident_memory_fraction,
        )
        self.augment = AugmentConfig() if d.augment else None
        self.unlabelled = None  # scans without labels feed the reconstruction term (see data.slices.UnlabelledBatches)
        if data.unlabelled and "recon" in self.model.branches and d.unlabelled_ratio > 0:
            self.unlabelled = UnlabelledBatches(data.unlabelled, self.slice_config, config.optim.batch_size, rt.seed)
        self.history: list[dict[str, Any]] = []
        self.last_per_case: list[dict[str, Any]] = []
        self.last_extras: dict[str, Any] | None = None  # the last epoch's calibration counts and overlay slices
        self.timer: Timer = NO_TIMER  # a StageTimer times the loop's stages (bench train)

    @property
    def epoch(self) -> int:
        """The next epoch to run (0-based)."""
        return len(self.history)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.optim.epochs

    def run_epoch(self) -> dict[str, Any]:
        """Train one epoch, evaluate when due, append and return the epoch's record."""
        cfg, epoch = self.config, self.epoch
        lr = cosine_lr(cfg.optim.lr, epoch, cfg.optim.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        record: dict[str, Any] = {"epoch": epoch, "lr": lr}
        if not self.schedule.has_reference:  # a fresh run (a resumed one restores it with the schedule)
            reference = self.measure_reference()
            self.schedule.set_reference(reference)
            record.update({f"ref_loss_{k}": v for k, v in reference.items()})
        weights = self.schedule.weights(epoch, self.history)
        self.batches.set_epoch(epoch)
        generator = torch.Generator().manual_seed(cfg.runtime.seed * 1_000_003 + epoch)
        record.update({f"w_{k}": float(v) for k, v in weights.items()})
        batches = self.batches
        if self.unlabelled is not None and float(weights.get("recon", 0.0)) > 0:  # no weight: nothing to learn
            count = round(cfg.data.unlabelled_ratio * self.batches.slices_per_epoch)
            batches = interleave(self.batches, len(self.batches), self.unlabelled.epoch(epoch, count))
        record.update(
            train_one_epoch(
                self.model,
                batches,
                self.optimizer,
                self.schedule,
                weights,
                epoch=epoch,
                loss_config=self.loss_config,
                device=self.device,
                amp_dtype=self.amp_dtype,
                augment=self.augment,
                generator=generator,
                timer=self.timer,
            )
        )
        last, rt = epoch + 1 == cfg.optim.epochs, cfg.runtime
        if last or (epoch + 1) % rt.eval_every == 0:
            full = last or (epoch + 1) % (rt.eval_every * rt.full_metrics_every) == 0
            self.last_extras = {} if last else None
            summary, self.last_per_case = evaluate(
                self.model, self.data.val, self.slice_config, self.device, self.amp_dtype, rt.threshold,
                timer=self.timer, full=full, extras=self.last_extras,
            )  # fmt: skip
            record.update(summary)
        if self.device.type == "cuda":  # what a trial needs of a GPU: sizes fractional `gpu` shares
            record["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.history.append(record)
        return record

    def evaluate_test(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The current model on the split's held-out test set (``({}, [])`` when the split has none).

        Never part of an epoch record: a test score must not reach Tune, Optuna or any selection.
        """
        if not self.data.test:
            return {}, []
        cfg = self.config
        return evaluate(
            self.model, self.data.test, self.slice_config, self.device, self.amp_dtype, cfg.runtime.threshold
        )

    def measure_reference(self) -> dict[str, float]:
        """Losses of the untrained network on a fixed set of training slices (see ``loop.reference_losses``)."""
        indices = reference_indices(self.dataset.has_head)
        size = self.config.optim.batch_size
        batches = (self.dataset.__getitems__(indices[i : i + size].tolist()) for i in range(0, indices.size, size))
        return reference_losses(self.model, batches, self.loss_config, self.device, self.amp_dtype)

    def provenance(self) -> dict[str, Any]:
        from avn_study.models import n_parameters

        return {
            "n_parameters": n_parameters(self.model),
            "channels": self.data.channels,
            "split_hash": self.data.split_hash,
            "inner_split_hash": self.data.inner_split_hash,
            "data_fingerprint": self.data.data_fingerprint,
            "train_cases": [c.case_id for c in self.data.train],
            "val_cases": [c.case_id for c in self.data.val],
            "test_cases": [c.case_id for c in self.data.test],
            "device": str(self.device),
            "batch_source": self.batches.kind,
            "autocast": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off",
            "channels_last": self.device.type == "cuda",
        }

    def save(self, directory: str | Path) -> Path:
        """Weights, config and the full training state (resumable)."""
        training = {
            "history": self.history,
            "per_case": self.last_per_case,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "provenance": self.provenance(),
        }
        return save_checkpoint(directory, self.model, self.config.to_flat(), training)

    def restore(self, directory: str | Path) -> None:
        """Continue from :meth:`save`'s folder (same config); the next epoch runs as if never stopped."""
        self.model.load_state_dict(load_weights(directory, map_location=str(self.device)))
        state = load_training_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.history = list(state["history"])
        self.last_per_case = list(state["per_case"])


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a run written by :func:`write_run_outputs` (what ``train --overwrite`` replaces)."""
    from avn_study.outputs import json_marker

    return json_marker(Path(path) / "metrics.json", "history") and (Path(path) / "checkpoint").is_dir()


def write_run_outputs(run: TrainingRun, out: str | Path, overwrite: bool = False) -> Path:
    """``metrics.json`` (config, provenance, history), ``per_case.csv`` and ``checkpoint/``, written into a
    staged folder that becomes ``out`` at the end (check ``out`` first: see ``avn_study.outputs``). An
    existing ``out`` is replaced only with ``overwrite`` and only if it is still a run folder then; if
    something appeared at ``out`` while the run trained, the run is kept beside it and the error says where.

    Raises:
        UsageError: ``out`` appeared meanwhile and may not be replaced.
    """
    from avn_study.outputs import staged_folder

    with staged_folder(Path(out), is_run_folder if overwrite else None, keep_on_conflict=True) as staged:
        _write_run(run, staged)
    return Path(out)


def _write_run(run: TrainingRun, out: Path) -> None:
    final = next((r for r in reversed(run.history) if "val_dice" in r), {})
    test_summary, test_cases = run.evaluate_test()
    payload = {"config": run.config.to_flat(), "provenance": run.provenance(), "final": final, "history": run.history}
    if test_cases:
        payload["test"] = test_summary
    (out / "metrics.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    for name, rows in (("per_case.csv", run.last_per_case), ("test_per_case.csv", test_cases)):
        if rows:
            with (out / name).open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    save_weights(run.model, out / "checkpoint", run.config.to_flat())
