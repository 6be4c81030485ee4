"""Validation: the model's predictions on whole validation volumes, scored per case.

:func:`evaluate` predicts every coronal slice of each case, stacks them back to 3D and computes per-case
metrics; :func:`predict_slices` (the model's probabilities for a stack of slices) is shared with the bundle's
prediction, so a bundle predicts exactly as its trial validated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from avn_study.data.cache import CachedCase
from avn_study.data.labels import LABELS
from avn_study.data.slices import SliceConfig, validation_volumes
from avn_study.metrics.case import case_metrics, dice_from_counts, overlap_metrics, psnr, summarize
from avn_study.models.runtime import autocast_context, move_batch
from avn_study.training.stage_timer import NO_TIMER, Timer
from avn_study.vocabulary import LOC_THRESHOLD


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
        x = move_batch({"x": images[start : start + batch_size]}, device, channels_last)["x"]
        with autocast_context(device, amp_dtype):
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
