"""Training and evaluation in plain torch: no Ray here (the trainable wraps this module).

:func:`train_one_epoch` and :func:`evaluate` are the two loops; :class:`TrainingRun` wires a
:class:`~avn_study.config.TrainConfig` to data, model, optimizer and loss schedule, runs one epoch at
a time and saves/restores its whole state, so ``avn-study train`` and a Ray trial share every line of
training logic. A run is deterministic: the seed fixes initialisation, the per-epoch slice order
(:class:`~avn_study.data.slices.EpochSampler`) and augmentation (a generator seeded per epoch), so
resuming at an epoch boundary continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avn_study.config import TrainConfig
from avn_study.data.cache import CachedCase, build_cache, cohort_fingerprint
from avn_study.data.labels import LABELS
from avn_study.data.layout import open_cohort
from avn_study.data.preprocess import PreprocessConfig
from avn_study.data.slices import (
    AugmentConfig,
    SliceConfig,
    augment_batch,
    validation_volumes,
)
from avn_study.data.splits import Splits, check_inner, inner_splits, resolve_splits
from avn_study.errors import AvnError, DataError
from avn_study.metrics.case import case_metrics, dice_from_counts, overlap_metrics, psnr, summarize
from avn_study.models import model_for_arm
from avn_study.training.losses import LossConfig, branch_losses
from avn_study.training.schedules import Schedule
from avn_study.training.stage_timer import NO_TIMER, Timer
from avn_study.vocabulary import ARMS, LOC_THRESHOLD, MODEL_OPTIONS


class NonFiniteLossError(AvnError):
    """A loss became NaN or Inf: the run stops, naming the epoch, step and loss term."""


@dataclass(frozen=True)
class RunData:
    """The cases of one fold and the identities every result records."""

    train: list[CachedCase]
    val: list[CachedCase]
    split_hash: str
    data_fingerprint: str
    test: list[CachedCase] = field(default_factory=list)  # the split's held-out test set (in no fold)
    inner_split_hash: str = ""  # nested CV: the hash of the inner folds ``val`` comes from
    unlabelled: list[CachedCase] = field(default_factory=list)  # scans without labels: reconstruction only

    @property
    def channels(self) -> list[str]:
        """The cohort's input channel names (``channel_names`` of its dataset.json)."""
        return list(self.train[0].meta.get("channel_names", ["T1"] * self.train[0].n_channels))

    @property
    def val_patients(self) -> list[str]:
        return sorted({c.patient_id for c in self.val})


def cohort_split(
    data_root: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None = None,
    splits_path: str | Path | None = None,
    frozen: dict[str, Any] | None = None,
) -> tuple[list[CachedCase], Splits]:
    """Verify and cache the cohort, and find its patient-level split (see
    :func:`~avn_study.data.splits.resolve_splits`: never written into the cohort's folder unasked)."""
    cohort = open_cohort(data_root)
    cases = build_cache(cohort, PreprocessConfig(inplane_spacing_mm=config.data.inplane_spacing_mm), cache_dir)
    splits = resolve_splits(
        data_root,
        {c.case_id: c.patient_id for c in cases},
        {c.case_id: c.has_necrosis for c in cases},
        config.data.n_folds,
        config.data.split_seed,
        splits_path=splits_path,
        frozen=frozen,
        cache_dir=cache_dir,
    )
    return cases, splits


def require_head_labels(arm: str, cases: Sequence[CachedCase], where: str) -> None:
    """Refuse an arm with a localisation branch on a cohort without femoral head labels.

    Raises:
        DataError: names the arm, the missing label role and how to declare it.
    """
    if "loc" in ARMS[arm].branches and not all(c.has_head_labels for c in cases):
        raise DataError(
            f"{where}: arm '{arm}' has a localisation branch, whose target is the femoral head, but the cohort "
            "labels no femoral head (dataset.json has no 'femoral_head' label and avn_roles.femoral_head is not "
            "set); run the arms without 'loc' (unet, seg, seg+recon) or add head labels"
        )


def prepare_data(
    data_root: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None = None,
    splits_path: str | Path | None = None,
    inner: dict[str, Any] | None = None,
    frozen: dict[str, Any] | None = None,
) -> RunData:
    """Cache the cohort, freeze (or read) the split, pick the fold (see :func:`cohort_split`).

    With ``config.data.inner_fold >= 0`` (nested cross-validation) the run trains and validates
    inside the outer fold's training patients: on the frozen inner splits ``inner`` (a study passes
    its ``nested_splits.json`` entry for the outer fold), else on
    :func:`~avn_study.data.splits.inner_splits` made now, which gives the same folds.
    """
    cases, splits = cohort_split(data_root, config, cache_dir, splits_path, frozen)
    require_head_labels(config.model.arm, cases, str(data_root))
    fold, inner_hash = splits.fold(config.data.fold), ""
    if config.data.inner_fold >= 0:
        if inner is not None:
            folds = check_inner(inner, splits, config.data.fold, "the study's nested_splits.json")
        else:
            patients = {c.case_id: c.patient_id for c in cases}
            necrosis = {c.case_id: c.has_necrosis for c in cases}
            try:
                folds = inner_splits(splits, config.data.fold, patients, necrosis, k=config.data.n_inner_folds)
            except ValueError as err:
                raise DataError(f"n_inner_folds={config.data.n_inner_folds}: {err}") from None
        if folds.k != config.data.n_inner_folds:
            raise AvnError(f"the frozen inner split has {folds.k} folds, but n_inner_folds={config.data.n_inner_folds}")
        fold, inner_hash = folds.fold(config.data.inner_fold), folds.hash
    by_id = {c.case_id: c for c in cases}
    train = [by_id[c] for c in fold.train]
    unlabelled = []
    if "recon" in arm_branches(config) and config.data.unlabelled_ratio > 0:
        unlabelled = usable_unlabelled(data_root, config, cache_dir, train, cases)
    return RunData(
        train,
        [by_id[c] for c in fold.val],
        splits.hash,
        cohort_fingerprint(cases),
        [by_id[c] for c in splits.test],
        inner_hash,
        unlabelled,
    )


def usable_unlabelled(
    data_root: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None,
    train: list[CachedCase],
    labelled: list[CachedCase],
) -> list[CachedCase]:
    """The cohort's unlabelled scans a run may train its reconstruction on: those of its training
    patients and of patients with no labelled scan, never one of a patient it validates or tests on."""
    from avn_study.data.cache import build_unlabelled_cache
    from avn_study.data.layout import UNLABELLED_DIR

    if not (Path(data_root) / UNLABELLED_DIR).is_dir():
        return []
    cohort = open_cohort(data_root)
    scans = build_unlabelled_cache(
        cohort, PreprocessConfig(inplane_spacing_mm=config.data.inplane_spacing_mm), cache_dir
    )
    held_out = {c.patient_id for c in labelled} - {c.patient_id for c in train}
    return [c for c in scans if c.patient_id not in held_out]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    from avn_study.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"device {name!r}: {err} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AvnError(f"device {name!r} was asked for but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; on CPU only when asked (it is slower there for small nets)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    raise ValueError(f"amp must be one of auto, bf16, off, got {amp=}")


def arm_branches(config: TrainConfig) -> tuple[str, ...]:
    """The branches the arm's model has, without building it (``unet`` has only ``seg``)."""
    return ARMS[config.model.arm].branches or ("seg",)


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The arm's model with every architectural option of the config (those the model lacks are dropped)."""
    options = {f: getattr(config.model, f) for f in MODEL_OPTIONS}
    options["in_channels"] = options["in_channels"] or 1  # 0 (the cohort's) is resolved by TrainingRun
    return model_for_arm(config.model.arm, **options)


def _move(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(device, non_blocking=True).contiguous(memory_format=fmt) for k, v in batch.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    weights: dict[str, float],
    *,
    epoch: int,
    loss_config: LossConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
    timer: Timer = NO_TIMER,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean unweighted branch losses, the weighted total, counts.

    A batch without a ``seg`` target is a slice batch of unlabelled scans: it trains the
    reconstruction term alone (weighted by ``weights["recon"]``) and is reported apart, as
    ``loss_recon_unlabelled`` over ``unlabelled_slices``, so the labelled losses keep their meaning.

    Losses are summed on the device and read once at the end of the epoch (no host sync per step).
    A non-finite loss is still found exactly: the first step with one, and its values, are kept on
    the device as the epoch runs, and the error names that step and term. (The steps after it train
    on NaN, which costs the rest of one epoch of a run that fails anyway.)

    Raises:
        NonFiniteLossError: a loss term is NaN or Inf (names the epoch, step and term).
    """
    model.train()
    branches = tuple(model.branches)
    names: list[str] = []  # "total", then the branch losses in the order the loss returns them
    sums = bad_values = torch.zeros(0)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    recon_sum = torch.zeros((), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    recon_bad = torch.full((), -1, dtype=torch.long, device=device)
    n_slices, n_unlabelled, start = 0, 0, time.perf_counter()
    channels_last = device.type == "cuda"
    batches = iter(batches)
    for step in itertools.count():
        with timer("fetch"):
            batch = next(batches, None)
        if batch is None:
            break
        with timer("transfer"):
            batch = _move(batch, device, channels_last)
        if augment is not None:
            with timer("augment"):
                batch = augment_batch(batch, augment, generator)
        if "seg" not in batch:  # unlabelled scans: the reconstruction term alone
            with timer("forward"):
                with _autocast(device, amp_dtype):
                    recon = model(batch["image"])["recon"]
                loss = branch_losses({"recon": recon.float()}, batch, ("recon",), loss_config)["recon"]
            with timer("bookkeeping"):
                recon_bad = torch.where((recon_bad < 0) & ~torch.isfinite(loss), step, recon_bad)
                n_unlabelled += batch["image"].shape[0]
                recon_sum += loss.detach().to(recon_sum.dtype) * batch["image"].shape[0]
            with timer("backward"):
                optimizer.zero_grad(set_to_none=True)
                (loss * weights["recon"]).backward()
            with timer("optimizer"):
                optimizer.step()
            continue
        with timer("forward"):
            with _autocast(device, amp_dtype):
                outputs = model(batch["image"])
            losses = branch_losses({k: v.float() for k, v in outputs.items()}, batch, branches, loss_config)
            total = schedule.combine(losses, weights)
        with timer("bookkeeping"):
            if not names:
                names = ["total", *losses]
                exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
                sums = torch.zeros(len(names), dtype=exact, device=device)
                bad_values = torch.zeros(len(names), device=device)
            values = torch.stack([total.detach(), *(losses[k].detach() for k in names[1:])]).float()
            newly_bad = (bad_step < 0) & ~torch.isfinite(values).all()
            bad_step = torch.where(newly_bad, step, bad_step)
            bad_values = torch.where(newly_bad, values, bad_values)
            b = batch["image"].shape[0]
            n_slices += b
            sums += values.to(sums.dtype) * b  # float64, in step order: the same numbers as summing .item()s
        with timer("backward"):
            optimizer.zero_grad(set_to_none=True)
            total.backward()
        with timer("optimizer"):
            optimizer.step()
    if n_slices == 0:
        raise AvnError(f"epoch {epoch}: the training set yielded no slices")
    with timer("bookkeeping"):
        first_bad = int(bad_step)  # the epoch's host syncs, all here at its end
        totals = sums.tolist()
        recon_first_bad, recon_total = int(recon_bad), float(recon_sum)
    if recon_first_bad >= 0 and not 0 <= first_bad < recon_first_bad:
        raise NonFiniteLossError(
            f"epoch {epoch}, step {recon_first_bad} (a batch of unlabelled scans): loss term 'recon' is not finite "
            "(lower the learning rate, or check imagesUnlabelled/ with `avn-study verify`)"
        )
    if first_bad >= 0:
        found = dict(zip(names, bad_values.tolist(), strict=True))
        bad = next((k for k in names[1:] if not math.isfinite(found[k])), "total")
        raise NonFiniteLossError(
            f"epoch {epoch}, step {first_bad}: loss term '{bad}' is {found[bad]} "
            "(lower the learning rate, or check the data with `avn-study verify`)"
        )
    record = {f"loss_{k}": v / n_slices for k, v in zip(names, totals, strict=True)}
    if n_unlabelled:
        record.update(loss_recon_unlabelled=recon_total / n_unlabelled, unlabelled_slices=float(n_unlabelled))
    record.update(train_slices=float(n_slices), train_seconds=time.perf_counter() - start)
    return record


REFERENCE_SLICES = 64  # slices of the fixed set on which schedules measure the untrained network's losses


def reference_indices(has_head: np.ndarray, n: int = REFERENCE_SLICES) -> np.ndarray:
    """A fixed, seed-independent set of training slices: ``n`` evenly spaced among those with a femoral head."""
    pool = np.flatnonzero(has_head) if has_head.any() else np.arange(has_head.size)
    picks = np.unique(np.linspace(0, pool.size - 1, min(n, pool.size)).round().astype(int))
    return pool[picks]


@torch.no_grad()
def reference_losses(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_config: LossConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean unweighted branch losses of ``model`` as it is (untrained), without changing it.

    The model runs in training mode, as in the first epoch (batch norm on batch statistics, so the
    losses are on the scale that training reports); its buffers (running statistics) are restored
    afterwards and no optimizer step is taken, so the run continues exactly as if this never happened.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    branches = tuple(model.branches)
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for batch in batches:
        batch = _move(batch, device, device.type == "cuda")
        with _autocast(device, amp_dtype):
            outputs = model(batch["image"])
        losses = branch_losses({k: v.float() for k, v in outputs.items()}, batch, branches, loss_config)
        b = batch["image"].shape[0]
        n += b
        for name, value in losses.items():
            sums[name] += value.item() * b
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    if n == 0:
        raise AvnError("the reference set of training slices is empty")
    return {name: total / n for name, total in sums.items()}


def predict_slices(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Probabilities (``seg``, ``loc``) and reconstructions for a stack of slices ``(N, 1, S, S)``.

    Returns:
        numpy float32 arrays ``(N, S, S)`` per output the model has.
    """
    return {k: v.cpu().numpy() for k, v in _predict_on_device(model, images, device, amp_dtype, batch_size).items()}


@torch.inference_mode()
def _predict_on_device(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                       amp_dtype: torch.dtype | None, batch_size: int = 32) -> dict[str, torch.Tensor]:  # fmt: skip
    """:func:`predict_slices`, left on ``device`` as float32 tensors ``(N, S, S)``."""
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = defaultdict(list)
    channels_last = device.type == "cuda"
    for start in range(0, images.shape[0], batch_size):
        x = _move({"x": images[start : start + batch_size]}, device, channels_last)["x"]
        with _autocast(device, amp_dtype):
            outputs = model(x)
        for name in ("seg", "loc", "recon"):
            if name in outputs:
                out = outputs[name].float()
                out = out if name == "recon" else torch.sigmoid(out)
                chunks[name].append(out[:, 0])
    return {k: torch.cat(v) for k, v in chunks.items()}


def _quick_case_metrics(volume: Any, out: dict[str, torch.Tensor], slice_config: SliceConfig, threshold: float,
                        spacing: tuple[float, float, float]) -> dict[str, float]:  # fmt: skip
    """``case_metrics(full=False)`` of one validation volume from voxel counts taken where the predictions
    are (the GPU in a CUDA trial): only three or four integers per case cross to the host, not the
    probability volumes. Equal to pasting the predictions and calling ``case_metrics`` (counts are exact
    integers and :func:`~avn_study.metrics.case.overlap_metrics` is the formula of both)."""
    case, (src, dst) = volume.case, volume.box
    device = out["seg"].device

    def counts(prob: torch.Tensor, cut: float, ref_full: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        # what paste() keeps of the crop, against the reference in the same voxels; outside the crop
        # nothing is predicted, so the reference counts whole
        pred = prob[:, dst[0], dst[1]] >= cut
        ref = torch.from_numpy(np.ascontiguousarray(ref_full[:, src[0], src[1]])).to(device, non_blocking=True)
        return (pred & ref).sum(), pred.sum(), int(ref_full.sum())

    ref_seg = np.asarray(case.label) == LABELS["necrosis"]
    both, pred, n_ref = counts(out["seg"], threshold, ref_seg)
    device_counts = [both, pred]
    if "loc" in out:
        ref_loc = np.asarray(case.head_dist) <= slice_config.loc_margin_mm
        loc_both, loc_pred, loc_ref = counts(out["loc"], LOC_THRESHOLD, ref_loc)
        device_counts += [loc_both, loc_pred]
    host = torch.stack(device_counts).tolist()  # the one sync of this case
    metrics = overlap_metrics(host[0], host[1], n_ref, spacing)
    if "loc" in out:
        metrics["loc_dice"] = dice_from_counts(host[2], host[3], loc_ref)
    if "recon" in out:
        metrics["recon_psnr"] = psnr(out["recon"].cpu().numpy(), volume.image[:, 0].numpy())
    return {key: float(value) for key, value in metrics.items()}


def evaluate(
    model: torch.nn.Module,
    cases: Sequence[CachedCase],
    slice_config: SliceConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    threshold: float = 0.5,
    timer: Timer = NO_TIMER,
    full: bool = True,
    extras: dict[str, Any] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Predict every coronal slice of each case, stack back to 3D, compute per-case metrics
    (all of them, or with ``full=False`` only the cheap ones: see :func:`avn_study.metrics.case.case_metrics`).

    With ``extras`` (a dict to fill), also records per case the calibration counts of the necrosis
    probabilities within the femoral head region (all voxels for a cohort without head labels) under
    ``extras["calibration"]``, and the coronal slice with the most reference necrosis (input, reference,
    probability, cropped) under ``extras["overlay"]``.

    Returns:
        The trial-level summary (``val_dice`` etc., see :func:`avn_study.metrics.case.summarize`) and one
        dict of metrics per case (with ``case`` and ``patient``).
    """
    per_case, ids = [], []
    for volume in validation_volumes(list(cases), slice_config):
        case = volume.case
        spacing = (case.spacing[1], case.spacing[0], case.spacing[2])  # cached arrays are (A, R, S)
        ids.append({"case": case.case_id, "patient": case.patient_id})
        if not full and extras is None:  # the cheap metrics: counted where the predictions are
            with timer("val_predict"):
                on_device = _predict_on_device(model, volume.image, device, amp_dtype)
            with timer("val_metrics"):
                per_case.append(_quick_case_metrics(volume, on_device, slice_config, threshold, spacing))
            continue
        with timer("val_predict"):
            out = predict_slices(model, volume.image, device, amp_dtype)
        kwargs: dict[str, Any] = {}
        with timer("val_paste"):
            if "loc" in out:
                kwargs.update(
                    pred_loc=volume.paste(out["loc"]) >= LOC_THRESHOLD,
                    ref_loc=np.asarray(case.head_dist) <= slice_config.loc_margin_mm,
                )
            if "recon" in out:
                kwargs.update(recon=out["recon"], recon_ref=volume.image[:, 0].numpy())
            prob = volume.paste(out["seg"])
            pred = prob >= threshold
        with timer("val_metrics"):
            ref = np.asarray(case.label) == LABELS["necrosis"]
            metrics = case_metrics(pred, ref, spacing, full=full, **kwargs)
            if extras is not None:
                _record_extras(extras, volume, out["seg"], prob, ref)
        per_case.append(metrics)
    return summarize(per_case), [{**i, **m} for i, m in zip(ids, per_case, strict=True)]


def _record_extras(extras: dict[str, Any], volume: Any, slices: np.ndarray, prob: np.ndarray, ref: np.ndarray) -> None:
    """Calibration counts and the most necrotic slice of one validation case (see :func:`evaluate`)."""
    from avn_study.metrics.case import calibration_counts

    case = volume.case
    label = np.asarray(case.label)
    region = label >= LABELS["femoral_head"] if case.has_head_labels and label.any() else None
    extras.setdefault("calibration", {})[case.case_id] = calibration_counts(prob, ref, region)
    (src, dst) = volume.box
    per_slice = ref.sum(axis=(1, 2))
    index = int(per_slice.argmax())
    ref_crop = np.zeros(slices.shape[1:], bool)
    ref_crop[dst] = ref[index][src]
    extras.setdefault("overlay", {})[case.case_id] = {
        "slice": index,
        "necrosis_voxels": int(ref.sum()),
        "image": volume.image[index, 0].numpy().astype(np.float16),
        "ref": ref_crop,
        "prob": np.round(slices[index] * 255).astype(np.uint8),
    }


def cosine_lr(base: float, epoch: int, epochs: int, final_fraction: float = 0.01) -> float:
    """Cosine annealing from ``base`` at epoch 0 to ``base * final_fraction`` at the last epoch."""
    t = epoch / max(1, epochs - 1)
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
