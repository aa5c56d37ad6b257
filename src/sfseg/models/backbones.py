"""Backbones: a timm encoder whose four stages are fused into one stride-4 feature X (DESIGN 2).

HRNetV2 concatenates HRNet's raw branches (timm's default `features_only` HRNet maps are the
classification "incre" features, not these). ResNet101 gets the light HRNet-style fusion decoder of
Sec. 5.1.2 so both backbones give D=720 at stride 4. `local` is a shallow encoder whose stride-4 map
sees only a bounded square of the image (the controlled experiment of `data=synthetic_context`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from sfseg.models.layers import conv_bn_relu
from sfseg.pyramid import FINEST_STRIDE

log = logging.getLogger(__name__)

STAGES = (1, 2, 3, 4)  # timm feature indices of strides 4, 8, 16, 32


def _concat_at_finest(features: list[Tensor]) -> Tensor:
    """Upsample every map bilinearly to the first (stride 4) one's size and concatenate channels."""
    size = features[0].shape[-2:]
    resized = [features[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]
    ]
    return torch.cat(resized, dim=1)


class Backbone(nn.Module):
    """images [B, 3, H, W] -> X [B, out_channels, H/4, W/4]; `body` is the timm features_only model."""

    stride: ClassVar[int] = FINEST_STRIDE
    # H and W must be multiples of the coarsest stage's stride: HRNet's branch fusion upsamples by
    # exact factors, and the fused map is then exactly H/4 x W/4.
    size_divisor: ClassVar[int] = 32
    # The timm model to build (None: the model.backbone.name itself) and the stages it returns.
    timm_model: ClassVar[str | None] = None
    out_indices: ClassVar[tuple[int, ...]] = STAGES
    timm_kwargs: ClassVar[dict[str, str]] = {}
    out_channels: int

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


class HRNetV2(Backbone):
    """HRNetV2 representation: the four branches at stride 4, concatenated (W48: 48+96+192+384=720)."""

    timm_kwargs: ClassVar[dict[str, str]] = {"feature_location": ""}

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body)
        self.out_channels = sum(body.feature_info.channels())

    def forward(self, images: Tensor) -> Tensor:
        return _concat_at_finest(self.body(images))


class ResNetFusion(Backbone):
    """ResNet stages reduced by Conv1x1-BN-ReLU to HRNet48's branch widths, upsampled to stride 4,
    concatenated and mixed by a Conv3x3-BN-ReLU: a stride-4 D=720 map without dilation."""

    reduced_channels: ClassVar[tuple[int, ...]] = (48, 96, 192, 384)

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body)
        self.out_channels = sum(self.reduced_channels)
        self.reduce = nn.ModuleList(
            conv_bn_relu(c_in, c_out)
            for c_in, c_out in zip(body.feature_info.channels(), self.reduced_channels, strict=True)
        )
        self.fuse = conv_bn_relu(self.out_channels, self.out_channels, kernel_size=3)

    def forward(self, images: Tensor) -> Tensor:
        stages = self.body(images)
        return self.fuse(
            _concat_at_finest([reduce(s) for reduce, s in zip(self.reduce, stages, strict=True)])
        )


class LocalResNet(Backbone):
    """A bounded receptive field: timm's resnet10t up to its first stage (a deep stem of three 3x3
    convolutions, a 3x3 max pool, one basic block), whose stride-4 map X (64 channels) is a function of
    a 31 x 31 pixel square of the image only. No later stage, no decoder: anything wider than that
    square a prediction can only get from the pyramid's pooling (Eq. 3) or a context module."""

    timm_model: ClassVar[str | None] = "resnet10t"
    out_indices: ClassVar[tuple[int, ...]] = (1,)
    size_divisor: ClassVar[int] = FINEST_STRIDE
    receptive_field: ClassVar[int] = 31  # pixels; tests/test_mechanism.py measures it

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body)
        self.out_channels = body.feature_info.channels()[-1]

    def forward(self, images: Tensor) -> Tensor:
        (x,) = self.body(images)
        return x


# model.backbone.name (the timm model name, or the name of a timm model's configuration) -> how its
# stages become X
BACKBONES: dict[str, type[Backbone]] = {
    "hrnet_w18_small": HRNetV2,
    "hrnet_w18": HRNetV2,
    "hrnet_w32": HRNetV2,
    "hrnet_w48": HRNetV2,
    "resnet101": ResNetFusion,
    "local": LocalResNet,
}


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None) -> Backbone:
    """Build backbone `name` (model.backbone.name).

    weights: a local state dict of the timm model `name` (torch.save'd .pth/.pt/.bin or .safetensors);
        when given it is loaded and `pretrained` is not consulted, so nothing is downloaded.
    pretrained: download timm's ImageNet weights from the Hugging Face hub.
    """
    if name not in BACKBONES:
        raise ValueError(
            f"model.backbone.name={name!r} is not a backbone; choose one of {', '.join(BACKBONES)}"
        )
    kind = BACKBONES[name]
    timm_name = kind.timm_model or name
    kwargs = {"features_only": True, "out_indices": kind.out_indices, **kind.timm_kwargs}
    if weights is not None:
        body = timm.create_model(timm_name, pretrained=False, **kwargs)
        load_weights(body, weights, timm_name)
    elif pretrained:
        try:
            body = timm.create_model(timm_name, pretrained=True, **kwargs)
        except OSError as err:  # the hub's and urllib's network and missing-file errors are all OSErrors
            raise RuntimeError(
                f"could not fetch pretrained weights for model.backbone.name={name!r}: the Hugging Face hub "
                f"could not be reached ({type(err).__name__}). Without network, download timm's {timm_name!r} "
                "weights elsewhere and set model.backbone.weights=<path to a local file> (.pth/.bin or "
                ".safetensors), or train from scratch with model.backbone.pretrained=false"
            ) from err
    else:
        body = timm.create_model(timm_name, pretrained=False, **kwargs)
    return kind(body)


def load_weights(body: nn.Module, path: str | Path, name: str) -> None:
    """Load a local state dict into the timm model `body` of backbone `name` (model.backbone.weights).

    Non-strict, because a classification checkpoint carries head tensors that features_only models
    drop; the counts are logged, and a file that fits none of the backbone is an error.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.backbone.weights={str(path)!r}: no such file")
    state = (
        load_file(file)
        if file.suffix == ".safetensors"
        else torch.load(file, map_location="cpu", weights_only=True)
    )
    names = set(body.state_dict())
    try:
        result = body.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        raise ValueError(
            f"model.backbone.weights={str(path)!r} does not fit backbone {name!r}: {err}"
        ) from err
    loaded = len(names.intersection(state))
    if loaded == 0:
        raise ValueError(
            f"model.backbone.weights={str(path)!r}: none of its {len(state)} tensors match the names of "
            f"backbone {name!r}; is it a state dict of timm's {name!r}?"
        )
    report = (
        f"backbone {name!r}: loaded {loaded}/{len(names)} tensors from {file}; "
        f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected (ignored)"
    )
    if result.missing_keys:
        log.warning("%s; missing tensors keep their random init: %s", report, result.missing_keys[:5])
    else:
        log.info(report)
