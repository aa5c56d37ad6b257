"""Decoders (`model/decoder`): the encoder's maps at strides 4, 8, 16, 32 -> X, one stride-4 map of D
channels that the unity and semantic heads read (encoder -> neck -> decoder -> heads, DESIGN 2).

  hrnet      the paper's (Sec. 5.1.2) light HRNet-style fusion: each map reduced by Conv1x1-BN-ReLU to a
             width proportional to its stride (at D=720 HRNet-W48's branch widths 48, 96, 192, 384),
             upsampled to stride 4, concatenated and mixed by a Conv3x3-BN-ReLU;
  concat     HRNetV2's representation: the maps upsampled to stride 4 and concatenated, no parameters
             (D = their widths summed; the HRNets' and `local`'s);
  segformer  SegFormer's all-MLP decoder (Xie et al., 2021): a Linear per map to D, upsampled to stride
             4, concatenated, Linear-BN-ReLU from 4D to D;
  fpn        a top-down FPN (Lin et al., 2017): a lateral Conv1x1 per map to D, coarse to fine each added
             to its coarser neighbour upsampled (nearest), then a Conv3x3-BN-ReLU on the stride-4 sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfseg.models.layers import conv_bn_relu


def upsampled_to(x: Tensor, size: torch.Size, mode: str = "bilinear") -> Tensor:
    """x resized to `size` (the stride-4 map's), bilinearly with align_corners=False: cell centres on
    cell centres, so an exact factor of two puts each coarse cell on its 2x2 finer cells."""
    if x.shape[-2:] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """maps [B, C_i, H/s_i, W/s_i] (finest first) -> X [B, out_channels, H/s_0, W/s_0]."""

    default_channels: ClassVar[int | None] = 256
    out_channels: int


class HRNetFusion(Decoder):
    """The light HRNet-style fusion decoder of Sec. 5.1.2, whose parameter names (reduce, fuse) the
    paper's checkpoints hold: the widths split `channels` over the maps in proportion to their strides
    (1:2:4:8 for strides 4..32: 48, 96, 192, 384 at 720), so X is a stride-4 map without dilation."""

    default_channels: ClassVar[int | None] = 720

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int) -> None:
        super().__init__()
        if any(channels * stride % sum(strides) for stride in strides):
            raise ValueError(
                f"model.decoder.channels={channels}: the hrnet decoder splits its width over the strides "
                f"{list(strides)} in proportion to them, so it must be a multiple of "
                f"{sum(strides) // math.gcd(*strides)} (720: HRNet-W48's 48, 96, 192, 384)"
            )
        reduced = [channels * stride // sum(strides) for stride in strides]
        self.out_channels = channels
        self.reduce = nn.ModuleList(
            conv_bn_relu(c_in, c_out) for c_in, c_out in zip(in_channels, reduced, strict=True)
        )
        self.fuse = conv_bn_relu(channels, channels, kernel_size=3)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return self.fuse(concat_at_finest([reduce(x) for reduce, x in zip(self.reduce, maps, strict=True)]))


def concat_at_finest(maps: Sequence[Tensor]) -> Tensor:
    """Every map upsampled bilinearly to the first (stride 4) one's size, concatenated along channels."""
    size = maps[0].shape[-2:]
    return torch.cat([upsampled_to(x, size) for x in maps], dim=1)


class Concatenation(Decoder):
    """HRNetV2's representation: the maps upsampled to stride 4 and concatenated (HRNet-W48: 48 + 96 +
    192 + 384 = 720), no parameters; `local`'s single stride-4 map as it is."""

    default_channels: ClassVar[int | None] = None

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int | None) -> None:
        super().__init__()
        if channels is not None:
            raise ValueError(
                f"model.decoder.channels={channels}: the concat decoder's width is the encoder's maps' "
                f"widths summed ({sum(in_channels)} here); leave it null"
            )
        self.out_channels = sum(in_channels)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return concat_at_finest(maps)


class AllMLPDecoder(Decoder):
    """SegFormer's all-MLP decoder with its parameters: `linear` (one Linear, a Conv1x1 with bias, per map
    to D) and `fuse` (Linear-BN-ReLU from the concatenation, n*D, to D). Computed without the stride-4
    concatenation: both Linears are linear and bilinear upsampling commutes with a per-cell affine map
    (its weights sum to one), so fuse(concat(up(linear_i(x_i)))) = BN-ReLU(sum_i up(W_i x_i + b_i)) with
    W_i = W_fuse[:, i] @ W_linear_i and b_i = W_fuse[:, i] @ b_linear_i, each applied at its map's own
    stride. The same function and gradients, at a fraction of the cost."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.linear = nn.ModuleList(nn.Conv2d(c_in, channels, 1) for c_in in in_channels)
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        conv, norm, relu = self.fuse
        size = maps[0].shape[-2:]
        fused = None
        for index, (linear, x) in enumerate(zip(self.linear, maps, strict=True)):
            part = conv.weight[:, index * self.out_channels : (index + 1) * self.out_channels].flatten(1)
            weight = (part @ linear.weight.flatten(1))[..., None, None]
            term = upsampled_to(F.conv2d(x, weight, part @ linear.bias), size)
            fused = term if fused is None else fused + term
        return relu(norm(fused))


class TopDownFPN(Decoder):
    """A top-down FPN: `lateral` Conv1x1s (with bias) bring each map to D; from the coarsest down, each
    is added to its coarser neighbour's sum upsampled by nearest (FPN's top-down pathway); `smooth`, a
    Conv3x3-BN-ReLU, turns the stride-4 sum into X."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.lateral = nn.ModuleList(nn.Conv2d(c_in, channels, 1) for c_in in in_channels)
        self.smooth = conv_bn_relu(channels, channels, kernel_size=3)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        merged = self.lateral[-1](maps[-1])
        for lateral, x in zip(reversed(self.lateral[:-1]), reversed(maps[:-1]), strict=True):
            merged = lateral(x) + upsampled_to(merged, x.shape[-2:], mode="nearest")
        return self.smooth(merged)


DECODERS: dict[str, type[Decoder]] = {
    "hrnet": HRNetFusion,
    "concat": Concatenation,
    "segformer": AllMLPDecoder,
    "fpn": TopDownFPN,
}
DECODER_KEYS = {"name", "channels"}


def decoder_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """model.decoder checked: {"name": one of DECODERS, "channels": D or None (the decoder's default)}."""
    config = dict(config)
    name = config.get("name")
    if name not in DECODERS:
        raise ValueError(f"model.decoder.name={name!r} is not a decoder; choose one of {', '.join(DECODERS)}")
    unknown = set(config) - DECODER_KEYS
    if unknown:
        raise ValueError(f"model.decoder has unknown keys {sorted(unknown)}; allowed: {sorted(DECODER_KEYS)}")
    channels = config.get("channels", DECODERS[name].default_channels)
    if channels is None:
        channels = DECODERS[name].default_channels
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise ValueError(f"model.decoder.channels must be a whole number >= 1 (or null), got {channels!r}")
    return {"name": name, "channels": channels}


def build_decoder(config: Mapping[str, Any], in_channels: Sequence[int], strides: Sequence[int]) -> Decoder:
    """The decoder model.decoder names, for an encoder (or neck) with these maps, finest first."""
    config = decoder_config(config)
    return DECODERS[config["name"]](list(in_channels), list(strides), config["channels"])
