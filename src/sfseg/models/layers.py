"""Building blocks shared by the backbones, the heads and the context modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dims: int = 2) -> nn.Sequential:
    """Conv-BN-ReLU on feature maps (dims=2) or on token sequences [B, C, N] (dims=1)."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


def _bin_averages(length: int, bins: int, like: Tensor) -> Tensor:
    """[bins, length]: row i averages positions floor(i*length/bins) .. ceil((i+1)*length/bins)-1,
    the windows of torch's adaptive average pooling."""
    index = torch.arange(bins, device=like.device)
    start = index * length // bins
    end = ((index + 1) * length + bins - 1) // bins
    positions = torch.arange(length, device=like.device)
    inside = (positions >= start[:, None]) & (positions < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d(x: Tensor, bins: int) -> Tensor:
    """F.adaptive_avg_pool2d(x, bins) on [B, C, H, W], as two products with averaging matrices.

    The windows are computed from the input size inside the graph, so an exported model (ONNX, which
    has no adaptive pooling) pools correctly at every input size; the exporter's own decomposition
    fixes the windows of the example input and then fails or is wrong at other sizes.
    """
    height, width = x.shape[-2:]
    return _bin_averages(height, bins, x) @ x @ _bin_averages(width, bins, x).transpose(0, 1)
