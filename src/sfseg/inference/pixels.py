"""From a pyramid output to pixels: the fused logits at the image size, each level's own prediction,
and the level map per pixel. Every consumer (validation, evaluation, prediction, pictures, the
export) goes through `fused_logits`, the only place where the fuse (its rule: Eq. 2 `hard`, `soft`
or `learned`, `pyramid.fuse`) meets the upsampling, and through `InputView`, the way from an image
batch to the network's input (resized by the model's test scale, padded) and back to the image's pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def to_pixels(logits: Tensor, size: Sequence[int] | InputView) -> Tensor:
    """Logits [B, C, h, w] at `size` [B, C, *size] (bilinear, float32), or at the images' own size
    through the `InputView` that made the network's input."""
    return size.restore(logits) if isinstance(size, InputView) else upsample(logits, size)


def fused_logits(
    out: PyramidOutput,
    size: Sequence[int] | InputView,
    tau: float = 0.9,
    fuse_levels: bool = True,
    rule: FuseRule | str = "hard",
) -> tuple[Tensor, Tensor]:
    """Fused logits (`pyramid.fuse` with `rule`; Eq. 2 for `hard`) upsampled bilinearly to `size`
    (`to_pixels`), [B, C, *size] float32, and the level map [B, h_L, w_L] (which level each finest cell
    was taken from, 0 = coarsest; soft and learned: the level of the largest weight).

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
    return to_pixels(logits, size), level_map


def compared_rules(net: PyramidSegmenter) -> tuple[FuseRule, ...]:
    """The fuse rules that evaluation scores on the same pyramids of `net`: every rule that needs no
    training, and the net's own rule when it has a trained part (the learned fuse's gate)."""
    return TRAINING_FREE_FUSE_RULES + ((net.fuse_rule,) if net.fuse_rule.trained else ())


def rule_predictions(
    out: PyramidOutput, size: Sequence[int] | InputView, tau: float, rules: Sequence[FuseRule]
) -> list[Tensor]:
    """The fused class map [B, *size] of each rule on the same pyramid output."""
    return [fused_logits(out, size, tau, rule=rule)[0].argmax(1) for rule in rules]


def level_predictions(out: PyramidOutput, size: Sequence[int] | InputView) -> list[Tensor]:
    """Each level's own class map [B, *size] (its logits upsampled like the fused ones, then argmax):
    what the per-level scores, Table 9 and Fig. 3 measure."""
    return [to_pixels(logits, size).argmax(1) for logits in out.semantic]


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


@dataclass(frozen=True)
class InputView:
    """How an image batch of `size` reaches the network, and how its outputs come back to those pixels,
    as mmsegmentation's test pipeline does: the images are resized by `scale` (bilinear, like training's
    random scale) to `scaled`, padded at the bottom and right to `padded` (a multiple of the network's
    size divisor); logits are upsampled to `padded`, cropped to `scaled` and resized to `size`, so a model
    trained at a reduced scale is scored on the full-resolution labels. scale 1 on an image whose size
    is already a multiple of the divisor is the identity both ways."""

    size: tuple[int, int]
    scaled: tuple[int, int]
    padded: tuple[int, int]

    @classmethod
    def of(cls, size: Sequence[int], scale: float, divisor: int) -> InputView:
        height, width = (int(side) for side in size)
        scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
        return cls((height, width), scaled, (round_up(scaled[0], divisor), round_up(scaled[1], divisor)))

    def images(self, images: Tensor) -> Tensor:
        """Normalised images [B, 3, *size] -> the network's input [B, 3, *padded]."""
        if self.scaled != self.size:
            images = F.interpolate(images, size=self.scaled, mode="bilinear", align_corners=False)
        return pad_images(images, *self.padded) if self.padded != self.scaled else images

    def labels(self, labels: Tensor, ignore_index: int) -> Tensor:
        """Labels [B, *size] on the network's pixel grid [B, *padded] (nearest, padding ignored): what the
        pyramid targets of the network's own cells (unity, validation loss) are built from."""
        if self.scaled != self.size:
            labels = F.interpolate(labels[:, None].float(), size=self.scaled, mode="nearest")[:, 0].long()
        bottom, right = self.padded[0] - self.scaled[0], self.padded[1] - self.scaled[1]
        return F.pad(labels, (0, right, 0, bottom), value=ignore_index) if bottom or right else labels

    def restore(self, logits: Tensor) -> Tensor:
        """Logits [B, C, h, w] of the network's input -> [B, C, *size] float32: upsampled to the padded
        input, the padding cropped, resized to the images' own size (bilinear each time)."""
        logits = upsample(logits, self.padded)[..., : self.scaled[0], : self.scaled[1]]
        return upsample(logits, self.size)

    def cells(self, grid: Tensor) -> Tensor:
        """A map [..., h, w] over the padded input (the input itself, a level's logits, the level map)
        cropped to the cells that hold image pixels (the last row and column may reach past the image by
        less than a cell)."""
        stride = self.padded[0] // grid.shape[-2]
        return grid[..., : math.ceil(self.scaled[0] / stride), : math.ceil(self.scaled[1] / stride)]
