"""Branch losses: hand-computed cases, limits, gradients, branch selection, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from avn_study.errors import UsageError
from avn_study.training.losses import LossConfig, branch_losses, loc_loss, recon_loss, seg_loss, soft_dice_loss


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


# (logits, target, smooth, expected Dice loss), computed by hand
DICE_CASES = [
    # p = 0.5 everywhere: I = 1, sum p = 2, sum t = 2 -> 1 - (2 + 1) / (4 + 1)
    ([0.0, 0.0, 0.0, 0.0], [1, 0, 1, 0], 1.0, 0.4),
    # same without smoothing weight: 1 - 2 / 4
    ([0.0, 0.0, 0.0, 0.0], [1, 0, 1, 0], 1e-12, 0.5),
    # p = sigmoid(log 3) = 0.75 on the lesion, 0.25 off it: I = 0.75, sum p = 1, sum t = 1 -> 1 - 2.5/3
    ([math.log(3), -math.log(3)], [1, 0], 1.0, 1 - 2.5 / 3),
    # empty target, p = 0.5 on 4 pixels: 1 - 1 / (2 + 1)
    ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 1.0, 2 / 3),
]


@pytest.mark.parametrize(("logits", "target", "smooth", "expected"), DICE_CASES)
def test_soft_dice_hand_computed(logits, target, smooth, expected):
    loss = soft_dice_loss(_t(logits), _t(target), smooth)
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_dice_is_over_the_whole_batch_not_per_slice():
    # slice 0 empty with an empty prediction, slice 1 half right: per slice the empty one would be 0/0
    logits = torch.tensor([[-30.0, -30.0], [0.0, 0.0]], dtype=torch.float64).reshape(2, 1, 1, 2)
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64).reshape(2, 1, 1, 2)
    # I = 0.5, sum p = 1 (+ ~0), sum t = 1 -> 1 - 2 / 3
    assert soft_dice_loss(logits, target, 1.0).item() == pytest.approx(1 / 3, abs=1e-9)


def test_seg_loss_mixes_dice_and_bce():
    logits, target = _t([0.0, 0.0, 0.0, 0.0]), _t([1, 0, 1, 0])
    bce = math.log(2)  # p = 0.5 for every pixel
    for w in (0.0, 0.3, 0.5, 1.0):
        cfg = LossConfig(seg_dice_weight=w)
        assert seg_loss(logits, target, cfg).item() == pytest.approx(w * 0.4 + (1 - w) * bce, abs=1e-9)


def test_loc_loss_uses_its_own_weight():
    logits, target = _t([0.0, 0.0, 0.0, 0.0]), _t([1, 0, 1, 0])
    cfg = LossConfig(seg_dice_weight=0.0, loc_dice_weight=1.0)
    assert loc_loss(logits, target, cfg).item() == pytest.approx(0.4, abs=1e-9)
    assert seg_loss(logits, target, cfg).item() == pytest.approx(math.log(2), abs=1e-9)


def test_bce_is_stable_for_extreme_logits():
    logits, target = _t([1e4, -1e4]), _t([0, 1])
    loss = seg_loss(logits, target, LossConfig(seg_dice_weight=0.0))
    assert loss.item() == pytest.approx(1e4, rel=1e-9)  # mean of two errors of 1e4 each


@pytest.mark.parametrize("target", [[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
def test_perfect_prediction_gives_about_zero(target):
    t = _t(target)
    logits = (t * 2 - 1) * 30  # confident and right
    cfg = LossConfig()
    assert seg_loss(logits, t, cfg).item() == pytest.approx(0.0, abs=1e-9)
    assert loc_loss(logits, t, cfg).item() == pytest.approx(0.0, abs=1e-9)


def test_empty_target_needs_an_empty_prediction():
    empty = torch.zeros(2, 1, 8, 8)
    assert soft_dice_loss(torch.full_like(empty, -30.0), empty, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(torch.zeros_like(empty), empty, 1.0).item() > 0.95  # p = 0.5 on 128 pixels


@pytest.mark.parametrize(("kind", "expected"), [("l1", (1 + 0 + 2 + 3) / 4), ("mse", (1 + 0 + 4 + 9) / 4)])
def test_recon_l1_vs_mse(kind, expected):
    pred, target = _t([1.0, 2.0, 3.0, -1.0]), _t([0.0, 2.0, 1.0, 2.0])
    assert recon_loss(pred, target, LossConfig(recon_kind=kind)).item() == pytest.approx(expected)


def _outputs_and_batch(branches=("seg", "recon", "loc")):
    g = torch.Generator().manual_seed(0)
    outputs = {b: torch.randn(3, 1, 8, 8, generator=g, requires_grad=True) for b in branches}
    batch = {
        "image": torch.randn(3, 1, 8, 8, generator=g),
        "seg": (torch.rand(3, 1, 8, 8, generator=g) > 0.9).float(),
        "loc": (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float(),
        "recon": torch.randn(3, 1, 8, 8, generator=g),
    }
    return outputs, batch


@pytest.mark.parametrize("recon_kind", ["l1", "mse"])
def test_gradients_are_finite(recon_kind):
    outputs, batch = _outputs_and_batch()
    losses = branch_losses(outputs, batch, ("seg", "recon", "loc"), LossConfig(recon_kind=recon_kind))
    sum(losses.values()).backward()
    for b, out in outputs.items():
        assert out.grad is not None and torch.isfinite(out.grad).all(), b
        assert out.grad.abs().sum() > 0, b


@pytest.mark.parametrize("branches", [("seg",), ("seg", "loc"), ("seg", "recon"), ("seg", "recon", "loc")])
def test_branch_losses_picks_only_active_branches(branches):
    outputs, batch = _outputs_and_batch()  # the model returns all three outputs
    losses = branch_losses(outputs, batch, branches, LossConfig())
    assert list(losses) == list(branches)
    for b, loss in losses.items():
        assert loss.shape == () and torch.isfinite(loss), b
    assert losses["seg"].item() == pytest.approx(seg_loss(outputs["seg"], batch["seg"], LossConfig()).item())


def test_branch_losses_reports_missing_output_and_target():
    outputs, batch = _outputs_and_batch(("seg",))
    with pytest.raises(ValueError, match="model returned no 'loc' output"):
        branch_losses(outputs, batch, ("seg", "loc"), LossConfig())
    outputs, batch = _outputs_and_batch()
    del batch["recon"]
    with pytest.raises(ValueError, match="batch has no 'recon' target"):
        branch_losses(outputs, batch, ("seg", "recon"), LossConfig())
    with pytest.raises(UsageError, match="did you mean 'recon'"):
        branch_losses(outputs, batch, ("seg", "recn"), LossConfig())


BAD_CONFIGS = [
    ({"seg_dice_weight": 1.5}, ValueError, "seg_dice_weight must be a number in [0, 1], got seg_dice_weight=1.5"),
    ({"loc_dice_weight": -0.1}, ValueError, "loc_dice_weight must be a number in [0, 1]"),
    ({"seg_dice_weight": float("nan")}, ValueError, "seg_dice_weight must be"),
    ({"dice_smooth": 0.0}, ValueError, "dice_smooth must be a finite number > 0"),
    ({"dice_smooth": -1}, ValueError, "got dice_smooth=-1"),
    ({"recon_kind": "mes"}, UsageError, "Unknown recon_kind 'mes'; did you mean 'mse'? Available: l1, mse"),
    ({"recon_kind": "l2"}, UsageError, "Unknown recon_kind 'l2'; did you mean 'l1'? Available: l1, mse"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_CONFIGS)
def test_bad_config_messages(kwargs, error, message):
    with pytest.raises(error) as info:
        LossConfig(**kwargs)
    assert message in str(info.value)
