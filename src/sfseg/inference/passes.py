"""Inference passes over normalised image batches: whole image (padded to the model's size divisor
and cropped back), sliding window, and multi-scale + flip (softmax averaged at the original size).

Each pass is sparse by default (`sparse=True`, `eval.sparse_inference`): the fused output only needs
each level's logits where the fuse keeps them, so `PyramidSegmenter.sparse_forward` computes the
levels' per-cell work there only. The fused logits and level map are the dense path's. Only the hard
fuse (Eq. 2) allows it: the soft and learned fuses read every level at every cell, so a net with one
of those rules (or Eq. 2 with bilinear Up(), which reads neighbouring cells) runs dense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfseg.data.transforms import size_pair
from sfseg.inference.pixels import InputView, fused_logits, pad_images, upsample
from sfseg.pyramid import FuseRule

EVAL_MODES = ("whole", "slide")


@dataclass(frozen=True)
class InferenceSettings:
    """How a prediction is made (the `eval` group of conf/eval.yaml)."""

    mode: str = "whole"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    fuse: bool = True
    sparse: bool = True

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval.mode={self.mode!r} is not one of {', '.join(EVAL_MODES)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(
                f"eval.scales must be a non-empty list of positive factors, got {list(self.scales)}"
            )
        if any(step > crop for step, crop in zip(self.stride, self.crop_size, strict=True)):
            raise ValueError(
                f"eval.stride={list(self.stride)} must not exceed eval.crop_size={list(self.crop_size)} "
                "(pixels between windows would get no prediction)"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> InferenceSettings:
        return cls(
            mode=cfg.mode,
            crop_size=size_pair(cfg.crop_size, "eval.crop_size"),
            stride=size_pair(cfg.stride, "eval.stride"),
            scales=tuple(float(scale) for scale in cfg.scales),
            flip=bool(cfg.flip),
            fuse=bool(cfg.fuse),
            sparse=bool(cfg.sparse_inference),
        )

    @property
    def single_pass(self) -> bool:
        """One whole-image pass at the original scale."""
        return self.mode == "whole" and self.scales == (1.0,) and not self.flip

    def describe(self) -> str:
        mode = self.mode
        if mode == "slide":
            mode += f" {list(self.crop_size)} windows every {list(self.stride)}"
        flip = "flip" if self.flip else "no flip"
        output = "fused" if self.fuse else "finest level only"
        if self.fuse:
            output += ", sparse" if self.sparse else ", dense"
        return f"{mode}, scales {list(self.scales)}, {flip}, {output}"


def image_logits(
    net: nn.Module, images: Tensor, tau: float, fuse_levels: bool = True, sparse: bool = True
) -> tuple[Tensor, Tensor]:
    """One forward of `net` (a PyramidSegmenter) on images whose size it accepts: the fused logits at
    the image size [B, C, H, W] (with the net's fuse rule) and the level map [B, h_L, w_L].

    sparse: compute each level only where the fuse keeps it (`sparse_forward`), same result. The
    finest-only output (fuse_levels=False), nets without a sparse forward and nets whose fuse rule
    reads every level at every cell (`sparse_applies`) run dense.
    """
    out = net.sparse_forward(images, tau) if sparse and fuse_levels and sparse_applies(net) else net(images)
    return fused_logits(out, images.shape[-2:], tau, fuse_levels, getattr(net, "fuse_rule", FuseRule()))


def sparse_applies(net: nn.Module) -> bool:
    """Whether sparse inference can compute `net`'s fused output: it has a sparse forward and its fuse
    rule takes each finest cell from one level's own cell that the unity pyramid picks
    (`FuseRule.sparse`: Eq. 2 with nearest Up())."""
    return hasattr(net, "sparse_forward") and getattr(net, "fuse_rule", FuseRule()).sparse


def whole_logits(
    net: nn.Module,
    images: Tensor,
    tau: float,
    fuse_levels: bool = True,
    sparse: bool = True,
    scale: float = 1.0,
) -> Tensor:
    """Logits [B, C, H, W] of the whole image: resized by `scale` (the model's test scale), padded to
    the model's size divisor, and brought back to H x W (`InputView`)."""
    view = InputView.of(images.shape[-2:], scale, net.size_divisor)
    logits, _ = image_logits(net, view.images(images), tau, fuse_levels, sparse)
    return view.restore(logits)


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Window offsets along one side: every `step`, the last one flush with the end."""
    last = max(length - window, 0)
    return sorted({min(index * step, last) for index in range(-(-last // step) + 1)})


def slide_logits(
    net: nn.Module,
    images: Tensor,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
    tau: float,
    fuse_levels: bool = True,
    sparse: bool = True,
) -> Tensor:
    """Logits [B, C, H, W] averaged over crop_size windows every `stride` pixels; an image smaller
    than a window is padded to it. Each window is predicted whole (fused within the window)."""
    if any(side % net.size_divisor for side in crop_size):
        raise ValueError(
            f"eval.crop_size={list(crop_size)} must be a multiple of the model's size divisor {net.size_divisor}"
        )
    height, width = images.shape[-2:]
    (crop_h, crop_w), (step_h, step_w) = crop_size, stride
    padded = pad_images(images, max(height, crop_h), max(width, crop_w))
    total: Tensor | None = None
    count = torch.zeros(padded.shape[-2:], device=images.device)
    for top in window_starts(padded.shape[-2], crop_h, step_h):
        for left in window_starts(padded.shape[-1], crop_w, step_w):
            window = padded[..., top : top + crop_h, left : left + crop_w]
            logits, _ = image_logits(net, window, tau, fuse_levels, sparse)
            if total is None:
                total = logits.new_zeros(logits.shape[:2] + padded.shape[-2:])
            total[..., top : top + crop_h, left : left + crop_w] += logits
            count[top : top + crop_h, left : left + crop_w] += 1
    return (total / count)[..., :height, :width]


def predict_logits(net: nn.Module, images: Tensor, settings: InferenceSettings, tau: float) -> Tensor:
    """Logits [B, C, H, W] at the images' own size, whole or sliding-window as `settings.mode` says."""
    if settings.mode == "slide":
        return slide_logits(
            net, images, settings.crop_size, settings.stride, tau, settings.fuse, settings.sparse
        )
    return whole_logits(net, images, tau, settings.fuse, settings.sparse)


def tta_probabilities(
    net: nn.Module, images: Tensor, settings: InferenceSettings, tau: float, test_scale: float = 1.0
) -> Tensor:
    """Softmax probabilities [B, C, H, W] averaged over `settings.scales` (x flip), each taken at the
    original resolution: the logits of a rescaled (and flipped) image are flipped back and resized
    bilinearly to H x W before the softmax. The scales are relative to the model's `test_scale`
    (mmsegmentation's ratios of its test Resize): scale s resizes the image by s x test_scale."""
    height, width = images.shape[-2:]
    total: Tensor | None = None
    views = 0
    for scale in settings.scales:
        scale *= test_scale
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images
        if size != (height, width):
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if settings.flip else (False,):
            logits = predict_logits(net, scaled.flip(-1) if flipped else scaled, settings, tau)
            if flipped:
                logits = logits.flip(-1)
            probabilities = upsample(logits, (height, width)).softmax(1)
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views
