"""The ViT neck: a plain ViT's single-stride tokens as maps at strides 4, 8, 16, 32 (encoder -> neck ->
decoder, DESIGN 2). Hierarchical encoders need no neck: their stages are such maps already."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from sfseg.models.encoders import PYRAMID_STRIDES


def resampled_stride(patch: int) -> int:
    """The stride the tokens of a patch-`patch` ViT are resampled to: the smallest power of two at least
    `patch` (14 -> 16; 4, 8, 16, 32 stay). From it the pyramid's strides are exact factors of two, and
    since the padding inside the encoder is less than one patch, the resampled map has exactly H/s x W/s
    cells for any H, W divisible by s, with no crop."""
    return 1 << (patch - 1).bit_length()


def simple_feature_pyramid(channels: int, stride: int) -> tuple[nn.ModuleList, list[int]]:
    """ViTDet's simple feature pyramid from single-stride maps [B, C, H/s, W/s] to strides 4, 8, 16, 32,
    and each scale's channels. Finer strides by 2x2 stride-2 transposed convolutions, each halving the
    channels (LayerNorm and GELU between two), the stride s as it is, coarser ones by max pooling.
    (s = 16: two deconvolutions for stride 4, one for 8, identity for 16, a 2x2 max pool for 32.)"""
    scales, widths = nn.ModuleList(), []
    for target in PYRAMID_STRIDES:
        layers: list[nn.Module] = []
        width = channels
        for _ in range(int(math.log2(stride // target)) if target < stride else 0):
            if layers:
                layers += [LayerNorm2d(width), nn.GELU()]
            layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
            width //= 2
        if target > stride:
            layers.append(nn.MaxPool2d(kernel_size=target // stride))
        scales.append(nn.Sequential(*layers))
        widths.append(width)
    return scales, widths


class ViTNeck(nn.Module):
    """The tokens of one or several blocks of a plain ViT (maps [B, C, ceil(H/p), ceil(W/p)] at the
    patch stride p, the encoder's padding at the right and bottom) -> maps at strides 4, 8, 16, 32,
    aligned with the image:

    1. several blocks (model.backbone.layers): their tokens concatenated along channels, as DINOv2's
       multi-layer segmentation head reads them, then BatchNorm and a Conv1x1 back to C channels (that
       head's BN + 1x1 as a learned readout: the pyramid below stays one block wide);
    2. a patch that is no power of two (DINOv2's 14): bilinear resampling to the stride s =
       `resampled_stride(p)` (16) with the cell centres kept on the image's grid: output cell j, centred
       at pixel s*(j + 1/2), interpolates the tokens around that pixel (F.interpolate with scale_factor
       p/s and align_corners=False maps output centre s*(j + 1/2) to input coordinate (j + 1/2)*s/p - 1/2,
       i.e. to token centre p*(i + 1/2) = s*(j + 1/2));
    3. ViTDet's simple feature pyramid from stride s.
    With one block and a power-of-two patch, the neck is the simple feature pyramid alone."""

    def __init__(self, channels: int, patch: int, blocks: int) -> None:
        super().__init__()
        self.patch = patch
        self.stride = resampled_stride(patch)
        width = blocks * channels
        self.merge = (
            nn.Sequential(nn.BatchNorm2d(width), nn.Conv2d(width, channels, 1)) if blocks > 1 else None
        )
        self.scales, self.channels = simple_feature_pyramid(channels, self.stride)

    def forward(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        tokens = blocks[0] if self.merge is None else self.merge(torch.cat(list(blocks), dim=1))
        if self.stride != self.patch:
            tokens = F.interpolate(
                tokens,
                scale_factor=self.patch / self.stride,
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
        return [scale(tokens) for scale in self.scales]
