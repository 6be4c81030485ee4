"""The multitask network of Pham et al. (BVM 2020): one encoder, decoders for seg / recon / loc.

The localisation output gates (emphasises) the segmentation output. The model's ``seg`` output is
always the final necrosis prediction as logits, so losses and metrics treat every arm alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from avn_study.errors import look_up
from avn_study.models.blocks import NORMS, SKIPS, UPSAMPLES, Decoder, Encoder, check_input, check_int
from avn_study.models.registry import register_model
from avn_study.vocabulary import BRANCHES, GATINGS

LOGIT_LIMIT = 30.0  # gated logits are clamped to [-30, 30] (sigmoid(30) = 1 - 1e-13)


def gate_logits(seg: torch.Tensor, loc: torch.Tensor, gating: str, alpha: float = 0.5) -> torch.Tensor:
    """The logits of the gated necrosis probability, computed in log space.

    ``multiply``: ``p = p_seg * p_loc``; ``residual``: ``p = p_seg * (a + (1 - a) * p_loc)``, with
    ``p_seg = sigmoid(seg)``, ``p_loc = sigmoid(loc)`` and ``a = alpha``. Returns ``logit(p) =
    log p - log(1 - p)`` where both terms are sums of log-sigmoids, never a difference of
    probabilities: ``1 - p = sigmoid(-seg) + sigmoid(seg) * (1 - g)`` with ``1 - g =
    (1 - a) * sigmoid(-loc)``, so ``log(1 - p)`` is a ``logaddexp`` of finite terms (the exact
    equivalent of ``log1mexp(log p)`` without its cancellation at ``p -> 1``). The result is clamped
    to ``[-30, 30]`` in value, with a straight-through gradient so a confidently wrong pixel still
    learns.

    Args:
        seg: ungated necrosis logits, ``(B, 1, H, W)``.
        loc: localisation logits, same shape.
        gating: "multiply" | "residual" | "none" (returns ``seg``).
        alpha: the residual gate's floor ``a`` in ``[0, 1]``.

    Returns:
        Gated logits, same shape as ``seg``.
    """
    if gating == "none":
        return seg
    if gating == "residual" and alpha == 1.0:  # g = 1: the gate does nothing
        logits = seg
    else:
        if gating == "multiply" or alpha == 0.0:
            log_g, log_1mg = F.logsigmoid(loc), F.logsigmoid(-loc)  # log g, log(1 - g)
        else:
            log_g = torch.log(alpha + (1.0 - alpha) * torch.sigmoid(loc))  # g >= alpha > 0: no underflow
            log_1mg = math.log1p(-alpha) + F.logsigmoid(-loc)
        log_p_seg = F.logsigmoid(seg)
        log_p = log_p_seg + log_g  # (B, 1, H, W), <= 0
        log_1mp = torch.logaddexp(F.logsigmoid(-seg), log_p_seg + log_1mg)
        logits = log_p - log_1mp
    clamped = logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    return logits + (clamped - logits).detach()  # value clamped, gradient straight through


def parse_branches(branches: str | Iterable[str]) -> tuple[str, ...]:
    """``("seg", "loc")``, ``["loc", "seg"]`` or ``"seg+loc"`` -> ``("seg", "loc")`` (canonical order)."""
    names = branches.split("+") if isinstance(branches, str) else list(branches)
    for name in names:
        look_up(name, BRANCHES, what="branch")
    if "seg" not in names:
        raise ValueError(f"branches must include 'seg' (the necrosis output), got {branches=}")
    return tuple(b for b in BRANCHES if b in names)


@register_model("multitask")
class MultitaskNet(nn.Module):
    """A shared U-Net encoder with a segmentation decoder and optional recon / loc decoders.

    Branches:
        * ``seg``: necrosis logits; full skip connections, the exact decoder of :class:`UNet`.
        * ``recon``: linear reconstruction of the input, used to pre-train the encoder. Its skips
          are ``recon_skips``, default "none": with the top skip, the decoder can copy the input
          through two convs and never needs the encoder's deep features, so pre-training would
          teach the encoder nothing. "none" forces everything through the bottleneck (an
          autoencoder); "deepest" allows only the skip just above it; "all" is for comparison.
        * ``loc``: femoral-head neighbourhood logits; skips ``loc_skips`` (default "all").

    The recon and loc decoders are ``aux_channels_factor`` (default 0.5) as wide as the seg
    decoder: their targets are smooth (an image, a blob), and narrow decoders keep the full
    multitask step within about 1.7x the seg-only step, the encoder being shared.

    Gating (needs ``loc``): ``multiply`` is the paper's emphasis ``p = p_seg * p_loc``;
    ``residual`` is ``p = p_seg * (a + (1 - a) * p_loc)`` with ``a = gating_alpha``, which lets a
    lesion through at a reduced level when the localisation misses it. Decision: ``seg`` is always
    the final prediction as logits, for gated models ``logit(p_gated)`` computed stably in log space
    (:func:`gate_logits`), and ``seg_raw`` holds the ungated logits. The segmentation loss is thus
    taken on the gated output (train as you infer): the seg decoder is not asked to suppress
    distractors outside the femoral head, and the loc branch also learns from the seg loss.

    With ``branches=("seg",)`` and no gating this is the same network as a :class:`UNet` of equal
    width, depth, norm and up-sampling: same modules, same state-dict keys, same outputs.

    Args:
        branches: any of "seg", "recon", "loc" (a sequence, or a string like "seg+loc"); "seg" is
            required.
        in_channels: image channels; the reconstruction has as many.
        base_channels: width of the top level, doubled at every down-sampling.
        depth: number of down-samplings; inputs need H and W divisible by ``2**depth``.
        norm: "batch" | "instance" | "group" | "none".
        upsample: "transpose" | "bilinear".
        recon_skips: "none" | "deepest" | "all".
        loc_skips: "all" | "deepest" | "none".
        aux_channels_factor: width of the recon / loc decoders relative to the seg decoder.
        gating: "multiply" | "residual" | "none"; ``None`` means "multiply" when ``loc`` is a
            branch, else "none".
        gating_alpha: the residual gate's floor, in ``[0, 1]``.

    Raises:
        ValueError: "seg" missing, gating without "loc", a number out of range.
        UsageError: an unknown branch, norm, upsample, skip or gating name (with a suggestion).
    """

    def __init__(
        self,
        branches: str | Iterable[str] = ("seg", "recon", "loc"),
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        recon_skips: str = "none",
        loc_skips: str = "all",
        aux_channels_factor: float = 0.5,
        gating: str | None = None,
        gating_alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.branches = parse_branches(branches)
        check_int("in_channels", in_channels, 1)
        check_int("base_channels", base_channels, 1)
        self.depth = check_int("depth", depth, 1)
        self.size_multiple = 2**depth  # H and W must be multiples of this
        look_up(norm, NORMS, what="norm")
        look_up(upsample, UPSAMPLES, what="upsample")
        look_up(recon_skips, SKIPS, what="recon_skips")
        look_up(loc_skips, SKIPS, what="loc_skips")
        if not aux_channels_factor > 0:
            raise ValueError(f"aux_channels_factor must be > 0, got {aux_channels_factor=}")
        self.gating = self._check_gating(gating, gating_alpha)
        self.gating_alpha = float(gating_alpha)

        self.encoder = Encoder(in_channels, base_channels, depth, norm)
        widths = self.encoder.widths
        aux_widths = tuple(max(1, round(w * aux_channels_factor)) for w in widths[:-1])
        self.seg_decoder = Decoder(widths, widths[:-1], "all", norm, upsample)
        self.seg_head = nn.Conv2d(self.seg_decoder.out_channels, 1, 1)
        if "recon" in self.branches:
            self.recon_decoder = Decoder(widths, aux_widths, recon_skips, norm, upsample)
            self.recon_head = nn.Conv2d(aux_widths[0], in_channels, 1)
        if "loc" in self.branches:
            self.loc_decoder = Decoder(widths, aux_widths, loc_skips, norm, upsample)
            self.loc_head = nn.Conv2d(aux_widths[0], 1, 1)

    def _check_gating(self, gating: str | None, alpha: float) -> str:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"gating_alpha must be in [0, 1], got gating_alpha={alpha}")
        if gating is None:
            return "multiply" if "loc" in self.branches else "none"
        look_up(gating, GATINGS, what="gating")
        if gating != "none" and "loc" not in self.branches:
            raise ValueError(
                f"gating={gating!r} needs the 'loc' branch, got branches={self.branches}; "
                "add 'loc' to branches or use gating='none'"
            )
        return gating

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run every branch.

        Args:
            x: ``(B, C, H, W)`` normalised slices, H and W divisible by ``2**depth``.

        Returns:
            ``seg``: final necrosis logits ``(B, 1, H, W)``; ``seg_raw``: ungated logits (gated
            models only); ``recon``: ``(B, C, H, W)``; ``loc``: ``(B, 1, H, W)`` logits.
        """
        check_input(x, self.size_multiple)
        feats = self.encoder(x)  # [(B, C, H, W), ..., (B, C * 2**depth, H / 2**depth, W / 2**depth)]
        seg = self.seg_head(self.seg_decoder(feats))  # (B, 1, H, W)
        out: dict[str, torch.Tensor] = {"seg": seg}
        if "recon" in self.branches:
            out["recon"] = self.recon_head(self.recon_decoder(feats))  # (B, C, H, W)
        if "loc" in self.branches:
            out["loc"] = self.loc_head(self.loc_decoder(feats))  # (B, 1, H, W)
        if self.gating != "none":
            out["seg_raw"] = seg
            out["seg"] = gate_logits(seg, out["loc"], self.gating, self.gating_alpha)
        return out

    def parameters_by_branch(self) -> dict[str, list[nn.Parameter]]:
        """Parameters grouped as ``{"encoder": [...], "seg": [...], "recon": [...], "loc": [...]}``."""
        groups = {"encoder": list(self.encoder.parameters())}
        for b in self.branches:
            decoder, head = getattr(self, f"{b}_decoder"), getattr(self, f"{b}_head")
            groups[b] = [*decoder.parameters(), *head.parameters()]
        return groups
