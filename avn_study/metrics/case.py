"""Per-case 3D metrics for necrosis segmentation, and their trial-level summary.

Every metric works on whole validation volumes in array order, with the voxel ``spacing`` in mm
given per array axis (thick slices are common, e.g. ``(3.5, 2.0, 2.0)``). Only numpy and
scipy.ndimage are used, so the module is cheap to import.

Definitions:

- **Dice** ``2|P & R| / (|P| + |R|)``.
- **HD95** (mm): surfaces are the mask voxels with a 6-neighbour outside the mask (the mask minus
  its binary erosion by the 6-connected cross; the array edge counts as outside). For each surface
  voxel of one mask the distance in mm to the nearest surface voxel of the other is read from
  ``scipy.ndimage.distance_transform_edt(sampling=spacing)``. HD95 is the **maximum of the two
  directed 95th percentiles** (numpy's linear interpolation), as in MONAI's
  ``compute_hausdorff_distance(percentile=95)``; not medpy's pooled percentile, which lets the
  mask with the larger surface dominate. The transform runs only on the bounding box of both
  masks, which gives the same distances as the full volume because every surface voxel lies in it.
- **Lesions** are 3D connected components with 26-connectivity (voxels touching by a face, an
  edge or a corner belong to one lesion). A reference lesion is detected when at least one
  predicted voxel overlaps it; a predicted component that overlaps no reference voxel is a false
  positive.
- **Volumes** in ml: ``voxel count * prod(spacing) / 1000``; ``volume_error_ml`` is signed,
  predicted minus reference.
- **PSNR** (dB): ``10 log10(data_range**2 / MSE)``; ``data_range`` defaults to the reference's
  ``max - min``. Identical images give ``inf``; a constant reference without an explicit
  ``data_range`` gives NaN.

Empty-mask rule (also in :data:`EMPTY_RULE`, which the docs reuse): a case without necrosis is a
valid healthy hip. Dice is 1.0 when reference and prediction are both empty (correctly healthy)
and 0.0 when exactly one of them is empty. HD95 is 0.0 when both are empty and NaN when exactly
one is empty: a surface distance to nothing is undefined, and any finite penalty (the image
diagonal, a fixed 373 mm as in BraTS) depends on the field of view and would dominate a mean,
so summaries average HD95 over the defined cases and report ``n_hd95_undefined`` next to it;
the failure itself is already counted by Dice and ``lesion_fp``. Lesion sensitivity is NaN when
the reference has no lesion; ``lesion_fp`` is counted for every case. ``loc_dice`` follows the
Dice rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "EMPTY_RULE",
    "case_metrics",
    "dice",
    "hd95_mm",
    "lesion_detection",
    "psnr",
    "summarize",
]

EMPTY_RULE = (
    "Empty masks: a case without necrosis is a valid healthy hip. Dice is 1.0 when the reference "
    "and the prediction are both empty (correctly healthy) and 0.0 when exactly one of them is "
    "empty. HD95 is 0.0 mm when both are empty and undefined (NaN) when exactly one is empty; "
    "summaries average HD95 over the cases where it is defined and report how many were undefined "
    "(n_hd95_undefined), since any finite penalty would depend on the field of view and dominate "
    "the mean. Lesion sensitivity is undefined (NaN) when the reference has no lesion and is "
    "averaged over the cases that have one; false-positive lesions (lesion_fp) are counted for "
    "every case. val_dice, the tuning metric, averages Dice over the cases whose reference "
    "contains necrosis; val_dice_all averages it over all cases with this rule."
)

_CROSS_6 = ndimage.generate_binary_structure(3, 1)  # face neighbours: defines the surface
_FULL_26 = ndimage.generate_binary_structure(3, 3)  # face, edge and corner neighbours: lesions
_PERCENTILE = 95.0


def _mask_pair(pred: np.ndarray, ref: np.ndarray, *, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate two masks and return them as bool arrays (integers: non-zero is foreground)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got pred {pred.shape} and ref {ref.shape}")
    for name, arr in (("pred", pred), ("ref", ref)):
        if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} must be a bool or integer mask (threshold first), got dtype {arr.dtype}")
    if ndim is not None and pred.ndim != ndim:
        raise ValueError(f"pred and ref must be {ndim}D volumes, got shape {pred.shape}")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three finite positive mm values, got {spacing=}")
    return values  # type: ignore[return-value]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap of two masks, with the empty-mask rule.

    Args:
        pred: predicted mask (bool, or integer with non-zero foreground), any shape.
        ref: reference mask of the same shape.

    Returns:
        ``2|P & R| / (|P| + |R|)``; 1.0 when both are empty, 0.0 when exactly one is.

    Raises:
        ValueError: the shapes differ (both are named).
        TypeError: a mask is not bool or integer.
    """
    pred, ref = _mask_pair(pred, ref)
    return dice_from_counts(int(np.logical_and(pred, ref).sum()), int(pred.sum()), int(ref.sum()))


def dice_from_counts(n_both: int, n_pred: int, n_ref: int) -> float:
    """Dice from voxel counts (``|P & R|``, ``|P|``, ``|R|``), with the empty-mask rule: the one formula
    of :func:`dice` and of the counts a validation gathers on the model's device (``engine.evaluate``)."""
    total = n_pred + n_ref
    if total == 0:
        return 1.0
    return 2.0 * n_both / total


def overlap_metrics(n_both: int, n_pred: int, n_ref: int, spacing: Sequence[float]) -> dict[str, float]:
    """The cheap per-case metrics from voxel counts: ``dice``, the volume errors and volumes in ml, and
    ``has_necrosis`` (the keys of ``case_metrics(full=False)`` without ``loc_dice``/``recon_psnr``)."""
    voxel_ml = math.prod(_check_spacing(spacing)) / 1000.0
    pred_ml, ref_ml = n_pred * voxel_ml, n_ref * voxel_ml
    return {"dice": dice_from_counts(n_both, n_pred, n_ref), "volume_error_ml": pred_ml - ref_ml,
            "abs_volume_error_ml": abs(pred_ml - ref_ml), "ref_volume_ml": ref_ml, "pred_volume_ml": pred_ml,
            "has_necrosis": 1.0 if n_ref else 0.0}  # fmt: skip


def _surface(mask: np.ndarray) -> np.ndarray:
    # border_value=0: a voxel on the array edge has a neighbour outside the volume, so it is surface.
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS_6, border_value=0)


def _directed_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """Distance in mm from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    to_nearest = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return to_nearest[from_surface]


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (max of the two directed percentiles).

    Args:
        pred: predicted 3D mask (bool, or integer with non-zero foreground).
        ref: reference 3D mask of the same shape.
        spacing: voxel size in mm along each array axis.

    Returns:
        ``max(p95(d(P->R)), p95(d(R->P)))`` over surface voxels; 0.0 when both masks are empty,
        NaN when exactly one is (see :data:`EMPTY_RULE`).

    Raises:
        ValueError: shapes differ, the masks are not 3D, or the spacing is not positive.
        TypeError: a mask is not bool or integer.
    """
    pred, ref = _mask_pair(pred, ref, ndim=3)
    spacing = _check_spacing(spacing)
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not (pred_any or ref_any):
        return 0.0
    if pred_any != ref_any:
        return math.nan
    # Crop to the bounding box of both masks: every surface voxel lies inside it, so each
    # nearest-surface distance is the same as in the full volume, at a fraction of the cost.
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    pred_surface, ref_surface = _surface(pred[box]), _surface(ref[box])
    directed = (
        _directed_distances(pred_surface, ref_surface, spacing),
        _directed_distances(ref_surface, pred_surface, spacing),
    )
    return float(max(np.percentile(d, _PERCENTILE) for d in directed))


def lesion_detection(pred: np.ndarray, ref: np.ndarray) -> tuple[float, int, int]:
    """Lesion-level detection with 3D connected components (26-connectivity).

    Args:
        pred: predicted 3D mask (bool, or integer with non-zero foreground).
        ref: reference 3D mask of the same shape.

    Returns:
        ``(sensitivity, n_false_positive_components, n_ref_lesions)``: the fraction of reference
        lesions overlapped by at least one predicted voxel (NaN when there is none), and the
        number of predicted components that overlap no reference voxel.

    Raises:
        ValueError: shapes differ or the masks are not 3D.
        TypeError: a mask is not bool or integer.
    """
    pred, ref = _mask_pair(pred, ref, ndim=3)
    ref_labels, n_ref = ndimage.label(ref, structure=_FULL_26)
    pred_labels, n_pred = ndimage.label(pred, structure=_FULL_26)
    n_detected = np.unique(ref_labels[pred & ref]).size  # labels of reference lesions that are hit
    n_true_pred = np.unique(pred_labels[pred & ref]).size  # predicted components that hit something
    sensitivity = n_detected / n_ref if n_ref else math.nan
    return float(sensitivity), int(n_pred - n_true_pred), int(n_ref)


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of a reconstruction against its reference image.

    Args:
        pred: reconstructed image, any shape.
        ref: reference image of the same shape.
        data_range: the peak value range; ``None`` uses ``ref.max() - ref.min()``.

    Returns:
        ``10 log10(data_range**2 / MSE)``; ``inf`` when the images are identical, NaN when
        ``data_range`` is inferred from a constant reference.

    Raises:
        ValueError: shapes differ, the images are empty, or ``data_range`` is not positive.
    """
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got pred {pred.shape} and ref {ref.shape}")
    if ref.size == 0:
        raise ValueError(f"psnr needs non-empty images, got shape {ref.shape}")
    if data_range is None:
        data_range = float(ref.max() - ref.min())
        if data_range == 0:
            return math.nan
    elif not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite positive number, got {data_range=}")
    mse = float(np.mean((pred - ref) ** 2))
    if mse == 0:
        return math.inf
    return float(10.0 * math.log10(data_range**2 / mse))


def _both_or_neither(name_a: str, a: object, name_b: str, b: object) -> bool:
    if (a is None) != (b is None):
        raise ValueError(f"{name_a} and {name_b} must be given together, got only {name_a if b is None else name_b}")
    return a is not None


def case_metrics(
    pred_seg: np.ndarray,
    ref_seg: np.ndarray,
    spacing: Sequence[float],
    *,
    pred_loc: np.ndarray | None = None,
    ref_loc: np.ndarray | None = None,
    recon: np.ndarray | None = None,
    recon_ref: np.ndarray | None = None,
    full: bool = True,
) -> dict[str, float]:
    """All per-case metrics of one validation volume, as plain floats.

    Args:
        pred_seg: predicted necrosis mask, 3D.
        ref_seg: reference necrosis mask of the same shape.
        spacing: voxel size in mm along each array axis.
        pred_loc: predicted localisation mask; with ``ref_loc`` adds ``loc_dice``.
        ref_loc: reference localisation mask.
        recon: reconstructed image; with ``recon_ref`` adds ``recon_psnr``.
        recon_ref: reference (normalised) image.
        full: with ``False``, only the cheap metrics (overlap and volumes): no ``hd95_mm`` and no
            lesion metrics, which need distance transforms and connected components.

    Returns:
        ``dice, hd95_mm, volume_error_ml, abs_volume_error_ml, ref_volume_ml, pred_volume_ml,
        lesion_sensitivity, lesion_fp, n_ref_lesions, has_necrosis`` and, when given,
        ``loc_dice`` and ``recon_psnr``. NaN follows :data:`EMPTY_RULE`.

    Raises:
        ValueError: shapes differ, bad spacing, or only one of a pair of optional inputs given.
    """
    pred, ref = _mask_pair(pred_seg, ref_seg, ndim=3)
    spacing = _check_spacing(spacing)
    out = overlap_metrics(int(np.logical_and(pred, ref).sum()), int(pred.sum()), int(ref.sum()), spacing)
    if full:
        sensitivity, n_fp, n_ref = lesion_detection(pred, ref)
        out.update(hd95_mm=hd95_mm(pred, ref, spacing), lesion_sensitivity=sensitivity, lesion_fp=float(n_fp),
                   n_ref_lesions=float(n_ref))  # fmt: skip
    if _both_or_neither("pred_loc", pred_loc, "ref_loc", ref_loc):
        out["loc_dice"] = dice(pred_loc, ref_loc)  # type: ignore[arg-type]
    if _both_or_neither("recon", recon, "recon_ref", recon_ref):
        out["recon_psnr"] = psnr(recon, recon_ref)  # type: ignore[arg-type]
    return {key: float(value) for key, value in out.items()}


CALIBRATION_BINS = 10


def calibration_counts(prob: np.ndarray, ref: np.ndarray, region: np.ndarray | None = None) -> dict[str, list[float]]:
    """Per probability bin (``CALIBRATION_BINS`` equal bins of [0, 1]) the voxel count, the count with
    reference necrosis and the sum of the predicted probabilities, over ``region`` (default: all voxels).

    Summed over cases, ``positive / count`` against ``prob_sum / count`` per bin is a reliability diagram,
    and ``sum(|prob_sum - positive|) / sum(count)`` the expected calibration error (ECE).
    """
    prob, ref = np.asarray(prob, dtype=np.float64), np.asarray(ref, dtype=bool)
    if prob.shape != ref.shape:
        raise ValueError(f"prob and ref must have the same shape, got {prob.shape} and {ref.shape}")
    if region is not None:
        prob, ref = prob[region], ref[region]
    index = np.clip((prob * CALIBRATION_BINS).astype(np.int64), 0, CALIBRATION_BINS - 1).ravel()
    count = np.bincount(index, minlength=CALIBRATION_BINS)
    positive = np.bincount(index, weights=ref.ravel().astype(np.float64), minlength=CALIBRATION_BINS)
    prob_sum = np.bincount(index, weights=prob.ravel(), minlength=CALIBRATION_BINS)
    return {"count": count.astype(float).tolist(), "positive": positive.tolist(), "prob_sum": prob_sum.tolist()}


def _mean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else math.nan


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Trial-level summary of :func:`case_metrics` results.

    Args:
        per_case: one mapping per validation case, as returned by :func:`case_metrics`.

    Returns:
        ``val_dice`` (mean Dice over cases with necrosis in the reference: the tuning metric;
        NaN if there is none), ``val_dice_all`` (mean Dice over all cases, empty rule included),
        ``n_cases``, ``n_cases_necrosis``, ``n_hd95_undefined`` (when the cases have ``hd95_mm``:
        a quick validation, ``case_metrics(full=False)``, has none), and the NaN-ignoring mean of
        every other per-case metric under its own name (``hd95_mm`` over defined cases,
        ``lesion_sensitivity`` over cases with lesions, ``lesion_fp`` per case, and ``loc_dice``
        / ``recon_psnr`` over the cases that have them).

    Raises:
        ValueError: ``per_case`` is empty, a case lacks ``dice`` or ``has_necrosis``, or only some
            cases have ``hd95_mm``.
    """
    if not per_case:
        raise ValueError("summarize needs at least one case, got an empty per_case")
    required = ("dice", "has_necrosis")
    for i, case in enumerate(per_case):
        missing = [key for key in required if key not in case]
        if missing:
            raise ValueError(f"per_case[{i}] lacks {missing}; expected the keys of case_metrics()")
    necrotic = [case["dice"] for case in per_case if case["has_necrosis"] > 0]
    out = {
        "val_dice": _mean(necrotic),
        "val_dice_all": _mean([case["dice"] for case in per_case]),
        "n_cases": float(len(per_case)),
        "n_cases_necrosis": float(len(necrotic)),
    }
    with_hd95 = sum("hd95_mm" in case for case in per_case)
    if with_hd95 == len(per_case):
        out["n_hd95_undefined"] = float(sum(math.isnan(case["hd95_mm"]) for case in per_case))
    elif with_hd95:
        raise ValueError(f"{with_hd95} of {len(per_case)} cases have hd95_mm: full and quick metrics mixed")
    keys = dict.fromkeys(key for case in per_case for key in case)  # first-seen order
    for key in keys:
        if key not in ("dice", "has_necrosis"):
            out[key] = _mean([float(case[key]) for case in per_case if key in case])
    return out
