"""2D coronal slice datasets over cached volumes, and batch augmentation in torch.

A training item is one coronal slice (a plane of constant A/P), centre-cropped or padded to
``size x size`` pixels around the middle of the cached grid. Hip protocols centre the field of view
on the hips and the cached grid keeps that field of view, so the crop box depends only on the grid:
training, validation and prediction crop identically, without needing labels.

Targets per slice: ``seg`` = necrosis (label 2); ``loc`` = femoral head region dilated by
``loc_margin_mm`` in 3D (from the cached distance map); ``recon`` = the normalised image itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from avn_study.data.cache import CachedCase
from avn_study.data.labels import LABELS


@dataclass(frozen=True)
class SliceConfig:
    size: int = 128  # in-plane output size in pixels (crop/pad around the grid centre)
    loc_margin_mm: float = 10.0  # localisation target: femoral head dilated by this margin (3D, mm)
    empty_slice_fraction: float = 0.25  # share of slices without femoral head kept per epoch
    necrosis_oversample: int = 1  # each slice with necrosis appears this many times per epoch

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size=}")
        if self.loc_margin_mm < 0:
            raise ValueError(f"loc_margin_mm must be >= 0, got {self.loc_margin_mm=}")
        if not 0.0 <= self.empty_slice_fraction <= 1.0:
            raise ValueError(f"empty_slice_fraction must be in [0, 1], got {self.empty_slice_fraction=}")
        if self.necrosis_oversample < 1:
            raise ValueError(f"necrosis_oversample must be >= 1, got {self.necrosis_oversample=}")


def crop_box(shape: tuple[int, int], size: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Source and destination slices that centre-crop/pad a ``shape`` plane to ``size x size``."""
    src, dst = [], []
    for n in shape:
        if n >= size:
            start = (n - size) // 2
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            start = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    return (src[0], src[1]), (dst[0], dst[1])


def outside_crop(case: CachedCase, size: int) -> tuple[float, float]:
    """Shares of the case's femoral head region and of its necrosis that lie outside the slice crop
    (nothing is ever predicted there: a model sees only the crop)."""
    (src_r, src_s), _ = crop_box(case.image.shape[1:], size)
    label = np.asarray(case.label)
    inside = np.zeros(label.shape[1:], bool)
    inside[src_r, src_s] = True
    shares = []
    for mask in (label >= LABELS["femoral_head"], label == LABELS["necrosis"]):
        total = int(mask.sum())
        shares.append(float((mask & ~inside).sum()) / total if total else 0.0)
    return shares[0], shares[1]


def crop_warning(cases: list[CachedCase], size: int, spacing_mm: float | None) -> str | None:
    """A warning naming the cases whose head or necrosis reaches outside the ``size``-pixel crop, or None."""
    lost = [(c.case_id, *outside_crop(c, size)) for c in cases]
    lost = [row for row in lost if row[1] > 0 or row[2] > 0]
    if not lost:
        return None
    worst = max(lost, key=lambda row: (row[2], row[1]))
    width = f" = {size * spacing_mm:g} mm" if spacing_mm else ""
    return (f"{len(lost)} of {len(cases)} case(s) have femoral head or necrosis outside the {size}-pixel slice "
            f"crop{width} (worst: {worst[0]}, {100 * worst[1]:.1f} % of its head region and {100 * worst[2]:.1f} % "
            "of its necrosis); nothing is predicted there, so those voxels count as missed. Raise slice_size or "
            "inplane_spacing_mm, or check that the field of view is centred on the hips")  # fmt: skip


class SliceDataset(Dataset):
    """Every coronal slice of the given cases; use :class:`EpochSampler` for the per-epoch selection.

    ``dataset[i]`` returns a dict of float32 tensors ``image`` and ``recon`` ``(C, S, S)`` (C input
    channels), ``seg`` and ``loc`` ``(1, S, S)``;
    ``dataset.__getitems__(indices)`` (used by DataLoader with a batch sampler) returns the batch
    ``(B, 1, S, S)`` directly, which is what makes the loader cheap.
    """

    def __init__(self, cases: list[CachedCase], config: SliceConfig | None = None) -> None:
        if not cases:
            raise ValueError("SliceDataset needs at least one case")
        self.cases = cases
        self.config = config or SliceConfig()
        self.boxes = [crop_box(c.image.shape[1:], self.config.size) for c in cases]
        self.n_channels = cases[0].n_channels
        mixed = sorted({c.n_channels for c in cases})
        if len(mixed) > 1:
            raise ValueError(f"cases with different channel counts {mixed} cannot be stacked into one dataset")
        self.pad_values = np.array([c.pad_values for c in cases], dtype=np.float32)  # (cases, C)
        n_slices = [c.image.shape[0] for c in cases]
        self.case_index = np.repeat(np.arange(len(cases)), n_slices)
        self.slice_index = np.concatenate([np.arange(n) for n in n_slices])

        def flags(key: str) -> np.ndarray:  # (unlabelled scans have none: all False)
            return np.concatenate([c.meta.get(key, [False] * n) for c, n in zip(cases, n_slices, strict=True)])

        self.has_head = flags("slice_has_head").astype(bool)
        self.has_necrosis = flags("slice_has_necrosis").astype(bool)

    def __len__(self) -> int:
        return len(self.case_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}

    def _images(self, indices: list[int]) -> np.ndarray:
        """The cropped/padded input slices ``(B, C, S, S)`` of ``indices``."""
        size = self.config.size
        image = np.empty((len(indices), self.n_channels, size, size), np.float32)
        for row, i in enumerate(indices):
            c, s = self.case_index[i], self.slice_index[i]
            (src, dst) = self.boxes[c]
            for k, channel in enumerate(self.cases[c].channels):
                image[row, k] = self.pad_values[c, k]
                image[row, k][dst] = channel[s][src]
        return image

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        size, margin = self.config.size, self.config.loc_margin_mm
        b = len(indices)
        image = self._images(indices)
        seg = np.zeros((b, 1, size, size), np.float32)
        loc = np.zeros((b, 1, size, size), np.float32)
        for row, i in enumerate(indices):
            c, s = self.case_index[i], self.slice_index[i]
            case, (src, dst) = self.cases[c], self.boxes[c]
            seg[row, 0][dst] = case.label[s][src] == LABELS["necrosis"]
            loc[row, 0][dst] = case.head_dist[s][src] <= margin
        image_t = torch.from_numpy(image)
        return {"image": image_t, "seg": torch.from_numpy(seg), "loc": torch.from_numpy(loc), "recon": image_t}


class UnlabelledBatches:
    """Slices of unlabelled scans for the reconstruction term: ``{"image", "recon"}`` batches, no targets.

    Each epoch draws ``count`` slices (without replacement, at most all of them) with a generator seeded
    by ``(seed, epoch)``, so a run stays reproducible and resumable.
    """

    def __init__(self, cases: list[CachedCase], config: SliceConfig, batch_size: int, seed: int) -> None:
        self.dataset = SliceDataset(cases, config)
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def epoch(self, epoch: int, count: int) -> list[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch, 0x5EC0])
        chosen = rng.permutation(len(self.dataset))[: min(count, len(self.dataset))].tolist()
        batches = []
        for start in range(0, len(chosen), self.batch_size):
            image = torch.from_numpy(self.dataset._images(chosen[start : start + self.batch_size]))
            batches.append({"image": image, "recon": image})
        return batches


def interleave(labelled, n_labelled: int, unlabelled: list[dict[str, torch.Tensor]]):
    """The ``n_labelled`` labelled batches (read lazily) with the unlabelled ones spread evenly between
    them, the same way every run; without unlabelled batches, the labelled ones untouched."""
    done, m = 0, len(unlabelled)
    for i, batch in enumerate(labelled):
        yield batch
        while done < m and done < (i + 1) * m // max(1, n_labelled):
            yield unlabelled[done]
            done += 1
    yield from unlabelled[done:]


class EpochSampler(Sampler[int]):
    """Deterministic per-epoch slice selection: subsample slices without head, oversample necrosis.

    The selection and its order depend only on ``(seed, epoch)``; call :meth:`set_epoch` each epoch.
    """

    def __init__(self, dataset: SliceDataset, seed: int = 0, shuffle: bool = True) -> None:
        self.dataset, self.seed, self.shuffle, self.epoch = dataset, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        cfg, ds = self.dataset.config, self.dataset
        rng = np.random.default_rng([self.seed, self.epoch])
        with_head = np.flatnonzero(ds.has_head)
        without = np.flatnonzero(~ds.has_head)
        keep = rng.permutation(without)[: math.ceil(cfg.empty_slice_fraction * len(without))]
        extra = np.repeat(np.flatnonzero(ds.has_necrosis), cfg.necrosis_oversample - 1)
        chosen = np.concatenate([with_head, np.sort(keep), extra])
        return rng.permutation(chosen) if self.shuffle else chosen

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(self.indices())


@dataclass(frozen=True)
class AugmentConfig:
    flip_prob: float = 0.5  # left-right flip (the hips are near-symmetric)
    rotate_deg: float = 10.0  # uniform in [-rotate_deg, rotate_deg]
    scale: float = 0.1  # isotropic zoom uniform in [1 - scale, 1 + scale]
    intensity: float = 0.1  # image * (1 + U(-i, i)) + U(-i, i) (z-scored units)

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob=}")
        for name in ("rotate_deg", "scale", "intensity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1:
            raise ValueError(f"scale must be < 1, got {self.scale=}")


def augment_batch(
    batch: dict[str, torch.Tensor], config: AugmentConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Apply one random flip/rotation/zoom per sample identically to image and targets, then jitter
    the image intensity. Runs on the batch's device; masks use nearest sampling so they stay binary.

    The reconstruction target is the augmented image before intensity jitter, so the network learns
    to reconstruct the anatomy, not the random gain.
    """
    image = batch["image"]  # (B, 1, S, S)
    b, device = image.shape[0], image.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(device)

    angle = torch.deg2rad(uniform(-config.rotate_deg, config.rotate_deg))
    zoom = uniform(1 - config.scale, 1 + config.scale)
    flip = torch.where(uniform(0, 1) < config.flip_prob, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    # affine_grid's x is the last axis (S/I), y is R/L: negating the y row flips left-right
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin * flip, cos * flip, zero], 1)], 1)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = {k: F.grid_sample(batch[k], grid, mode="nearest", align_corners=False) for k in ("seg", "loc") if k in batch}
    gain, shift = uniform(-config.intensity, config.intensity), uniform(-config.intensity, config.intensity)
    out["image"] = warped * (1 + gain.view(b, 1, 1, 1)) + shift.view(b, 1, 1, 1)
    out["recon"] = warped
    return out


@dataclass(frozen=True)
class ValidationVolume:
    """A whole case for 3D evaluation: cropped slices in, full-grid targets to compare against."""

    case: CachedCase
    image: torch.Tensor  # (A, C, S, S) cropped slices
    box: tuple[tuple[slice, slice], tuple[slice, slice]]

    def paste(self, slices: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Cropped predictions ``(A, S, S)`` -> the full cached grid ``(A, R, S)``."""
        src, dst = self.box
        full = np.full(self.case.image.shape, fill, dtype=slices.dtype)
        full[:, src[0], src[1]] = slices[:, dst[0], dst[1]]
        return full


def validation_volumes(cases: list[CachedCase], config: SliceConfig | None = None):
    """Yield one :class:`ValidationVolume` per case, in order (whole volumes, for 3D metrics)."""
    dataset = SliceDataset(cases, config)
    start = 0
    for c, case in enumerate(cases):
        n = case.image.shape[0]
        batch = dataset.__getitems__(list(range(start, start + n)))
        start += n
        yield ValidationVolume(case, batch["image"], dataset.boxes[c])


def make_loader(
    dataset: SliceDataset,
    *,
    batch_size: int = 16,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader that fetches whole batches (``__getitems__``) in the epoch's sampled order.

    ``num_workers=0`` is the default: a batch from the memory-mapped cache costs well under a
    millisecond per slice, far less than a training step, so worker processes only add start-up
    time and memory (``avn-study bench data`` measures both settings). Call
    ``loader.batch_sampler.sampler.set_epoch(epoch)`` every epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size=}")
    sampler = EpochSampler(dataset, seed=seed, shuffle=shuffle)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_identity,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # __getitems__ already returns the collated batch
