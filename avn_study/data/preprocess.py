"""Per-case preprocessing: in-plane resampling, robust intensity normalisation, head distance map.

All arrays here are in RAS order ``(R, A, S)``; coronal slices are planes of constant A (axis 1). Only
the in-plane axes (R and S) are resampled: the thick coronal slices stay as acquired, so every slice a
model sees is one slice the scanner measured, and writing predictions back only needs the in-plane
inverse (:func:`resample_inplane_to`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from avn_study.data.labels import LABELS


@dataclass(frozen=True)
class PreprocessConfig:
    """How cached volumes are made; every field is part of the cache key."""

    # In-plane (R/L and S/I) spacing of the cached grid in mm; None keeps each case's native grid.
    # 2 mm x 128 px = 256 mm, which holds both hips of an adult pelvis.
    inplane_spacing_mm: float | None = 2.0
    # Intensities are clipped to these percentiles of the case before z-scoring (robust to hot voxels).
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.inplane_spacing_mm is not None and not self.inplane_spacing_mm > 0:
            raise ValueError(f"inplane_spacing_mm must be > 0 or None, got {self.inplane_spacing_mm=}")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {self.clip_percentiles=}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def normalise(image: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, float]:
    """Clip to the case's intensity percentiles, then z-score with the clipped mean and SD.

    Returns:
        The float32 normalised image and the normalised value of the lower clip bound (the value of
        air, used to pad slices).
    """
    lo, hi = np.percentile(image, percentiles)
    clipped = np.clip(image, lo, hi, dtype=np.float32)
    mean, std = float(clipped.mean()), float(clipped.std())
    std = std if std > 0 else 1.0
    out = (clipped - np.float32(mean)) / np.float32(std)
    return out.astype(np.float32, copy=False), (float(lo) - mean) / std


def inplane_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target: float | None
) -> tuple[int, int, int]:
    if target is None:
        return shape
    nx, ny, nz = shape
    return (max(1, round(nx * spacing[0] / target)), ny, max(1, round(nz * spacing[2] / target)))


def resample_inplane_to(volume: np.ndarray, shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resample the R and S axes of ``volume`` to ``shape`` so that the field of view is unchanged.

    Voxel edges are aligned (``grid_mode=True``): new voxel ``i`` covers the same mm as before, which
    makes this the exact inverse mapping of itself with the shapes swapped.
    """
    assert volume.shape[1] == shape[1], (volume.shape, shape)
    if tuple(volume.shape) == tuple(shape):
        return volume
    zoom = (shape[0] / volume.shape[0], 1.0, shape[2] / volume.shape[2])
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def resampled_affine(ras_affine: np.ndarray, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    """The affine of a grid resampled with :func:`resample_inplane_to` (same field of view)."""
    scale = np.array(old_shape[:3], float) / np.array(new_shape[:3], float)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * scale - 0.5  # centre of new voxel 0 in old voxel coordinates
    return ras_affine @ index_map


def resample_labels(label: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a 0/1/2 label map by interpolating each nested region (head incl. necrosis, necrosis).

    Linear interpolation of the indicator then a 0.5 threshold is smoother than nearest neighbour and
    keeps necrosis inside the femoral head by construction.
    """
    if tuple(label.shape) == tuple(shape):
        return label
    head = resample_inplane_to((label >= LABELS["femoral_head"]).astype(np.float32), shape) >= 0.5
    necrosis = resample_inplane_to((label == LABELS["necrosis"]).astype(np.float32), shape) >= 0.5
    out = head.astype(np.uint8)
    out[necrosis & head] = LABELS["necrosis"]
    return out


def head_distance_mm(label: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from each voxel to the femoral head region (0 inside), float16.

    The localisation target for any margin is then one comparison, ``dist <= margin``, so a sweep over
    margins needs no new preprocessing. Without a labelled head every distance is +inf.
    """
    head = label >= LABELS["femoral_head"]
    if not head.any():
        return np.full(label.shape, np.inf, dtype=np.float16)
    dist = ndimage.distance_transform_edt(~head, sampling=spacing)
    return np.minimum(dist, 6e4).astype(np.float16)
