"""Where and how a model runs: the device, bf16 autocast, batches moved there, and the arm's model built.

Training, validation, the bundle and the benchmarks share these, so a model runs the same way on the same
device whichever of them drives it.
"""

from __future__ import annotations

import contextlib

import torch

from avn_study.config import TrainConfig
from avn_study.errors import AvnError, UsageError
from avn_study.models import model_for_arm
from avn_study.vocabulary import ARMS, MODEL_OPTIONS


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
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


def move_batch(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device``, channels-last when asked (what CUDA convolutions prefer)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(device, non_blocking=True).contiguous(memory_format=fmt) for k, v in batch.items()}


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; no autocast at all when ``dtype`` is None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
