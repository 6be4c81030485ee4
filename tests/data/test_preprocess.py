"""Normalisation, in-plane resampling geometry and the head distance map."""

from __future__ import annotations

import numpy as np
import pytest

from avn_study.data.preprocess import (
    PreprocessConfig,
    head_distance_mm,
    inplane_shape,
    normalise,
    resample_inplane_to,
    resample_labels,
    resampled_affine,
)


def test_normalise_is_robust_z_score() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (20, 5, 20)).astype(np.float32)
    image[0, 0, 0] = 1e6  # a hot voxel must not dominate the scale
    out, pad = normalise(image, (0.5, 99.5))
    assert out.dtype == np.float32
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3
    assert out.max() < 4
    assert pad == pytest.approx(out.min(), abs=1e-5)


def test_resampling_keeps_world_position_of_a_structure() -> None:
    """A sphere's centre in mm is the same before and after resampling 1 mm -> 2.5 mm."""
    shape, spacing = (100, 4, 80), (1.0, 3.5, 1.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-30.0, 0.0, 12.0]
    x, _, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    volume = (((x - 61.5) ** 2 + (z - 30.0) ** 2) <= 15**2).astype(np.float32)
    new_shape = inplane_shape(shape, spacing, 2.5)
    assert new_shape == (40, 4, 32)
    out = resample_inplane_to(volume, new_shape)
    new_affine = resampled_affine(affine, shape, new_shape)
    assert np.allclose(np.linalg.norm(new_affine[:3, :3], axis=0), (2.5, 3.5, 2.5))

    def centre_mm(vol: np.ndarray, aff: np.ndarray) -> np.ndarray:
        idx = np.argwhere(vol[:, 0] > 0.5)
        ijk = np.array([idx[:, 0].mean(), 0, idx[:, 1].mean(), 1.0])
        return (aff @ ijk)[:3]

    assert np.allclose(centre_mm(volume, affine), centre_mm(out, new_affine), atol=0.3)
    back = resample_inplane_to(out, shape)
    assert back.shape == shape and np.mean((back > 0.5) == (volume > 0.5)) > 0.98


def test_resampled_labels_keep_necrosis_inside_head() -> None:
    label = np.zeros((40, 3, 40), np.uint8)
    label[10:30, :, 10:30] = 1
    label[12:16, :, 12:17] = 2
    out = resample_labels(label, (17, 3, 13))
    assert set(np.unique(out)) == {0, 1, 2}
    head_fraction = (out >= 1).mean() / (label >= 1).mean()
    assert 0.85 < head_fraction < 1.15


def test_head_distance_map() -> None:
    label = np.zeros((30, 3, 30), np.uint8)
    label[10:20, :, 10:20] = 1
    dist = head_distance_mm(label, (2.0, 4.0, 1.0))
    assert dist.dtype == np.float16
    assert dist[15, 1, 15] == 0 and dist[9, 1, 15] == pytest.approx(2.0) and dist[15, 1, 22] == pytest.approx(3.0)
    assert np.isinf(head_distance_mm(np.zeros_like(label), (1, 1, 1))).all()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"inplane_spacing_mm": 0}, "inplane_spacing_mm must be > 0"),
        ({"clip_percentiles": (50, 5)}, "clip_percentiles"),
    ],
)
def test_bad_preprocess_config(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PreprocessConfig(**kwargs)
