"""The baseline: a standard 2D U-Net (Ronneberger et al., MICCAI 2015) with a necrosis head."""

from __future__ import annotations

import torch
from torch import nn

from avn_study.errors import look_up
from avn_study.models import register_model
from avn_study.models.blocks import NORMS, UPSAMPLES, Decoder, Encoder, check_input, check_int


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

    Raises:
        ValueError: an integer argument out of range.
        UsageError: an unknown ``norm`` or ``upsample`` name (with a suggestion).
    """

    branches: tuple[str, ...] = ("seg",)

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("base_channels", base_channels, 1)
        self.depth = check_int("depth", depth, 1)
        self.size_multiple = 2**depth  # H and W must be multiples of this
        look_up(norm, NORMS, what="norm")
        look_up(upsample, UPSAMPLES, what="upsample")
        self.encoder = Encoder(in_channels, base_channels, depth, norm)
        self.seg_decoder = Decoder(self.encoder.widths, self.encoder.widths[:-1], "all", norm, upsample)
        self.seg_head = nn.Conv2d(self.seg_decoder.out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x: ``(B, C, H, W)`` normalised slices. Returns: ``{"seg": (B, 1, H, W) logits}``."""
        check_input(x, self.size_multiple)
        feats = self.encoder(x)
        return {"seg": self.seg_head(self.seg_decoder(feats))}  # (B, 1, H, W)

    def parameters_by_branch(self) -> dict[str, list[nn.Parameter]]:
        """Parameters grouped as ``{"encoder": [...], "seg": [...]}``."""
        return {
            "encoder": list(self.encoder.parameters()),
            "seg": [*self.seg_decoder.parameters(), *self.seg_head.parameters()],
        }
