"""The unity head (Sec. 4.1), the semantic pyramid head (Sec. 4.2), the learned fuse's gate
(model/fuse=learned, docs/fuse.md) and the plain FCN baseline head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfseg.models.context import DeferredLevel, build_context, deferred_levels
from sfseg.models.layers import conv_bn_relu
from sfseg.pyramid import fuse_features, repeat_cells, soft_level_log_weights, upsample_levels


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


class FuseGate(nn.Module):
    """The learned fuse (model/fuse=learned): per finest cell, logits over the L levels whose softmax
    weighs the levels' class probabilities (`pyramid.fuse(..., rule="learned")`).

    It reads the pyramids detached (`pyramid.fuse_features`: each level's confidence, entropy,
    agreement with the finest level and unity probability, the levels' maps brought to the finest cells
    by `upsample`, the fuse's Up()), so training it leaves the pyramids as they are. A per-cell MLP whose
    output is added to the soft fuse's log weights; its last layer starts at zero, so an untrained gate
    is the soft fuse, and training learns where to trust which level more (docs/fuse.md). Needs L >= 2.
    """

    def __init__(self, num_levels: int, hidden_channels: int = 32, upsample: str = "bilinear") -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(
                f"model/fuse=learned needs model.levels >= 2 (levels to choose from), got {num_levels}"
            )
        if hidden_channels < 1:
            raise ValueError(f"model.fuse.hidden_channels must be >= 1, got {hidden_channels}")
        self.num_levels = num_levels
        self.upsample = upsample
        features = 4 * num_levels - 2
        self.mlp = nn.Sequential(
            # The features differ in scale (a unity probability near 0 or 1, a small entropy): normalised,
            # the gate learns several times faster under SGD (docs/fuse.md).
            nn.BatchNorm2d(features),
            nn.Conv2d(features, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, num_levels, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, semantic: list[Tensor], unity: list[Tensor]) -> Tensor:
        """Level logits [B, L, h_L, w_L] (float32) from the pyramids' logits."""
        semantic = [logits.detach() for logits in semantic]
        unity = [logits.detach() for logits in unity]
        probabilities = [logits.softmax(1) for logits in upsample_levels(semantic, self.upsample)]
        prior = soft_level_log_weights(unity, self.num_levels)
        return prior + self.mlp(fuse_features(probabilities, unity)).float()


class CellGather:
    """The cells a boolean mask [B, h, w] picks, gathered from [B, D, h, w] maps into a [B, D, M, 1]
    map (M: the most cells one image has; the other images' rows are padded, so per-image work such as
    attention stays one batched call) and scattered back. Index tensors only, no loops."""

    def __init__(self, mask: Tensor) -> None:
        batch, height, width = mask.shape
        self.size = (height, width)
        flat = mask.flatten(1)
        counts = flat.sum(1)
        image, position = flat.nonzero(as_tuple=True)  # by image, then row-major
        self.count = position.numel()
        slot = torch.arange(self.count, device=mask.device) - (counts.cumsum(0) - counts)[image]
        # Each image's cell positions, padded with h*w: one past the last cell, a slot to scatter into
        # and drop. Gathering reads a real cell there instead; its result is dropped alike.
        self.positions = torch.full(
            (batch, int(counts.max()) if batch else 0), height * width, device=mask.device
        )
        self.positions[image, slot] = position

    def __len__(self) -> int:
        return self.count

    def gather(self, maps: Tensor) -> Tensor:
        """[B, D, h, w] -> [B, D, M, 1]."""
        index = self.positions.clamp(max=self.size[0] * self.size[1] - 1)
        return maps.flatten(2).gather(2, index.unsqueeze(1).expand(-1, maps.shape[1], -1)).unsqueeze(-1)

    def scatter(self, values: Tensor) -> Tensor:
        """[B, C, M, 1] -> [B, C, h, w], zero outside the cells."""
        batch, channels = values.shape[:2]
        cells = self.size[0] * self.size[1]
        out = values.new_zeros(batch, channels, cells + 1)
        out.scatter_(2, self.positions.unsqueeze(1).expand(-1, channels, -1), values.flatten(2))
        return out[..., :cells].unflatten(2, self.size)


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
        projected, auxiliary = self.context_inputs(x)
        regions = [] if auxiliary is None else [auxiliary]  # OCR's soft object regions, from X
        levels = self.context(projected, self.num_levels, *regions)
        semantic = [classify(level) for classify, level in zip(self.classifiers, levels, strict=True)]
        return semantic, auxiliary

    def context_inputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """What the context module reads of X: X^(L) = Conv1x1-BN-ReLU(X), and with OCR the auxiliary
        class logits (the soft object regions; None for the other modules)."""
        auxiliary = self.auxiliary(x) if self.auxiliary is not None else None
        return self.project(x), auxiliary

    def sparse_forward(
        self, projected: Tensor, kept: list[Tensor], auxiliary: Tensor | None = None
    ) -> list[Tensor]:
        """Inference: Y^(l) [B, C, h_l, w_l] computed at the `kept` cells of each level only ([B, h_l, w_l]
        masks, coarse to fine), zero elsewhere. `projected` and `auxiliary` are `context_inputs(X)`. Each
        ConvBlock, and each per-cell step the context module defers, runs on the kept cells alone."""
        regions = [] if auxiliary is None else [auxiliary]
        levels = deferred_levels(self.context, projected, self.num_levels, *regions)
        logits = []
        for classify, mask in zip(self.classifiers, kept, strict=True):
            level = levels.pop(0)  # dropped once used: no full-resolution map outlives its level
            features = level.features if isinstance(level, DeferredLevel) else level
            cells = CellGather(mask)
            if not len(cells):  # the fuse reads nothing of this level
                logits.append(features.new_zeros(mask.shape[0], classify[-1].out_channels, *mask.shape[1:]))
                continue
            features = cells.gather(features)
            if isinstance(level, DeferredLevel):
                features = level.step(features)
            logits.append(cells.scatter(classify(features)))
        return logits


class FCNHead(nn.Sequential):
    """The plain single-output baseline, HRNet's segmentation head (the "HRNet48" row of Table 5):
    Conv1x1-BN-ReLU (D -> channels, default D) then Conv1x1 to the C class logits."""

    def __init__(self, in_channels: int, num_classes: int, channels: int | None = None) -> None:
        channels = channels or in_channels
        super().__init__(conv_bn_relu(in_channels, channels), nn.Conv2d(channels, num_classes, 1))
