"""Branch losses: soft Dice + BCE for the necrosis (``seg``) and localisation (``loc``) logits, L1 or
MSE for the reconstruction (``recon``).

:func:`branch_losses` returns one *unweighted* scalar per active branch; how they are weighted is the
job of a loss-adaptation schedule (:mod:`avn_study.training.schedules`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from avn_study.errors import look_up
from avn_study.vocabulary import RECON_KINDS


@dataclass(frozen=True)
class LossConfig:
    """How each branch's loss is computed.

    ``dice_smooth`` is added to the numerator and the denominator of the soft Dice, which is computed
    over the whole batch (all pixels of all slices together), not per slice. Most slices contain no
    necrosis; per slice they would give 0/0 (or, smoothed, a loss that only rewards predicting
    nothing), whereas over the batch an empty slice simply adds its false positives to the
    denominator. When the whole batch has an empty target the loss is ~0 only if the prediction is
    ~0 too: ``1 - smooth / (sum(p) + smooth)``.
    """

    seg_dice_weight: float = 0.5  # seg loss = w * soft Dice + (1 - w) * BCE
    dice_smooth: float = 1.0  # added to Dice numerator and denominator (batch-level Dice, see above)
    recon_kind: str = "l1"  # reconstruction loss: "l1" (mean absolute error) | "mse"
    loc_dice_weight: float = 0.5  # loc loss = w * soft Dice + (1 - w) * BCE

    def __post_init__(self) -> None:
        for name in ("seg_dice_weight", "loc_dice_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {name}={value!r}")
        smooth = self.dice_smooth
        if isinstance(smooth, bool) or not isinstance(smooth, int | float) or not 0.0 < smooth < float("inf"):
            raise ValueError(
                "dice_smooth must be a finite number > 0 (it keeps an empty batch from giving "
                f"0/0), got dice_smooth={smooth!r}"
            )
        if not isinstance(self.recon_kind, str):
            raise ValueError(f"recon_kind must be one of {RECON_KINDS}, got recon_kind={self.recon_kind!r}")
        look_up(self.recon_kind, RECON_KINDS, what="recon_kind")


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Batch-level soft Dice loss.

    ``p = sigmoid(logits)``; with sums over every pixel of every slice in the batch,
    ``loss = 1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``.

    Args:
        logits: ``(B, 1, H, W)`` logits.
        target: ``(B, 1, H, W)`` 0/1 target.
        smooth: added to numerator and denominator (> 0).

    Returns:
        A scalar in ``[0, 1)``; ~0 for a perfect prediction, including an empty one of an empty target.
    """
    assert logits.shape == target.shape, f"logits {tuple(logits.shape)} vs target {tuple(target.shape)}"
    p = torch.sigmoid(logits)
    t = target.to(p.dtype)
    intersection = (p * t).sum()
    return 1.0 - (2.0 * intersection + smooth) / (p.sum() + t.sum() + smooth)


def _dice_bce(logits: Tensor, target: Tensor, dice_weight: float, smooth: float) -> Tensor:
    """``w * soft_dice_loss + (1 - w) * mean BCE-with-logits`` (log-sum-exp form, stable for any logit)."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return dice_weight * soft_dice_loss(logits, target, smooth) + (1.0 - dice_weight) * bce


def seg_loss(logits: Tensor, target: Tensor, cfg: LossConfig) -> Tensor:
    """Necrosis loss ``w * Dice + (1 - w) * BCE`` with ``w = cfg.seg_dice_weight``.

    BCE is the pixel mean of ``max(x, 0) - x * t + log(1 + exp(-|x|))`` (``x`` logits, ``t`` target);
    Dice is :func:`soft_dice_loss` with ``cfg.dice_smooth``.

    Args:
        logits: ``(B, 1, H, W)`` final (gated) necrosis logits.
        target: ``(B, 1, H, W)`` 0/1 necrosis target.
        cfg: the loss configuration.
    """
    return _dice_bce(logits, target, cfg.seg_dice_weight, cfg.dice_smooth)


def loc_loss(logits: Tensor, target: Tensor, cfg: LossConfig) -> Tensor:
    """Localisation loss ``w * Dice + (1 - w) * BCE`` with ``w = cfg.loc_dice_weight`` (as :func:`seg_loss`).

    Args:
        logits: ``(B, 1, H, W)`` femoral-head-neighbourhood logits.
        target: ``(B, 1, H, W)`` 0/1 localisation target.
        cfg: the loss configuration.
    """
    return _dice_bce(logits, target, cfg.loc_dice_weight, cfg.dice_smooth)


def recon_loss(pred: Tensor, target: Tensor, cfg: LossConfig) -> Tensor:
    """Reconstruction loss: ``mean(|pred - target|)`` (``"l1"``) or ``mean((pred - target)^2)`` (``"mse"``).

    Args:
        pred: ``(B, 1, H, W)`` linear reconstruction.
        target: ``(B, 1, H, W)`` normalised input image.
        cfg: the loss configuration (``recon_kind``).
    """
    assert pred.shape == target.shape, f"pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
    target = target.to(pred.dtype)
    if cfg.recon_kind == "mse":
        return F.mse_loss(pred, target)
    return F.l1_loss(pred, target)


_LOSSES: dict[str, Callable[[Tensor, Tensor, LossConfig], Tensor]] = {
    "seg": seg_loss,
    "recon": recon_loss,
    "loc": loc_loss,
}


def branch_losses(
    outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], branches: Sequence[str], cfg: LossConfig
) -> dict[str, Tensor]:
    """The unweighted scalar loss of each active branch.

    Each branch compares ``outputs[b]`` with ``batch[b]`` (``seg``: :func:`seg_loss`, ``recon``:
    :func:`recon_loss`, ``loc``: :func:`loc_loss`). Outputs of inactive branches are ignored.

    Args:
        outputs: the model's outputs, ``(B, 1, H, W)`` each.
        batch: the batch, with a target under each active branch's name.
        branches: the active branches.
        cfg: the loss configuration.

    Returns:
        ``{branch: scalar loss}`` in the order of ``branches``.

    Raises:
        UsageError: unknown branch name (with a suggestion).
        ValueError: an active branch missing from ``outputs`` or ``batch``.
    """
    losses: dict[str, Tensor] = {}
    for branch in branches:
        look_up(branch, _LOSSES, what="branch")
        if branch not in outputs:
            raise ValueError(
                f"branch '{branch}' is active but the model returned no '{branch}' output (outputs: {sorted(outputs)})"
            )
        if branch not in batch:
            raise ValueError(
                f"branch '{branch}' is active but the batch has no '{branch}' target (batch keys: {sorted(batch)})"
            )
        losses[branch] = _LOSSES[branch](outputs[branch], batch[branch], cfg)
    return losses


__all__ = [
    "LossConfig",
    "branch_losses",
    "loc_loss",
    "recon_loss",
    "seg_loss",
    "soft_dice_loss",
]
