"""Typed configuration of one training run, and its conversion from Ray's flat config dicts.

A run is described by four small dataclasses (model, data, optimisation, run-time). Ray Tune and
search-space files speak flat dicts such as ``{"arm": "seg+loc", "lr": 3e-4, "slice_size": 128}``;
:meth:`TrainConfig.from_flat` turns one into typed config at the boundary, rejecting unknown keys with
a suggestion, and :meth:`TrainConfig.to_flat` goes back (what trials record as their resolved config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from avn_study.errors import UsageError, look_up
from avn_study.vocabulary import AMP_MODES, ARMS, GATINGS, NORMS, RECON_KINDS, SKIPS, UPSAMPLES

# Sane maxima, checked before a model is built (a config or bundle asking for more would allocate for minutes
# or fail deep in torch): 512 x 2**3 = 4096 channels at the bottom is ~10x the paper's network.
MAX_DEPTH = 8
MAX_BASE_CHANNELS = 512
MAX_DEEPEST_CHANNELS = 4096
MAX_SLICE_SIZE = 2048


@dataclass(frozen=True)
class ModelConfig:
    arm: str = "seg+recon+loc"  # ablation arm: see avn_study.vocabulary.ARMS (unet, seg+loc, cascade, ...)
    depth: int = 4  # number of down-samplings; slice size must be divisible by 2**depth
    base_channels: int = 16  # channels of the first level, doubled per level
    norm: str = "batch"  # batch | instance | group | none
    upsample: str = "transpose"  # transpose | bilinear
    gating: str = "multiply"  # multiply | residual | none (multitask arms with loc)
    gating_alpha: float = 0.5  # residual gating: p_seg * (a + (1 - a) * p_loc)
    recon_skips: str = "none"  # none | deepest | all: skips into the reconstruction decoder
    loc_skips: str = "all"  # all | deepest | none: skips into the localisation decoder
    aux_channels_factor: float = 0.5  # width of the recon/loc decoders relative to the seg decoder
    in_channels: int = 0  # input channels (MRI sequences); 0 = as many as the cohort has (resolved at training)

    def __post_init__(self) -> None:
        look_up(self.arm, ARMS, what="arm")
        for name, options in (("norm", NORMS), ("upsample", UPSAMPLES), ("gating", GATINGS),
                              ("recon_skips", SKIPS), ("loc_skips", SKIPS)):  # fmt: skip
            look_up(getattr(self, name), options, what=name)
        if not 0.0 <= self.gating_alpha <= 1.0:
            raise ValueError(f"gating_alpha must be in [0, 1], got {self.gating_alpha=}")
        if not 0.0 < self.aux_channels_factor <= 4.0:
            raise ValueError(f"aux_channels_factor must be in (0, 4], got {self.aux_channels_factor=}")
        if not 0 <= self.in_channels <= 8:
            raise ValueError(f"in_channels must be in [0, 8] (0: the cohort's), got in_channels={self.in_channels}")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth must be in [1, {MAX_DEPTH}], got depth={self.depth}")
        if not 1 <= self.base_channels <= MAX_BASE_CHANNELS:
            raise ValueError(
                f"base_channels must be in [1, {MAX_BASE_CHANNELS}], got base_channels={self.base_channels}"
            )
        deepest = self.base_channels * 2**self.depth
        if deepest > MAX_DEEPEST_CHANNELS:
            raise ValueError(
                f"base_channels * 2**depth = {deepest} channels at the deepest level; at most {MAX_DEEPEST_CHANNELS} "
                f"(got base_channels={self.base_channels}, depth={self.depth})"
            )


@dataclass(frozen=True)
class DataConfig:
    fold: int = 0  # validation fold of the frozen patient-level split
    n_folds: int = 5  # folds of the split (must match an existing splits.json)
    split_seed: int = 0  # seed of the split when it is first made
    slice_size: int = 128  # in-plane crop/pad size in pixels
    inplane_spacing_mm: float = 2.0  # cached in-plane spacing (part of the cache key)
    loc_margin_mm: float = 10.0  # localisation target: femoral head dilated by this margin
    empty_slice_fraction: float = 0.25  # share of slices without femoral head used per epoch
    necrosis_oversample: int = 2  # slices with necrosis appear this many times per epoch
    augment: bool = True  # flip / rotate / zoom / intensity jitter on training batches
    inner_fold: int = -1  # nested CV: validate on this inner fold of `fold`'s training patients (-1: off)
    n_inner_folds: int = 3  # nested CV: inner folds the outer fold's training patients are split into
    unlabelled_ratio: float = 0.5  # imagesUnlabelled/ slices per labelled slice each epoch (recon arms; 0: none)

    def __post_init__(self) -> None:
        if not 8 <= self.slice_size <= MAX_SLICE_SIZE:
            raise ValueError(f"slice_size must be in [8, {MAX_SLICE_SIZE}], got slice_size={self.slice_size}")
        if not 0 <= self.fold < self.n_folds:
            raise ValueError(f"fold must be in [0, n_folds - 1] = [0, {self.n_folds - 1}], got fold={self.fold}")
        if not 0.0 <= self.unlabelled_ratio <= 10.0:
            raise ValueError(f"unlabelled_ratio must be in [0, 10], got unlabelled_ratio={self.unlabelled_ratio}")
        if self.n_inner_folds < 2:
            raise ValueError(f"n_inner_folds must be >= 2, got n_inner_folds={self.n_inner_folds}")
        if not -1 <= self.inner_fold < self.n_inner_folds:
            raise ValueError(
                f"inner_fold must be -1 (off) or in [0, n_inner_folds - 1] = [0, {self.n_inner_folds - 1}], "
                f"got inner_fold={self.inner_fold}"
            )


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3  # AdamW learning rate, cosine-annealed to lr * 0.01
    weight_decay: float = 1e-4
    schedule: str = "auto"  # loss schedule (training.schedules); auto: recon_dependent with recon, else constant
    schedule_params: dict[str, Any] = field(default_factory=dict)  # the schedule's own parameters
    seg_dice_weight: float = 0.5  # seg loss = w * soft Dice + (1 - w) * BCE
    recon_kind: str = "l1"  # l1 | mse

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr=}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay=}")
        if not 0.0 <= self.seg_dice_weight <= 1.0:
            raise ValueError(f"seg_dice_weight must be in [0, 1], got {self.seg_dice_weight=}")
        look_up(self.recon_kind, RECON_KINDS, what="recon_kind")
        if not isinstance(self.schedule_params, dict):
            raise ValueError(f"schedule_params must be a mapping, got {self.schedule_params!r}")


RESIDENT_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = 0  # fixes initialisation, data order and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    eval_every: int = 1  # validate every N epochs (and always after the last)
    full_metrics_every: int = 1  # of the validations, every Nth (and the last) adds HD95 and lesion metrics
    threshold: float = 0.5  # probability threshold of the necrosis mask
    resident: str = "auto"  # training slices on the device: auto (on CUDA when they fit) | on | off
    resident_memory_fraction: float = 0.25  # the share of the device's memory resident slices may take

    def __post_init__(self) -> None:
        for name in ("eval_every", "full_metrics_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads=}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold=}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.resident not in RESIDENT_MODES:
            raise ValueError(f"resident must be one of {', '.join(RESIDENT_MODES)}, got {self.resident!r}")
        if not 0.0 < self.resident_memory_fraction <= 1.0:
            raise ValueError(f"resident_memory_fraction must be in (0, 1], got {self.resident_memory_fraction=}")


def default_schedule(arm: str) -> str:
    """``recon_dependent`` (the paper's adaptation) for an arm with a reconstruction branch, else ``constant``."""
    return "recon_dependent" if "recon" in ARMS[arm].branches else "constant"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.optim.schedule == "auto":  # the default follows the arm (a frozen field, set once here)
            object.__setattr__(self.optim, "schedule", default_schedule(self.model.arm))
        from avn_study.training.schedules import create_schedule  # (late: schedules import torch)

        # the schedule's name, its parameters and the branches it needs, checked now rather than in a trial
        create_schedule(self.optim.schedule, ARMS[self.model.arm].branches or ("seg",), **self.optim.schedule_params)
        multiple = 2**self.model.depth
        if self.data.slice_size % multiple:
            raise ValueError(f"slice_size={self.data.slice_size} must be divisible by 2**depth={multiple}")

    @classmethod
    def flat_keys(cls) -> dict[str, str]:
        """Flat key -> section name."""
        return {
            f.name: section.name
            for section in dataclasses.fields(cls)
            for f in dataclasses.fields(section.default_factory())
        }

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a flat dict; unknown keys raise with a did-you-mean suggestion.

        Raises:
            UsageError: an unknown key or a bad value, naming ``source`` and the key.
        """
        keys = cls.flat_keys()
        sections: dict[str, dict[str, Any]] = {name: {} for name in set(keys.values())}
        defaults = cls().to_flat()
        for key, value in flat.items():
            look_up(key, keys, what=f"key in {source}")
            sections[keys[key]][key] = _coerce(key, value, defaults[key], source)
        try:
            return cls(**{f.name: type(f.default_factory())(**sections[f.name]) for f in dataclasses.fields(cls)})
        except (ValueError, UsageError) as err:
            raise UsageError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            flat.update(dataclasses.asdict(getattr(self, section.name)))
        return flat

    def replace(self, **flat: Any) -> TrainConfig:
        return TrainConfig.from_flat({**self.to_flat(), **flat})


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Check a flat value against its default's type (ints are accepted for floats)."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise UsageError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
