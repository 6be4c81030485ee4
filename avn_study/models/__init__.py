"""The models: ``create_model("unet")``, ``model_for_arm("seg+loc", base_channels=16)`` (the registry itself is
:mod:`avn_study.models.registry`; importing this package registers every model).

Every model's ``forward(x)`` takes ``(B, C, H, W)`` slices and returns a dict whose ``"seg"`` entry
is the final necrosis prediction as ``(B, 1, H, W)`` logits.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from avn_study.errors import UsageError, look_up
from avn_study.models.registry import create_model, list_models, register_model
from avn_study.vocabulary import ARMS, MODEL_OPTIONS

# Ablation arm -> (model name, branches); the arms and what each asks live in avn_study.vocabulary.
# Options that exist only for some branches: dropped for an arm without the branch.
_BRANCH_ONLY = {"recon": ("recon_skips",), "loc": ("loc_skips", "gating", "gating_alpha")}


def model_for_arm(arm: str, **cfg: Any) -> nn.Module:
    """Build the model of an ablation arm (see :data:`avn_study.vocabulary.ARMS`).

    Options that the arm's model does not have (e.g. ``gating`` for ``seg``, ``recon_skips`` for
    ``seg+loc``, any multitask option for ``unet``) are dropped, so a sweep passes one config to
    every arm; misspelt options still fail in the constructor.

    Raises:
        UsageError: unknown ``arm`` (with a suggestion), or ``branches`` given (the arm fixes them).
    """
    spec = ARMS[look_up(arm, ARMS, what="arm")]
    model, branches = spec.model, spec.branches
    if "branches" in cfg:
        raise UsageError(f"model_for_arm: the arm {arm!r} fixes the branches; do not pass branches=")
    drop = {k for k, models in MODEL_OPTIONS.items() if model not in models}
    if model == "multitask":
        for branch, options in _BRANCH_ONLY.items():
            if branch not in branches:
                drop.update(options)
    kwargs = {k: v for k, v in cfg.items() if k not in drop}
    return create_model(model, branches=branches, **kwargs)


def n_parameters(model: nn.Module) -> int:
    """The number of trainable values of a model (what the report and ``bench train`` print per row)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_width(arm: str, target: int, **cfg: Any) -> int:
    """The ``base_channels`` that brings ``arm``'s parameter count closest to ``target`` (other options
    as in ``cfg``): for a control row "the U-Net at the full model's size".

    Example: ``matched_width("unet", n_parameters(model_for_arm("seg+recon+loc", base_channels=32)))``.
    """
    from avn_study.config import MAX_BASE_CHANNELS

    best, best_gap = 1, math.inf
    for width in range(1, MAX_BASE_CHANNELS + 1):
        count = n_parameters(model_for_arm(arm, **{**cfg, "base_channels": width}))
        if abs(count - target) < best_gap:
            best, best_gap = width, abs(count - target)
        if count > target:  # counts grow with the width: nothing further is closer
            break
    return best


from avn_study.models.multitask import MultitaskNet, gate_logits  # noqa: E402  (registers "multitask")
from avn_study.models.unet import CascadeNet, UNet  # noqa: E402  (registers "unet", "cascade")

__all__ = [
    "CascadeNet",
    "MultitaskNet",
    "UNet",
    "create_model",
    "gate_logits",
    "list_models",
    "matched_width",
    "model_for_arm",
    "n_parameters",
    "register_model",
]
