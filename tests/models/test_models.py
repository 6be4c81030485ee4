"""Models: registry, arm outputs, gradient flow, U-Net equivalence, recon skips, gating math, errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from avn_study.errors import UsageError
from avn_study.models import (
    MultitaskNet,
    UNet,
    create_model,
    gate_logits,
    list_models,
    model_for_arm,
    register_model,
)
from avn_study.vocabulary import ARMS

TINY = {"base_channels": 4, "depth": 2}
SIZE = 32


def _input(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


GATED = [a for a, spec in ARMS.items() if spec.model == "multitask" and "loc" in spec.branches]


def _expected_keys(arm: str) -> set[str]:
    model, branches = ARMS[arm].model, ARMS[arm].branches
    keys = set(branches)
    return keys | {"seg_raw"} if arm in GATED or model == "cascade" else keys


@pytest.mark.parametrize("arm", list(ARMS))
def test_arm_outputs_and_gradients_reach_every_parameter(arm: str) -> None:
    model = model_for_arm(arm, **TINY)
    out = model(_input())
    assert set(out) == _expected_keys(arm)
    for name, value in out.items():
        assert value.shape == (2, 1, SIZE, SIZE), name
    assert model.branches == ARMS[arm].branches
    targets = torch.Generator().manual_seed(1)
    loss = sum((v - torch.randn(v.shape, generator=targets)).pow(2).mean() for v in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    by_branch = model.parameters_by_branch()
    assert sum(len(ps) for ps in by_branch.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("arm", GATED)
def test_gated_seg_loss_trains_the_loc_branch(arm: str) -> None:
    model = model_for_arm(arm, **TINY)
    out = model(_input())
    torch.testing.assert_close(out["seg"], gate_logits(out["seg_raw"], out["loc"], "multiply"))
    out["seg"].sigmoid().mean().backward()
    loc_params = model.parameters_by_branch()["loc"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loc_params)
    assert sum(p.grad.abs().sum() for p in loc_params) > 0


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_seg_only_multitask_is_the_unet(norm: str, upsample: str) -> None:
    cfg = {**TINY, "depth": 3, "norm": norm, "upsample": upsample}
    unet = create_model("unet", **cfg)
    multi = create_model("multitask", branches=("seg",), gating="none", **cfg)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in multi.parameters())
    assert unet.state_dict().keys() == multi.state_dict().keys()
    multi.load_state_dict(unet.state_dict())
    x = _input()
    for mode in (True, False):  # batch statistics, then running statistics
        unet.train(mode)
        multi.train(mode)
        torch.testing.assert_close(multi(x)["seg"], unet(x)["seg"], rtol=0, atol=0)


def test_recon_without_skips_reads_only_the_bottleneck() -> None:
    model = MultitaskNet(branches=("seg", "recon"), base_channels=4, depth=3, aux_channels_factor=0.5)
    decoder = model.recon_decoder
    assert decoder.skip_levels == ()
    for block, up in zip(decoder.blocks, decoder.ups, strict=True):
        assert block[0].in_channels == up.conv.out_channels  # nothing concatenated
    feats = model.encoder(_input())
    scrambled = [torch.randn_like(f) for f in feats[:-1]] + [feats[-1]]
    torch.testing.assert_close(decoder(scrambled), decoder(feats))
    seg_blocks = model.seg_decoder.blocks
    assert [b[0].in_channels for b in seg_blocks] == [2 * w for w in (16, 8, 4)]  # full skips


@pytest.mark.parametrize(("skips", "levels"), [("all", (0, 1, 2)), ("deepest", (2,)), ("none", ())])
def test_skip_modes(skips: str, levels: tuple[int, ...]) -> None:
    model = MultitaskNet("seg+recon+loc", base_channels=4, depth=3, recon_skips=skips, loc_skips=skips)
    assert model.recon_decoder.skip_levels == levels
    assert model.loc_decoder.skip_levels == levels
    assert model.loc_decoder.out_channels == 2  # aux_channels_factor 0.5 of 4


def _probs(seg: torch.Tensor, loc: torch.Tensor, gating: str, alpha: float) -> torch.Tensor:
    p_seg, p_loc = seg.double().sigmoid(), loc.double().sigmoid()
    return p_seg * p_loc if gating == "multiply" else p_seg * (alpha + (1 - alpha) * p_loc)


GATING_CASES = [("multiply", 0.5), ("residual", 0.5), ("residual", 0.0), ("residual", 0.2), ("residual", 1.0)]


@pytest.mark.parametrize(("gating", "alpha"), GATING_CASES)
def test_gating_math(gating: str, alpha: float) -> None:
    grid = torch.linspace(-10, 10, 41)
    seg, loc = torch.meshgrid(grid, grid, indexing="ij")
    gated = gate_logits(seg, loc, gating, alpha)
    torch.testing.assert_close(gated.sigmoid().double(), _probs(seg, loc, gating, alpha), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("gating", "alpha"), GATING_CASES)
def test_gating_is_finite_for_extreme_logits(gating: str, alpha: float) -> None:
    values = torch.tensor([-50.0, -30.0, 0.0, 30.0, 50.0])
    seg, loc = (t.clone().requires_grad_(True) for t in torch.meshgrid(values, values, indexing="ij"))
    gated = gate_logits(seg, loc, gating, alpha)
    assert torch.isfinite(gated).all() and gated.abs().max() <= 30
    torch.testing.assert_close(gated.sigmoid().double(), _probs(seg, loc, gating, alpha), rtol=0, atol=1e-5)
    torch.nn.functional.binary_cross_entropy_with_logits(gated, torch.ones_like(gated)).backward()
    assert torch.isfinite(seg.grad).all()
    assert loc.grad is None if alpha == 1.0 else torch.isfinite(loc.grad).all()  # alpha 1: no gate
    assert seg.grad[0, 0] < 0  # a confidently wrong pixel still learns through the clamp


BAD_ARGUMENTS = [
    (lambda: UNet(depth=0), ValueError, "depth must be an integer >= 1, got depth=0"),
    (lambda: UNet(base_channels=0), ValueError, "base_channels must be an integer >= 1, got base_channels=0"),
    (lambda: UNet(norm="btach"), UsageError, "Unknown norm 'btach'; did you mean 'batch'?"),
    (lambda: UNet(upsample="bilinar"), UsageError, "Unknown upsample 'bilinar'; did you mean 'bilinear'?"),
    (lambda: MultitaskNet(branches=("recon", "loc")), ValueError, "branches must include 'seg'"),
    (lambda: MultitaskNet(branches=("seg", "lco")), UsageError, "Unknown branch 'lco'; did you mean 'loc'?"),
    (
        lambda: MultitaskNet(branches=("seg", "recon"), gating="multiply"),
        ValueError,
        "gating='multiply' needs the 'loc' branch, got branches=('seg', 'recon')",
    ),
    (
        lambda: MultitaskNet(gating_alpha=1.5),
        ValueError,
        "gating_alpha must be in [0, 1], got gating_alpha=1.5",
    ),
    (lambda: MultitaskNet(gating="mutliply"), UsageError, "did you mean 'multiply'?"),
    (lambda: MultitaskNet(recon_skips="al"), UsageError, "Unknown recon_skips 'al'; did you mean 'all'?"),
    (lambda: MultitaskNet(aux_channels_factor=0), ValueError, "aux_channels_factor must be > 0"),
    (lambda: create_model("unte"), UsageError, "Unknown model 'unte'; did you mean 'unet'?"),
    (lambda: model_for_arm("seg+lco"), UsageError, "Unknown arm 'seg+lco'; did you mean 'seg+loc'?"),
    (lambda: model_for_arm("seg", branches=("seg",)), UsageError, "fixes the branches"),
]


@pytest.mark.parametrize(("build", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments(build, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        build()


@pytest.mark.parametrize("name", ["unet", "multitask"])
def test_bad_input_size(name: str) -> None:
    model = create_model(name, base_channels=2, depth=4)
    message = "input size (H, W)=(100, 96) must be divisible by 2**depth=16"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(torch.zeros(1, 1, 100, 96))
    with pytest.raises(ValueError, match=re.escape("input must be (B, C, H, W), got shape (1, 32, 32)")):
        model(torch.zeros(1, 32, 32))


def test_registry_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"unet", "multitask"} <= set(list_models())
    assert isinstance(create_model("unet", **TINY), UNet)
    assert isinstance(create_model("multitask", **TINY), MultitaskNet)

    import avn_study.models.registry as registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model("toy")
    class Toy(nn.Module):
        def __init__(self, width: int = 1) -> None:
            super().__init__()
            self.width = width

    assert "toy" in list_models()
    assert create_model("toy", width=3).width == 3
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_model("toy")(Toy)


def test_unet_head_channel_is_supervision_only() -> None:
    """unet+head: the head channel shares the decoder but never touches the necrosis output."""
    model = model_for_arm("unet+head", **TINY)
    plain = model_for_arm("unet", **TINY)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("loc_head")})
    x = _input()
    torch.testing.assert_close(model(x)["seg"], plain(x)["seg"])  # the same U-Net plus one 1x1 conv
    with torch.no_grad():
        model.loc_head.weight.mul_(-3.0)
    torch.testing.assert_close(model(x)["seg"], plain(x)["seg"])  # no gate


def test_cascade_trains_separately_and_masks_at_inference() -> None:
    torch.manual_seed(0)
    model = model_for_arm("cascade", **TINY)
    x = _input()
    out = model(x)
    torch.testing.assert_close(out["seg"], out["seg_raw"])  # training: each stage on its own loss
    out["seg"].mean().backward()
    assert all(p.grad is None for p in model.loc_net.parameters())  # the necrosis loss never reaches it
    model.eval()
    with torch.no_grad():
        out = model(x)
    outside = out["loc"] < 0
    assert outside.any() and (out["seg"][outside] == -30.0).all()
    torch.testing.assert_close(out["seg"][~outside], out["seg_raw"][~outside])
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"loc_net", "seg_net"}  # nothing shared


def test_model_for_arm_drops_options_the_arm_lacks() -> None:
    cfg = {**TINY, "gating": "residual", "gating_alpha": 0.3, "recon_skips": "all", "aux_channels_factor": 2}
    assert isinstance(model_for_arm("unet", **cfg), UNet)
    assert model_for_arm("seg", **cfg).gating == "none"
    seg_loc = model_for_arm("seg+loc", **cfg)
    assert (seg_loc.gating, seg_loc.gating_alpha, seg_loc.branches) == ("residual", 0.3, ("seg", "loc"))
    assert model_for_arm("seg+recon", **cfg).recon_decoder.skip_levels == (0, 1)
    with pytest.raises(TypeError, match="widht"):
        model_for_arm("seg", widht=3)
