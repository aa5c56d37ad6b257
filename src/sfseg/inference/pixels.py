"""From a pyramid output to pixels: the fused logits at the image size, each level's own prediction,
and the level map per pixel. Every consumer (validation, evaluation, prediction, pictures, the
export) goes through `fused_logits`, the only place where the fuse (its rule: Eq. 2 `hard`, `soft`
or `learned`, `pyramid.fuse`) meets the upsampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sfseg.models import PyramidOutput, PyramidSegmenter
from sfseg.pyramid import TRAINING_FREE_FUSE_RULES, FuseRule, fuse


def upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Logits [B, C, h, w] resized bilinearly to `size`, in float32 (as HRNet upsamples its output)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def fused_logits(
    out: PyramidOutput,
    size: Sequence[int],
    tau: float = 0.9,
    fuse_levels: bool = True,
    rule: FuseRule | str = "hard",
) -> tuple[Tensor, Tensor]:
    """Fused logits (`pyramid.fuse` with `rule`; Eq. 2 for `hard`) upsampled bilinearly to `size`,
    [B, C, *size] float32, and the level map [B, h_L, w_L] (which level each finest cell was taken from,
    0 = coarsest; soft and learned: the level of the largest weight).

    fuse_levels=False takes the finest level only (Table 8's "auxiliary supervision"); its level map
    is then L-1 everywhere.
    """
    if fuse_levels:
        logits, level_map = fuse(out.semantic, out.unity, tau, rule, out.gate_logits)
    else:
        logits = out.semantic[-1]
        level_map = torch.full(
            logits.shape[:1] + logits.shape[2:], len(out.semantic) - 1, dtype=torch.long, device=logits.device
        )
    return upsample(logits, size), level_map


def compared_rules(net: PyramidSegmenter) -> tuple[FuseRule, ...]:
    """The fuse rules that evaluation scores on the same pyramids of `net`: every rule that needs no
    training, and the net's own rule when it has a trained part (the learned fuse's gate)."""
    return TRAINING_FREE_FUSE_RULES + ((net.fuse_rule,) if net.fuse_rule.trained else ())


def rule_predictions(
    out: PyramidOutput, size: Sequence[int], tau: float, rules: Sequence[FuseRule]
) -> list[Tensor]:
    """The fused class map [B, *size] of each rule on the same pyramid output."""
    return [fused_logits(out, size, tau, rule=rule)[0].argmax(1) for rule in rules]


def level_predictions(out: PyramidOutput, size: Sequence[int]) -> list[Tensor]:
    """Each level's own class map [B, *size] (its logits upsampled like the fused ones, then argmax):
    what the per-level scores, Table 9 and Fig. 3 measure."""
    return [upsample(logits, size).argmax(1) for logits in out.semantic]


def round_up(length: int, divisor: int) -> int:
    return -(-length // divisor) * divisor


def pad_images(images: Tensor, height: int, width: int) -> Tensor:
    """Pad normalised images [B, 3, h, w] at the bottom and right to height x width with black, as
    `val_transform` pads (image 0 before normalisation)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype)
    batch, channels, old_height, old_width = images.shape
    padded = (-mean / std).view(1, channels, 1, 1).repeat(batch, 1, height, width)
    padded[..., :old_height, :old_width] = images
    return padded


def pad_to_divisor(images: Tensor, divisor: int) -> Tensor:
    """Images padded bottom/right to the next multiple of `divisor` (a model's size divisor)."""
    height, width = images.shape[-2:]
    return pad_images(images, round_up(height, divisor), round_up(width, divisor))
