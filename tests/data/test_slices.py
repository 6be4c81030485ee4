"""Slice datasets: targets, crop/pad, sampling, augmentation and whole-volume validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from avn_study.data.cache import build_cache
from avn_study.data.preprocess import PreprocessConfig
from avn_study.data.slices import (
    AugmentConfig,
    EpochSampler,
    SliceConfig,
    SliceDataset,
    augment_batch,
    crop_box,
    validation_volumes,
)


@pytest.fixture
def cases(toy_cohort: Path, cache_dir: Path):
    return build_cache(toy_cohort, PreprocessConfig(inplane_spacing_mm=2.0), cache_dir)


@pytest.mark.parametrize(("n", "size"), [(20, 16), (24, 16), (10, 16), (16, 16)])
def test_crop_box_centres(n: int, size: int) -> None:
    src, dst = crop_box((n, n), size)
    assert src[0].stop - src[0].start == dst[0].stop - dst[0].start == min(n, size)
    a = np.arange(n * n).reshape(n, n)
    out = np.full((size, size), -1)
    out[dst] = a[src]
    centre_in, centre_out = (n - 1) / 2, (size - 1) / 2
    kept = np.argwhere(out >= 0).mean(axis=0)
    assert np.allclose(kept, centre_out, atol=0.5) and abs(np.argwhere(a >= 0).mean() - centre_in) < 1e-9


def test_items_and_targets(cases) -> None:
    ds = SliceDataset(cases, SliceConfig(size=32, loc_margin_mm=0.0))
    assert len(ds) == sum(c.image.shape[0] for c in cases)
    item = ds[2]
    assert set(item) == {"image", "seg", "loc", "recon"} and item["image"].shape == (1, 32, 32)
    assert torch.equal(item["recon"], item["image"])
    necrotic = [i for i in range(len(ds)) if ds.has_necrosis[i]]
    batch = ds.__getitems__(necrotic)
    assert batch["seg"].sum() > 0
    assert torch.all(batch["loc"] >= batch["seg"])  # necrosis lies in the femoral head region
    wider = SliceDataset(cases, SliceConfig(size=32, loc_margin_mm=6.0)).__getitems__(necrotic)
    assert wider["loc"].sum() > batch["loc"].sum()
    # the 24 x 20 grid is padded to 32 x 32 with the case's air value, not zero
    first_case = cases[ds.case_index[necrotic[0]]]
    assert batch["image"][0, 0, 0, 0] == pytest.approx(first_case.meta["pad_value"])


def test_sampler_subsamples_and_oversamples_deterministically(cases) -> None:
    cfg = SliceConfig(size=32, empty_slice_fraction=0.5, necrosis_oversample=3)
    ds = SliceDataset(cases, cfg)
    sampler = EpochSampler(ds, seed=4)
    first = sampler.indices()
    n_head, n_empty, n_nec = ds.has_head.sum(), (~ds.has_head).sum(), ds.has_necrosis.sum()
    assert len(first) == n_head + int(np.ceil(0.5 * n_empty)) + 2 * n_nec
    assert np.array_equal(first, EpochSampler(ds, seed=4).indices())
    sampler.set_epoch(1)
    assert not np.array_equal(first, sampler.indices())


def test_dataloader_with_batched_fetch(cases) -> None:
    ds = SliceDataset(cases, SliceConfig(size=32))
    batches = BatchSampler(EpochSampler(ds, seed=0), batch_size=4, drop_last=False)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=lambda b: b)
    first = next(iter(loader))
    assert first["image"].shape == (4, 1, 32, 32)


def test_augmentation_moves_image_and_targets_together(cases) -> None:
    ds = SliceDataset(cases, SliceConfig(size=32))
    batch = ds.__getitems__([i for i in range(len(ds)) if ds.has_necrosis[i]])
    marked = dict(batch)
    marked["image"] = batch["seg"] * 10.0  # an image that equals its mask: a spatial mismatch shows
    out = augment_batch(marked, AugmentConfig(intensity=0.0), torch.Generator().manual_seed(0))
    agree = ((out["recon"] > 5) == (out["seg"] > 0.5)).float().mean()
    assert agree > 0.99
    assert not torch.equal(out["seg"], batch["seg"])
    assert set(out["seg"].unique().tolist()) <= {0.0, 1.0}
    again = augment_batch(marked, AugmentConfig(intensity=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(again["seg"], out["seg"])


def test_identity_augmentation_is_identity(cases) -> None:
    batch = SliceDataset(cases, SliceConfig(size=32)).__getitems__([0, 1, 2])
    cfg = AugmentConfig(flip_prob=0.0, rotate_deg=0.0, scale=0.0, intensity=0.0)
    out = augment_batch(batch, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out["image"], batch["image"], atol=1e-5) and torch.equal(out["loc"], batch["loc"])


def test_flip_is_left_right(cases) -> None:
    batch = SliceDataset(cases, SliceConfig(size=32)).__getitems__([0])
    cfg = AugmentConfig(flip_prob=1.0, rotate_deg=0.0, scale=0.0, intensity=0.0)
    out = augment_batch(batch, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out["image"], batch["image"].flip(-2), atol=1e-5)


def test_validation_volumes_paste_back_exactly(cases) -> None:
    cfg = SliceConfig(size=16)  # smaller than the cached grid: a real crop
    for volume in validation_volumes(cases, cfg):
        assert volume.image.shape == (volume.case.image.shape[0], 1, 16, 16)
        full = volume.paste(volume.image[:, 0].numpy(), fill=np.nan)
        kept = ~np.isnan(full)
        assert np.allclose(full[kept], np.asarray(volume.case.image)[kept])
        assert kept.sum() == volume.case.image.shape[0] * 16 * 16


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"size": 4}, "size must be >= 8"),
        ({"empty_slice_fraction": 2.0}, "empty_slice_fraction"),
        ({"necrosis_oversample": 0}, "necrosis_oversample"),
        ({"loc_margin_mm": -1}, "loc_margin_mm"),
    ],
)
def test_bad_slice_config(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SliceConfig(**kwargs)
