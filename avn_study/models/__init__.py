"""Model registry: ``create_model("unet")``, ``model_for_arm("seg+loc", base_channels=16)``.

Every model's ``forward(x)`` takes ``(B, 1, H, W)`` slices and returns a dict whose ``"seg"`` entry
is the final necrosis prediction as ``(B, 1, H, W)`` logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from avn_study.errors import UsageError, look_up

M = TypeVar("M", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Ablation arm -> (model name, branches); branches None: the model has no such argument.
ARMS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "unet": ("unet", None),
    "seg": ("multitask", ("seg",)),
    "seg+recon": ("multitask", ("seg", "recon")),
    "seg+loc": ("multitask", ("seg", "loc")),
    "seg+recon+loc": ("multitask", ("seg", "recon", "loc")),
}
# Options that only some arms have; model_for_arm drops them elsewhere, so one config serves all arms.
_MULTITASK_ONLY = ("aux_channels_factor", "recon_skips", "loc_skips", "gating", "gating_alpha")
_BRANCH_ONLY = {"recon": ("recon_skips",), "loc": ("loc_skips", "gating", "gating_alpha")}


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make the model constructible as ``create_model(name, **cfg)``."""

    def register(cls: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name]!r})")
        _MODELS[name] = cls
        return cls

    return register


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **cfg: Any) -> nn.Module:
    """Build the model registered as ``name`` with keyword arguments ``cfg``.

    Raises:
        UsageError: unknown ``name`` (``did you mean ...?``).
    """
    return _MODELS[look_up(name, _MODELS, what="model")](**cfg)


def model_for_arm(arm: str, **cfg: Any) -> nn.Module:
    """Build the model of an ablation arm (``unet``, ``seg``, ``seg+recon``, ``seg+loc``, ``seg+recon+loc``).

    Options that the arm's model does not have (e.g. ``gating`` for ``seg``, ``recon_skips`` for
    ``seg+loc``, any multitask option for ``unet``) are dropped, so a sweep passes one config to
    every arm; misspelt options still fail in the constructor.

    Raises:
        UsageError: unknown ``arm`` (with a suggestion), or ``branches`` given (the arm fixes them).
    """
    model, branches = ARMS[look_up(arm, ARMS, what="arm")]
    if "branches" in cfg:
        raise UsageError(f"model_for_arm: the arm {arm!r} fixes the branches; do not pass branches=")
    drop = set(_MULTITASK_ONLY) if branches is None else set()
    for branch, options in _BRANCH_ONLY.items():
        if branches is not None and branch not in branches:
            drop.update(options)
    kwargs = {k: v for k, v in cfg.items() if k not in drop}
    if branches is not None:
        kwargs["branches"] = branches
    return create_model(model, **kwargs)


from avn_study.models.multitask import MultitaskNet, gate_logits  # noqa: E402  (registers "multitask")
from avn_study.models.unet import UNet  # noqa: E402  (registers "unet")

__all__ = [
    "ARMS",
    "MultitaskNet",
    "UNet",
    "create_model",
    "gate_logits",
    "list_models",
    "model_for_arm",
    "register_model",
]
