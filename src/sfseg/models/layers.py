"""Building blocks shared by the backbones, the heads and the context modules."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dims: int = 2) -> nn.Sequential:
    """Conv-BN-ReLU on feature maps (dims=2) or on token sequences [B, C, N] (dims=1)."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )
