"""Metrics the way clinicians grade AVN: per hip, necrotic fraction of the head, stricter lesion hits.

All functions take 3D masks in RAS order ``(R, A, S)`` (axis 0 runs from the patient's left to their
right) with the voxel ``spacing`` in mm per axis, as :func:`avn_study.data.nifti.load_ras` gives them.

Definitions (documented in the README's "Evaluating a bundle" section):

- **Hips.** A scan holds two hips; they are split at a sagittal plane ``R = midline``. The midline is
  the midpoint of the centroids of the two largest 3D components of the reference femoral head
  region (``midline_from = "reference heads"``), else of the predicted localisation region
  (``"predicted heads"``), else the middle of the R axis (``"grid centre"``). Voxels with
  ``R >= midline`` are the **right** hip (RAS: R grows toward the patient's right).
- **Necrotic fraction** of a hip: necrosis volume / femoral head volume (the head region includes
  the necrosis). The predicted fraction divides the *predicted* necrosis by the *reference* head
  volume: our models do not segment the head itself (localisation adds a margin), and the clinical
  question is the extent of necrosis within a head that is easy to outline. NaN without a
  reference head in that hip. **Bins** follow the 15 % / 30 % cut-offs of ARCO/Steinberg staging:
  0 (< 15 %), 1 (15-30 %), 2 (>= 30 %).
- **Hip-level detection**: a hip is *positive* in the reference when it has any necrosis voxel,
  and *predicted positive* when it has predicted necrosis of at least ``min_volume_ml`` (and any).
- **Lesion detection with minimum overlap**: reference and predicted lesions are 3D components
  (26-connectivity); a reference lesion is detected when some predicted component has
  IoU >= ``min_iou`` (default 0.1) with it; a predicted component whose best IoU with every reference
  lesion is below ``min_iou`` is a false positive. (Training's ``lesion_sensitivity`` counts a
  one-voxel overlap as a hit; this one does not.)
- **Surface Dice** at tolerance ``tau`` mm (Nikolov et al. 2021): the share of surface voxels of
  both masks that lie within ``tau`` of the other mask's surface. Surfaces are voxel surfaces (as
  for HD95), not meshes, so values differ slightly from DeepMind's ``surface-distance`` package.
  1.0 when both masks are empty, 0.0 when exactly one is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from avn_study.metrics.case import _FULL_26, _check_spacing, _directed_distances, _mask_pair, _surface, dice

FRACTION_BINS = (0.15, 0.30)  # ARCO/Steinberg necrotic-extent cut-offs
HIPS = ("right", "left")


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tau_mm: float = 2.0) -> float:
    """Normalised surface Dice at tolerance ``tau_mm`` (see the module docstring)."""
    pred, ref = _mask_pair(pred, ref, ndim=3)
    spacing = _check_spacing(spacing)
    if not tau_mm >= 0:
        raise ValueError(f"tau_mm must be >= 0, got {tau_mm=}")
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not (pred_any or ref_any):
        return 1.0
    if pred_any != ref_any:
        return 0.0
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    ps, rs = _surface(pred[box]), _surface(ref[box])
    p_to_r, r_to_p = _directed_distances(ps, rs, spacing), _directed_distances(rs, ps, spacing)
    return float(((p_to_r <= tau_mm).sum() + (r_to_p <= tau_mm).sum()) / (p_to_r.size + r_to_p.size))


def lesion_detection_iou(pred: np.ndarray, ref: np.ndarray, min_iou: float = 0.1) -> tuple[float, int, int]:
    """``(sensitivity, n_false_positive_components, n_ref_lesions)`` with a hit needing IoU >= ``min_iou``.

    Sensitivity is NaN when the reference has no lesion.
    """
    pred, ref = _mask_pair(pred, ref, ndim=3)
    if not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou=}")
    ref_labels, n_ref = ndimage.label(ref, structure=_FULL_26)
    pred_labels, n_pred = ndimage.label(pred, structure=_FULL_26)
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    both = ref & pred
    pairs, counts = np.unique(np.stack([ref_labels[both], pred_labels[both]]), axis=1, return_counts=True)
    best_ref, best_pred = np.zeros(n_ref + 1), np.zeros(n_pred + 1)
    for (r, p), inter in zip(pairs.T, counts, strict=True):
        iou = inter / (ref_sizes[r] + pred_sizes[p] - inter)
        best_ref[r], best_pred[p] = max(best_ref[r], iou), max(best_pred[p], iou)
    detected = int((best_ref[1:] >= min_iou).sum())
    false_positive = int((best_pred[1:] < min_iou).sum())
    return (detected / n_ref if n_ref else math.nan), false_positive, int(n_ref)


def fraction_bin(fraction: float) -> float:
    """0 (< 15 %), 1 (15-30 %), 2 (>= 30 %); NaN for NaN."""
    if math.isnan(fraction):
        return math.nan
    return float(sum(fraction >= cut for cut in FRACTION_BINS))


def _two_centroids(mask: np.ndarray) -> tuple[float, float] | None:
    labels, n = ndimage.label(mask, structure=_FULL_26)
    if n < 2:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = np.argsort(sizes)[::-1][:2] + 1
    centres = ndimage.center_of_mass(mask, labels, biggest)
    return float(centres[0][0]), float(centres[1][0])


def hip_midline(shape: tuple[int, ...], ref_head: np.ndarray | None, pred_loc: np.ndarray | None) -> tuple[float, str]:
    """``(midline R index, where it came from)`` for a volume of ``shape`` (see the module docstring)."""
    for mask, source in ((ref_head, "reference heads"), (pred_loc, "predicted heads")):
        if mask is not None and mask.any():
            centres = _two_centroids(mask)
            if centres is not None:
                return sum(centres) / 2.0, source
    return (shape[0] - 1) / 2.0, "grid centre"


def hip_rows(
    pred_necrosis: np.ndarray,
    ref_necrosis: np.ndarray,
    ref_head: np.ndarray,
    spacing: Sequence[float],
    *,
    has_head_labels: bool,
    pred_loc: np.ndarray | None = None,
    min_volume_ml: float = 0.1,
    min_iou: float = 0.1,
    tau_mm: float = 2.0,
) -> list[dict[str, float | str]]:
    """One row per hip (right, left) of one scan: volumes, necrotic fraction, detection, overlap."""
    pred, ref = _mask_pair(pred_necrosis, ref_necrosis, ndim=3)
    spacing = _check_spacing(spacing)
    voxel_ml = math.prod(spacing) / 1000.0
    midline, source = hip_midline(pred.shape, ref_head if has_head_labels else None, pred_loc)
    right = np.zeros(pred.shape, bool)
    right[math.ceil(midline) :] = True
    rows = []
    for hip, side in zip(HIPS, (right, ~right), strict=True):
        p, r = pred & side, ref & side
        ref_ml, pred_ml = int(r.sum()) * voxel_ml, int(p.sum()) * voxel_ml
        head_ml = int((ref_head & side).sum()) * voxel_ml if has_head_labels else math.nan
        ref_fraction = ref_ml / head_ml if head_ml > 0 else math.nan
        pred_fraction = pred_ml / head_ml if head_ml > 0 else math.nan
        sensitivity, n_fp, n_ref = lesion_detection_iou(p, r, min_iou)
        rows.append({
            "hip": hip,
            "midline_from": source,
            "ref_necrosis_ml": ref_ml,
            "pred_necrosis_ml": pred_ml,
            "ref_head_ml": head_ml,
            "ref_fraction": ref_fraction,
            "pred_fraction": pred_fraction,
            "fraction_abs_error": abs(pred_fraction - ref_fraction),
            "ref_bin": fraction_bin(ref_fraction),
            "pred_bin": fraction_bin(pred_fraction),
            "ref_positive": float(ref_ml > 0),
            "pred_positive": float(pred_ml > 0 and pred_ml >= min_volume_ml),
            "dice": dice(p, r),
            "surface_dice": surface_dice(p, r, spacing, tau_mm),
            "lesion_sensitivity_iou": sensitivity,
            "lesion_fp_iou": float(n_fp),
            "n_ref_lesions": float(n_ref),
        })  # fmt: skip
    return rows


def hip_summary(rows: Sequence[dict]) -> dict[str, float]:
    """Hip-level sensitivity/specificity, bin agreement, fraction MAE, mean surface Dice (NaN-safe)."""

    def mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return float(np.mean(kept)) if kept else math.nan

    positive = [r for r in rows if r["ref_positive"] == 1.0]
    negative = [r for r in rows if r["ref_positive"] == 0.0]
    binned = [r for r in rows if not math.isnan(r["ref_bin"])]
    return {
        "n_hips": float(len(rows)),
        "n_hips_positive": float(len(positive)),
        "hip_sensitivity": mean([r["pred_positive"] for r in positive]),
        "hip_specificity": mean([1.0 - r["pred_positive"] for r in negative]),
        "fraction_mae": mean([r["fraction_abs_error"] for r in rows]),
        "bin_agreement": mean([float(r["ref_bin"] == r["pred_bin"]) for r in binned]),
        "surface_dice": mean([r["surface_dice"] for r in positive]),
        "lesion_sensitivity_iou": mean([r["lesion_sensitivity_iou"] for r in rows]),
        "lesion_fp_iou": mean([r["lesion_fp_iou"] for r in rows]),
    }
