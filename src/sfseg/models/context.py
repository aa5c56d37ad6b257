"""Context modules of the semantic head (Sec. 4.2, Table 6).

Every module maps the projected backbone feature X^(L) [B, D_s, h_L, w_L] to the refined level
features X'^(1..L), coarse to fine, so the semantic head can swap them by name:
  none       Eq. 3 pooling only;
  anl        one ANL block on X^(L), then Eq. 3;
  anl_multi  Eq. 3, then one ANL block per level;
  c2f        Eq. 3, then the paper's coarse-to-fine CA/CU cascade (Eq. 4-11);
  ocr        one OCR block [27] on X^(L), then Eq. 3 (Table 5's "+ OCR" at L=1);
  ccnet      CCNet's recurrent criss-cross attention [13] on X^(L), then Eq. 3 (Table 5's "+ CCNet").
OCR also needs soft object regions: the semantic head computes them with an auxiliary classifier on
the backbone feature X and passes them in (`needs_object_regions`).

For sparse inference (`deferred_levels`), a module may hand over a level as a `DeferredLevel`: its
features X^(l) and the per-cell step (a CA with its context tokens fixed) that turns them into X'^(l)
when nothing but that level's ConvBlock reads X'^(l). The sparse path then runs the step on the cells
the fuse keeps only. A module without `deferred_levels` of its own (dense work, Eq. 3, then per-level
ConvBlocks, like `anl`, `ocr`, `ccnet`) gives its dense levels, and the sparse path still runs its
ConvBlocks sparsely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfseg.models.layers import adaptive_avg_pool2d, conv_bn_relu

PYRAMID_POOL_BINS = (1, 3, 6, 8)


def pool_levels(x: Tensor, num_levels: int) -> list[Tensor]:
    """Eq. 3: X^(l) = AvgPool(X^(L), 2^(L-l)), returned coarse to fine.

    Repeated 2x2 pooling equals one 2^(L-l) pooling on sizes divisible by 2^(L-1) and is cheaper.
    """
    levels = [x]
    for _ in range(num_levels - 1):
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels[::-1]


class PyramidPool(nn.Module):
    """Eq. 6 / Eq. 10: adaptive average pooling to each bin size, flattened and concatenated.

    [B, C, H, W] -> [B, C, 1 + 9 + 36 + 64 = 110] for the default bins, whatever H and W (adaptive
    pooling repeats pixels when H or W is smaller than a bin count).
    """

    def __init__(self, bins: tuple[int, ...] = PYRAMID_POOL_BINS) -> None:
        super().__init__()
        self.bins = tuple(bins)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([adaptive_avg_pool2d(x, b).flatten(2) for b in self.bins], dim=2)


def conv_bn_relu_of_pair(block: nn.Sequential, first: Tensor, second: Tensor) -> Tensor:
    """block(concat([first, second], dim=1)) for a bias-free Conv1x1-BN-ReLU block, without the
    concatenation buffer: W concat(a, b) = W[:, :C] a + W[:, C:] b, with the block's own parameters."""
    conv, norm, relu = block
    split = first.shape[1]
    convolve = F.conv2d if conv.weight.dim() == 4 else F.conv1d
    mixed = convolve(first, conv.weight[:, :split]) + convolve(second, conv.weight[:, split:])
    return relu(norm(mixed))


@dataclass(frozen=True)
class ContextTokens:
    """theta's N context tokens of each image as CA uses them, with CA's query projection and the
    attended half of its Conv1x1_agg folded in (both are linear, so Eq. 8-9 are unchanged):
    q.k = x.(W_q^T k) + b_q.k and W_agg[:, :D] Attention(.., v) = Attention(.., W_agg[:, :D] v).
    Per pixel that skips the D/2-channel query and a D x D matmul on X_att."""

    keys: Tensor  # [B, N, D_s]: the attention scale times W_q^T k_n
    bias: Tensor  # [B, N, 1]: the attention scale times b_q . k_n
    values: Tensor  # [B, D_s, N]: W_agg[:, :D_s] v_n


class ContextAggregation(nn.Module):
    """CA (Eq. 8-9): X attends to the context tokens theta, then Conv1x1-BN-ReLU on concat(X_att, X).

    Computed as `refine(x, tokens(theta))`: the per-image work on theta once, then the per-cell work,
    which runs on a whole map or on gathered cells ([B, D_s, N, 1]) alike. Neither the query, X_att
    nor the concatenation is materialised (see ContextTokens); the parameters are the paper's.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        key_channels = channels // 2
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv1d(channels, key_channels, 1)
        self.value = nn.Conv1d(channels, channels, 1)
        self.aggregate = conv_bn_relu(2 * channels, channels)  # Eq. 9: Conv1x1_agg, 2D_s -> D_s

    def tokens(self, theta: Tensor) -> ContextTokens:
        """The per-image part of Eq. 8-9 on the context tokens theta [B, D_s, N]."""
        key = self.key(theta).transpose(1, 2)  # [B, N, D_s/2]
        scale = key.shape[-1] ** -0.5  # scaled dot-product attention over the key channels
        channels = self.value.out_channels
        return ContextTokens(
            keys=key @ (self.query.weight.flatten(1) * scale),
            bias=(key @ (self.query.bias * scale)).unsqueeze(-1),
            values=self.aggregate[0].weight.flatten(1)[:, :channels] @ self.value(theta),
        )

    def refine(self, x: Tensor, tokens: ContextTokens) -> Tensor:
        """X' = CA(X, theta) for X [B, D_s, H, W], each cell on its own given its image's tokens."""
        conv, norm, relu = self.aggregate
        features = x.flatten(2)  # [B, D_s, HW]
        # Eq. 8: softmax over the N context positions of the scaled query-key products.
        weights = torch.baddbmm(tokens.bias, tokens.keys, features).softmax(dim=1)  # [B, N, HW]
        # Eq. 9 on concat(X_att, X), split: W_agg[:, D:] X + (W_agg[:, :D] V) weights.
        mixed = F.conv2d(x, conv.weight[:, x.shape[1] :])
        mixed = mixed + torch.bmm(tokens.values, weights).view_as(mixed)
        return relu(norm(mixed))

    def forward(self, x: Tensor, theta: Tensor) -> Tensor:
        return self.refine(x, self.tokens(theta))

    def deferred(self, x: Tensor, theta: Tensor) -> DeferredLevel:
        """CA(x, theta) left to be run on the cells that need it."""
        return DeferredLevel(x, partial(self.refine, tokens=self.tokens(theta)))


@dataclass(frozen=True)
class DeferredLevel:
    """A level X'^(l) = step(X^(l)) whose step treats each cell on its own (a CA with its context
    tokens fixed): the sparse path runs `step` on the kept cells gathered as a [B, D_s, N, 1] map;
    on the whole map it gives the dense X'^(l)."""

    features: Tensor  # X^(l) [B, D_s, h_l, w_l]
    step: Callable[[Tensor], Tensor]

    def dense(self) -> Tensor:
        return self.step(self.features)


class ContextUpdate(nn.Module):
    """CU (Eq. 10-11): theta = Conv1x1-BN-ReLU(concat(PyramidPool(X'), theta_prev)), on tokens."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = PyramidPool()
        self.update = conv_bn_relu(2 * channels, channels, dims=1)  # Eq. 11: Conv1x1_upd, 2D_s -> D_s

    def forward(self, refined: Tensor, theta: Tensor) -> Tensor:
        theta_init = self.pool(refined)  # Eq. 10
        return conv_bn_relu_of_pair(self.update, theta_init, theta)  # Eq. 11


class ANLBlock(nn.Module):
    """Asymmetric non-local block [34]: exactly CA(X, PyramidPool(X))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = PyramidPool()
        self.attend = ContextAggregation(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(x, self.pool(x))

    def deferred(self, x: Tensor) -> DeferredLevel:
        """The block with its PyramidPool done (it reads every cell), its CA left per cell."""
        return self.attend.deferred(x, self.pool(x))


class _PerLevelContext(nn.Module):
    """Base of the modules that own one block per level: their level count is fixed when built."""

    def __init__(self, num_levels: int) -> None:
        super().__init__()
        self.num_levels = num_levels

    def _check_levels(self, num_levels: int) -> None:
        if num_levels != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_levels} levels, called with {num_levels}"
            )


class NoContext(nn.Module):
    """Table 6 "-": the plain Eq. 3 pyramid."""

    def forward(self, x: Tensor, num_levels: int) -> list[Tensor]:
        return pool_levels(x, num_levels)


class SingleANL(nn.Module):
    """Table 6 "ANL": one ANL block on X^(L), then the Eq. 3 pyramid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ANLBlock(channels)

    def forward(self, x: Tensor, num_levels: int) -> list[Tensor]:
        return pool_levels(self.block(x), num_levels)


class MultiANL(_PerLevelContext):
    """Table 6 "ANL-multi": the Eq. 3 pyramid, then one ANL block on every level X^(l)."""

    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__(num_levels)
        self.blocks = nn.ModuleList(ANLBlock(channels) for _ in range(num_levels))

    def forward(self, x: Tensor, num_levels: int) -> list[Tensor]:
        return [level.dense() for level in self.deferred_levels(x, num_levels)]

    def deferred_levels(self, x: Tensor, num_levels: int) -> list[Tensor | DeferredLevel]:
        """Every level's CA only reads its own cells once its PyramidPool is done: all deferred."""
        self._check_levels(num_levels)
        return [
            block.deferred(level)
            for block, level in zip(self.blocks, pool_levels(x, num_levels), strict=True)
        ]


class CoarseToFineContext(_PerLevelContext):
    """Table 6 "ours": the coarse-to-fine contextual module (Eq. 4-6, Fig. 2c).

    theta^(0) = PyramidPool(X^(L)) (Eq. 6); for l = 1..L: X'^(l) = CA^(l)(X^(l), theta^(l-1)) (Eq. 4),
    theta^(l) = CU^(l)(X'^(l), theta^(l-1)) (Eq. 5). theta^(L) feeds nothing, so CU^(L) is not built
    (an unused module would also break DDP's gradient bookkeeping).
    """

    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__(num_levels)
        self.pool = PyramidPool()
        self.aggregate = nn.ModuleList(ContextAggregation(channels) for _ in range(num_levels))
        self.update = nn.ModuleList(ContextUpdate(channels) for _ in range(num_levels - 1))

    def forward(self, x: Tensor, num_levels: int) -> list[Tensor]:
        *coarser, finest = self.deferred_levels(x, num_levels)
        return [*coarser, finest.dense()]

    def deferred_levels(self, x: Tensor, num_levels: int) -> list[Tensor | DeferredLevel]:
        """X'^(1..L-1) dense, since CU^(l) pools every cell of X'^(l) (Eq. 10); CA^(L) deferred, as
        only ConvBlock^(L) reads X'^(L)."""
        self._check_levels(num_levels)
        theta = self.pool(x)  # Eq. 6
        *coarser, finest = pool_levels(x, num_levels)
        refined: list[Tensor | DeferredLevel] = []
        for level, features in enumerate(coarser):
            refined.append(self.aggregate[level](features, theta))  # Eq. 4
            theta = self.update[level](refined[-1], theta)  # Eq. 5
        refined.append(self.aggregate[-1].deferred(finest, theta))  # Eq. 4 at level L
        return refined


def object_centres(x: Tensor, regions: Tensor) -> Tensor:
    """OCR's SpatialGather: features [B, C, h, w] and region logits [B, K, h, w] -> one centre per
    region [B, C, K], the features averaged with softmax-over-pixels weights of the region's logits."""
    weights = torch.softmax(regions.flatten(2), dim=2)  # [B, K, hw]
    return torch.bmm(weights, x.flatten(2).transpose(1, 2)).transpose(1, 2)


class ObjectContext(nn.Module):
    """OCR [27] as in HRNet-OCR's head, on X^(L) (D_s = 512 mid channels), then the Eq. 3 pyramid.

    The soft object regions (auxiliary class logits [B, K, h, w]) weigh the pixels into one centre per
    class (SpatialGather: softmax over the pixels); every pixel attends to the K centres with
    key_channels (256) wide queries and keys (ObjectAttentionBlock), and Conv1x1-BN-ReLU + Dropout(0.05)
    on concat(context, X^(L)) gives the refined feature (SpatialOCR). HRNet-OCR's 3x3 conv from the
    backbone to the 512 mid channels is the semantic head's Conv1x1 projection here, as for every module.
    """

    needs_object_regions: ClassVar[bool] = True

    def __init__(self, channels: int, key_channels: int | None = None, dropout: float = 0.05) -> None:
        super().__init__()
        key_channels = key_channels or channels // 2
        self.query = nn.Sequential(
            conv_bn_relu(channels, key_channels), conv_bn_relu(key_channels, key_channels)
        )
        self.key = nn.Sequential(
            conv_bn_relu(channels, key_channels, dims=1), conv_bn_relu(key_channels, key_channels, dims=1)
        )
        self.value = conv_bn_relu(channels, key_channels, dims=1)
        self.up = conv_bn_relu(key_channels, channels)
        self.aggregate = nn.Sequential(conv_bn_relu(2 * channels, channels), nn.Dropout2d(dropout))

    def forward(self, x: Tensor, num_levels: int, regions: Tensor) -> list[Tensor]:
        batch, _, height, width = x.shape
        if regions.shape[0] != batch or regions.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"object regions {tuple(regions.shape)} do not cover the feature map {tuple(x.shape)}"
            )
        centres = object_centres(x, regions)
        query = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, hw, key]
        key = self.key(centres).transpose(1, 2).unsqueeze(1)  # [B, 1, K, key]
        value = self.value(centres).transpose(1, 2).unsqueeze(1)  # [B, 1, K, key]
        context = F.scaled_dot_product_attention(query, key, value)  # softmax(q k^T / sqrt(key)) v
        context = self.up(context.squeeze(1).transpose(1, 2).reshape(batch, -1, height, width))
        return pool_levels(self.aggregate(torch.cat([context, x], dim=1)), num_levels)


class CrissCrossAttention(nn.Module):
    """CCNet's criss-cross attention [13]: every pixel attends to the pixels of its row and of its
    column (itself once), with unscaled dot products; out = gamma * attended + x, gamma starting at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.key = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        query, key, value = self.query(x), self.key(x), self.value(x)
        # Energies of pixel (i, j) with its column (k, j) and with its row (i, k): [B, H, W, H] and [B, H, W, W].
        column = torch.einsum("bcij,bckj->bijk", query, key)
        row = torch.einsum("bcij,bcik->bijk", query, key)
        itself = torch.eye(height, dtype=torch.bool, device=x.device).view(height, 1, height)
        column = column.masked_fill(itself, float("-inf"))  # the pixel is counted in its row only
        attention = torch.softmax(torch.cat([column, row], dim=-1), dim=-1)
        attended = torch.einsum("bijk,bckj->bcij", attention[..., :height], value) + torch.einsum(
            "bijk,bcik->bcij", attention[..., height:], value
        )
        return self.gamma * attended + x


class CrissCrossContext(nn.Module):
    """CCNet's RCCA module [13] on X^(L) (in = out = D_s), then the Eq. 3 pyramid: Conv3x3-BN-ReLU to
    D_s/4 channels, criss-cross attention `recurrence` times with shared weights (2: every pixel reaches
    every other), Conv3x3-BN-ReLU, and Conv3x3-BN-ReLU + Dropout(0.1) from concat(X^(L), result) to D_s.
    CCNet's widths relative to its input (2048 -> 512, queries 64): at D_s = 512, 128 and 16."""

    def __init__(self, channels: int, recurrence: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        inner = max(channels // 4, 1)
        self.recurrence = recurrence
        self.reduce = conv_bn_relu(channels, inner, kernel_size=3)
        self.attention = CrissCrossAttention(inner)
        self.expand = conv_bn_relu(inner, inner, kernel_size=3)
        self.aggregate = nn.Sequential(
            conv_bn_relu(channels + inner, channels, kernel_size=3), nn.Dropout2d(dropout)
        )

    def forward(self, x: Tensor, num_levels: int) -> list[Tensor]:
        attended = self.reduce(x)
        for _ in range(self.recurrence):
            attended = self.attention(attended)
        attended = self.expand(attended)
        return pool_levels(self.aggregate(torch.cat([x, attended], dim=1)), num_levels)


# name -> factory(channels, num_levels)
CONTEXT_MODULES: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda channels, num_levels: NoContext(),
    "anl": lambda channels, num_levels: SingleANL(channels),
    "anl_multi": MultiANL,
    "c2f": CoarseToFineContext,
    "ocr": lambda channels, num_levels: ObjectContext(channels),
    "ccnet": lambda channels, num_levels: CrissCrossContext(channels),
}


def deferred_levels(
    context: nn.Module, x: Tensor, num_levels: int, *regions: Tensor
) -> list[Tensor | DeferredLevel]:
    """X'^(1..L) of `context` for the sparse path: each level's features, or a DeferredLevel where a
    per-cell step is all that stands between X^(l) and the ConvBlock. A module without a
    `deferred_levels` method of its own gives the levels of its (dense) forward. `regions`: OCR's."""
    own = getattr(context, "deferred_levels", None)
    return (own or context)(x, num_levels, *regions)


def build_context(name: str, channels: int, num_levels: int) -> nn.Module:
    """The context module `name` for D_s=`channels` and L=`num_levels` (model.context.name)."""
    if name not in CONTEXT_MODULES:
        raise ValueError(
            f"model.context.name={name!r} is not a context module; choose one of {', '.join(CONTEXT_MODULES)}"
        )
    return CONTEXT_MODULES[name](channels, num_levels)
