"""Building blocks shared by the U-Net and the multitask network: conv block, encoder, decoder.

Both models are assembled from the same :class:`Encoder` and :class:`Decoder`, so a seg-only
multitask network and a U-Net of the same width have identical modules and state-dict keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avn_study.errors import look_up
from avn_study.vocabulary import NORMS, SKIPS, UPSAMPLES  # noqa: F401  (re-exported for the models)

MAX_GROUPS = 8  # GroupNorm: the largest power of two <= 8 that divides the width


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named ``norm`` for ``channels`` feature maps."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> ReLU) layers, as in Ronneberger et al. (2015) plus a norm.

    Convs carry no bias when a norm follows (the norm's shift replaces it).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x up-sampling that also maps ``in_channels`` to ``out_channels``.

    ``transpose``: a 2x2 stride-2 transposed conv. ``bilinear``: a 1x1 conv, then bilinear
    interpolation; the two commute (bilinear weights sum to one), and convolving at the low
    resolution is 4x cheaper.
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.conv: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, C_out, h, w) or (B, C_out, 2h, 2w) for transpose
        if self.mode == "bilinear":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x  # (B, C_out, 2h, 2w)


class Encoder(nn.Module):
    """The contracting path: ``depth`` max-poolings, widths ``base_channels * 2**level``.

    Args:
        in_channels: image channels.
        base_channels: width of the top level.
        depth: number of down-samplings.
        norm: "batch" | "instance" | "group" | "none".

    Attributes:
        widths: channels of the feature map at each level, top (full resolution) first.
    """

    def __init__(self, in_channels: int, base_channels: int, depth: int, norm: str) -> None:
        super().__init__()
        self.widths = tuple(base_channels * 2**level for level in range(depth + 1))
        ins = (in_channels, *self.widths[:-1])
        self.stages = nn.ModuleList(ConvBlock(i, o, norm) for i, o in zip(ins, self.widths, strict=True))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature map of every level: ``[(B, C, H, W), (B, 2C, H/2, W/2), ...]``."""
        feats = [self.stages[0](x)]
        for stage in self.stages[1:]:
            feats.append(stage(self.pool(feats[-1])))
        return feats


def skip_levels(skips: str, depth: int) -> tuple[int, ...]:
    """Encoder levels whose features a decoder concatenates: all, only the deepest, or none."""
    look_up(skips, SKIPS, what="skip mode")
    if skips == "all":
        return tuple(range(depth))
    return (depth - 1,) if skips == "deepest" else ()


class Decoder(nn.Module):
    """The expanding path: from the bottleneck back to full resolution.

    Args:
        encoder_widths: ``Encoder.widths`` (the bottleneck is the last entry).
        widths: this decoder's output width at each level ``0..depth-1`` (top first); equal to
            ``encoder_widths[:-1]`` for a standard U-Net, narrower for auxiliary decoders.
        skips: which encoder levels to concatenate: "all" | "deepest" | "none".
        norm: normalisation of the conv blocks.
        upsample: "transpose" | "bilinear".

    Attributes:
        skip_levels: the encoder levels this decoder reads (empty for ``skips="none"``).
        out_channels: width of the full-resolution output, ``widths[0]``.
    """

    def __init__(
        self,
        encoder_widths: tuple[int, ...],
        widths: tuple[int, ...],
        skips: str,
        norm: str,
        upsample: str,
    ) -> None:
        super().__init__()
        depth = len(encoder_widths) - 1
        assert len(widths) == depth, (widths, encoder_widths)
        self.skip_levels = skip_levels(skips, depth)
        self.out_channels = widths[0]
        levels = range(depth - 1, -1, -1)  # deepest first
        below = (*widths[1:], encoder_widths[-1])  # width arriving at each level from underneath
        self.ups = nn.ModuleList(Up(below[lv], widths[lv], upsample) for lv in levels)
        self.blocks = nn.ModuleList(
            ConvBlock(widths[lv] + (encoder_widths[lv] if lv in self.skip_levels else 0), widths[lv], norm)
            for lv in levels
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decode the encoder's feature maps into a ``(B, widths[0], H, W)`` map."""
        x = feats[-1]  # (B, C_bottleneck, H / 2**depth, W / 2**depth)
        level = len(feats) - 1
        for up, block in zip(self.ups, self.blocks, strict=True):
            level -= 1
            x = up(x)  # (B, widths[level], H / 2**level, W / 2**level)
            if level in self.skip_levels:
                x = torch.cat([x, feats[level]], dim=1)
            x = block(x)
        return x


def check_input(x: torch.Tensor, multiple: int) -> None:
    """Raise when ``x`` is not ``(B, C, H, W)`` with H and W divisible by ``multiple`` (cheap)."""
    if x.ndim != 4:
        raise ValueError(f"input must be (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"input size (H, W)=({h}, {w}) must be divisible by 2**depth={multiple}")
