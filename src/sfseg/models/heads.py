"""The unity head (Sec. 4.1), the semantic pyramid head (Sec. 4.2) and the plain FCN baseline head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sfseg.models.context import build_context
from sfseg.models.layers import conv_bn_relu
from sfseg.pyramid import repeat_cells


class ConvBlock(nn.Sequential):
    """Eq. 7: Conv1x1-BN-ReLU then a Conv1x1 from D_s to the C class logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(conv_bn_relu(in_channels, in_channels), nn.Conv2d(in_channels, num_classes, 1))


class UnityHead(nn.Module):
    """Sec. 4.1: X [B, D, h_L, w_L] -> unity logits U^(1..L-1), each [B, h_l, w_l], coarse to fine.

    Per level l < L every finest pixel is compared with its cell's centroid embedding; the pixel's
    logit says "same class as the centroid", and the cell's logit is the min over its pixels.
    Logits, not probabilities: min-pool commutes with the sigmoid (DESIGN 1), and the loss is
    BCE-with-logits. L == 1 has no unity level, so the head then owns no parameters and returns [].
    """

    def __init__(self, in_channels: int, num_levels: int, channels: int = 64) -> None:
        super().__init__()
        self.num_levels = num_levels
        if num_levels == 1:
            return
        self.reduce = conv_bn_relu(in_channels, channels)  # X -> X_u (D_u channels)
        self.centroid = nn.Conv2d(channels, channels, 1)  # shared by all levels
        self.pixel = nn.Conv2d(channels, channels, 1)
        # The paper's scorer is one Conv1x1, but a linear map of a signed difference cannot express
        # "far from the centroid" in every direction; a hidden ReLU layer can.
        self.scorer = nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, 1, 1))

    def pixel_logits(self, x: Tensor) -> list[Tensor]:
        """Per level l < L, the per-pixel logits [B, h_L, w_L] of "shares the cell centroid's class"."""
        if self.num_levels == 1:
            return []
        x_u = self.reduce(x)
        pixels = self.pixel(x_u)
        logits = []
        for level in range(self.num_levels - 1):
            cell = 2 ** (self.num_levels - 1 - level)
            centroid = self.centroid(F.avg_pool2d(x_u, cell))
            diff = pixels - repeat_cells(centroid, cell)  # X_diff^(l): NearestUp of the centroid
            logits.append(self.scorer(diff).squeeze(1))
        return logits

    def forward(self, x: Tensor) -> list[Tensor]:
        logits = self.pixel_logits(x)
        # min-pool over each 2^(L-l) cell: the most deviating pixel decides the cell (U^(l)).
        return [-F.max_pool2d(-z, 2 ** (self.num_levels - 1 - level)) for level, z in enumerate(logits)]


class SemanticHead(nn.Module):
    """Sec. 4.2: X -> Conv1x1-BN-ReLU (D -> D_s) = X^(L) -> context module -> X'^(1..L) -> one
    ConvBlock per level (Eq. 7) -> semantic logits Y^(l) [B, C, h_l, w_l], coarse to fine.

    With OCR, HRNet-OCR's auxiliary head (a ConvBlock on X) predicts the soft object regions; its class
    logits [B, C, h_L, w_L] are returned too (None otherwise), to be trained against the finest labels.
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_levels: int, channels: int = 512, context: str = "c2f"
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.project = conv_bn_relu(in_channels, channels)
        self.context = build_context(context, channels, num_levels)
        self.auxiliary = (
            ConvBlock(in_channels, num_classes)
            if getattr(self.context, "needs_object_regions", False)
            else None
        )
        self.classifiers = nn.ModuleList(ConvBlock(channels, num_classes) for _ in range(num_levels))

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        auxiliary = self.auxiliary(x) if self.auxiliary is not None else None
        regions = [] if auxiliary is None else [auxiliary]  # OCR's soft object regions, from X
        levels = self.context(self.project(x), self.num_levels, *regions)
        semantic = [classify(level) for classify, level in zip(self.classifiers, levels, strict=True)]
        return semantic, auxiliary


class FCNHead(nn.Sequential):
    """The plain single-output baseline, HRNet's segmentation head (the "HRNet48" row of Table 5):
    Conv1x1-BN-ReLU (D -> channels, default D) then Conv1x1 to the C class logits."""

    def __init__(self, in_channels: int, num_classes: int, channels: int | None = None) -> None:
        channels = channels or in_channels
        super().__init__(conv_bn_relu(in_channels, channels), nn.Conv2d(channels, num_classes, 1))
