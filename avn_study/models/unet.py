"""The baseline: a standard 2D U-Net (Ronneberger et al., MICCAI 2015), and the two controls built from it.

- :class:`UNet` with ``branches=("seg",)``: the baseline, a necrosis head only.
- :class:`UNet` with ``branches=("seg", "loc")`` (arm ``unet+head``): a second output channel on the same
  decoder, supervised by the femoral-head region, with no gating: the U-Net knows where the head is
  as much as the multitask network does, without a second decoder or a gate.
- :class:`CascadeNet` (arm ``cascade``): two U-Nets sharing nothing, a head localiser and a necrosis
  segmenter, each trained on its own loss; at inference the localiser's mask restricts the necrosis.
"""

from __future__ import annotations

import torch
from torch import nn

from avn_study.errors import look_up
from avn_study.models.blocks import NORMS, UPSAMPLES, Decoder, Encoder, check_input, check_int
from avn_study.models.multitask import LOGIT_LIMIT
from avn_study.models.registry import register_model


@register_model("unet")
class UNet(nn.Module):
    """A 2D U-Net: two (3x3 conv, norm, ReLU) per level, max-pool down, full skip connections.

    Its modules (``encoder``, ``seg_decoder``, ``seg_head``) carry the same names as those of
    :class:`~avn_study.models.multitask.MultitaskNet`, so a U-Net's state dict loads directly into a
    seg-only multitask network of the same width, depth, norm and up-sampling (and back).

    Args:
        in_channels: image channels (1: T1).
        base_channels: width of the top level, doubled at every down-sampling.
        depth: number of down-samplings; inputs need H and W divisible by ``2**depth``.
        norm: "batch" | "instance" | "group" | "none".
        upsample: "transpose" (2x2 transposed conv) | "bilinear" (1x1 conv + bilinear).
        branches: ``("seg",)``, or ``("seg", "loc")`` for a second output channel (``loc_head``).

    Raises:
        ValueError: an integer argument out of range, other branches.
        UsageError: an unknown ``norm`` or ``upsample`` name (with a suggestion).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        branches: tuple[str, ...] = ("seg",),
    ) -> None:
        super().__init__()
        self.branches = tuple(branches)
        if self.branches not in (("seg",), ("seg", "loc")):
            raise ValueError(f"a U-Net has branches ('seg',) or ('seg', 'loc'), got {branches=}")
        check_int("in_channels", in_channels, 1)
        check_int("base_channels", base_channels, 1)
        self.depth = check_int("depth", depth, 1)
        self.size_multiple = 2**depth  # H and W must be multiples of this
        look_up(norm, NORMS, what="norm")
        look_up(upsample, UPSAMPLES, what="upsample")
        self.encoder = Encoder(in_channels, base_channels, depth, norm)
        self.seg_decoder = Decoder(self.encoder.widths, self.encoder.widths[:-1], "all", norm, upsample)
        self.seg_head = nn.Conv2d(self.seg_decoder.out_channels, 1, 1)
        if "loc" in self.branches:  # with seg_head: one 1x1 conv to two channels, written as two
            self.loc_head = nn.Conv2d(self.seg_decoder.out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x: ``(B, C, H, W)`` normalised slices. Returns: ``{"seg": (B, 1, H, W) logits}`` and,
        with the head channel, ``"loc"`` logits of the same shape (never used to gate ``seg``)."""
        check_input(x, self.size_multiple)
        features = self.seg_decoder(self.encoder(x))  # (B, C0, H, W)
        out = {"seg": self.seg_head(features)}  # (B, 1, H, W)
        if "loc" in self.branches:
            out["loc"] = self.loc_head(features)  # (B, 1, H, W)
        return out

    def parameters_by_branch(self) -> dict[str, list[nn.Parameter]]:
        """Parameters grouped as ``{"encoder": [...], "seg": [...]}`` (``"loc"``: the head channel)."""
        groups = {
            "encoder": list(self.encoder.parameters()),
            "seg": [*self.seg_decoder.parameters(), *self.seg_head.parameters()],
        }
        if "loc" in self.branches:
            groups["loc"] = list(self.loc_head.parameters())
        return groups


@register_model("cascade")
class CascadeNet(nn.Module):
    """Two U-Nets that share nothing: a femoral-head localiser and a necrosis segmenter.

    Each trains on its own loss (the localiser on the localisation target, the segmenter on necrosis,
    unmasked), which is what training them separately does. In evaluation mode the necrosis logits
    outside the localiser's mask (``p_loc < 0.5``) are set to ``-LOGIT_LIMIT``: the second stage only
    keeps necrosis inside the region the first stage found, the usual clinical pipeline.

    Both stages are full U-Nets of the same width (twice a U-Net's parameters): a narrower localiser
    learns the head too slowly to be a fair stand-in for the clinical pipeline (at the calibration's
    budget a half-width one reached a localisation Dice of 0.28 where the full-width one reached 0.85).

    Args:
        in_channels, base_channels, depth, norm, upsample: as :class:`UNet`, for both stages.
        branches: must be ``("seg", "loc")``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        branches: tuple[str, ...] = ("seg", "loc"),
    ) -> None:
        super().__init__()
        if tuple(branches) != ("seg", "loc"):
            raise ValueError(f"a cascade has branches ('seg', 'loc'), got {branches=}")
        self.branches = ("seg", "loc")
        self.size_multiple = 2**depth
        self.loc_net = UNet(in_channels, base_channels, depth, norm, upsample)
        self.seg_net = UNet(in_channels, base_channels, depth, norm, upsample)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``seg``: necrosis logits (masked in eval mode), ``seg_raw``: unmasked, ``loc``: head logits."""
        loc = self.loc_net(x)["seg"]  # (B, 1, H, W)
        seg = self.seg_net(x)["seg"]  # (B, 1, H, W)
        masked = seg if self.training else torch.where(loc >= 0, seg, torch.full_like(seg, -LOGIT_LIMIT))
        return {"seg": masked, "seg_raw": seg, "loc": loc}

    def parameters_by_branch(self) -> dict[str, list[nn.Parameter]]:
        return {"loc": list(self.loc_net.parameters()), "seg": list(self.seg_net.parameters())}
