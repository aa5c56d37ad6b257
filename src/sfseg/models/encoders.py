"""Encoders: how a timm model gives its features to the decoder (encoder -> neck -> decoder, DESIGN 2).

An `Encoder` says how to build the timm model (the backbone's `body`) and how to call it: images
[B, 3, H, W] -> maps [B, C_i, H/s_i, W/s_i], with their channels and strides.

  HRNetBranches  hrnet_*: HRNet's four raw branches at strides 4..32 (timm's default `features_only`
                 HRNet maps are the classification "incre" features, not these);
  TimmStages     resnet101, resnet101c and any hierarchical timm model: its last feature at each of
                 strides 4, 8, 16, 32 (read from timm's feature_info), NCHW or, as Swin's, NHWC;
  PlainViT       any plain timm ViT that `forward_intermediates` serves (DINOv2, DINOv3, DeiT, EVA, ...):
                 the tokens of the blocks `model.backbone.layers`, as maps at the patch stride (the ViT
                 neck, models/necks.py, makes strides 4..32 of them);
  LocalResNet    `local`: resnet10t up to its first stage, one stride-4 map with a 31 px receptive field.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from sfseg.pyramid import FINEST_STRIDE

PYRAMID_STRIDES = (4, 8, 16, 32)  # the strides every decoder reads, as HRNet's four branches
STAGES = (1, 2, 3, 4)  # timm feature indices of strides 4, 8, 16, 32 (HRNet, ResNet)
# DINOv2's multi-layer protocol (its "+ms" segmentation head, out_indices [8, 9, 10, 11] of ViT-S/B): the
# tokens of the last four blocks. model.backbone.layers=null means these.
DEFAULT_VIT_LAYERS = (-4, -3, -2, -1)


@dataclass
class Encoder:
    """How the timm model `body` gives the decoder its maps: `features(body, images)` returns one map per
    entry of `channels` and `strides`. H and W must be multiples of `size_divisor`."""

    channels: list[int]
    strides: list[int]
    size_divisor: int = 32

    def features(self, body: nn.Module, images: Tensor) -> list[Tensor]:
        return body(images)


class HRNetBranches(Encoder):
    """HRNetV2's features: the four raw branches (W48: 48, 96, 192, 384 channels at strides 4..32).
    H and W must be multiples of 32: the branches' fusion upsamples by exact factors."""

    timm_kwargs: ClassVar[dict[str, Any]] = {"out_indices": STAGES, "feature_location": ""}


@dataclass
class TimmStages(Encoder):
    """A hierarchical timm encoder: its last feature at each of strides 4, 8, 16, 32. Swin's come
    channels-last (timm's output_fmt NHWC) and are permuted to NCHW."""

    channels_last: bool = False

    def features(self, body: nn.Module, images: Tensor) -> list[Tensor]:
        features = body(images)
        return [f.permute(0, 3, 1, 2) for f in features] if self.channels_last else features


@dataclass
class PlainViT(Encoder):
    """A plain ViT: the tokens of `layers` (block indices, ascending), each through the ViT's final norm
    (DINOv2's get_intermediate_layers(norm=True)), as maps [B, C, ceil(H/p), ceil(W/p)] at the patch
    stride p. timm's forward_intermediates drops the prefix tokens (class, registers, distillation), so
    they never reach the maps. Images are padded with zeros at the right and the bottom to a multiple of
    p: the token grid then starts at the image's top-left corner (token (i, j) covers pixels
    [p*i, p*i + p) x [p*j, p*j + p)), which keeps the maps aligned with the image without an offset."""

    patch_size: int = 16
    layers: tuple[int, ...] = field(default=DEFAULT_VIT_LAYERS)

    def features(self, body: nn.Module, images: Tensor) -> list[Tensor]:
        height, width = images.shape[-2:]
        pad_bottom, pad_right = (-height) % self.patch_size, (-width) % self.patch_size
        if pad_bottom or pad_right:
            images = F.pad(images, (0, pad_right, 0, pad_bottom))
        return body(images)


@dataclass
class LocalResNet(Encoder):
    """A bounded receptive field: timm's resnet10t up to its first stage (a deep stem of three 3x3
    convolutions, a 3x3 max pool, one basic block), whose stride-4 map (64 channels) is a function of a
    31 x 31 pixel square of the image only. With no decoder after it (model/decoder=concat of one map),
    anything wider than that square a prediction can only get from the pyramid's pooling (Eq. 3) or a
    context module."""

    size_divisor: int = FINEST_STRIDE
    timm_model: ClassVar[str] = "resnet10t"
    receptive_field: ClassVar[int] = 31  # pixels; tests/test_mechanism.py measures it
    timm_kwargs: ClassVar[dict[str, Any]] = {"out_indices": (1,)}


# model.backbone.name -> sfseg's own encoder; any other name is a timm model (`timm_encoder`).
SFSEG_ENCODERS: dict[str, type[Encoder]] = {
    "hrnet_w18_small": HRNetBranches,
    "hrnet_w18_small_v2": HRNetBranches,  # the official "HRNet-W18-Small-v2" release
    "hrnet_w18": HRNetBranches,
    "hrnet_w32": HRNetBranches,
    "hrnet_w48": HRNetBranches,
    "resnet101": TimmStages,
    "resnet101c": TimmStages,  # deep stem: mmsegmentation's ResNetV1c
    "local": LocalResNet,
}


@dataclass(frozen=True)
class EncoderPlan:
    """What `create_encoder` builds: the timm model and its arguments, and the encoder's kind."""

    kind: type[Encoder]
    timm_name: str
    kwargs: dict[str, Any]
    layers: tuple[int, ...] | None = None  # a plain ViT's blocks, non-negative and ascending


def plan_encoder(name: str, layers: Sequence[int] | None = None) -> EncoderPlan:
    """How backbone `name` is built: one of SFSEG_ENCODERS, or any timm model (`timm_encoder`).
    `layers` (model.backbone.layers) applies to plain ViTs only."""
    if name in SFSEG_ENCODERS:
        kind = SFSEG_ENCODERS[name]
        if layers is not None:
            raise ValueError(
                f"model.backbone.layers applies to plain ViTs only; model.backbone.name={name!r} gives its "
                "maps by stride: leave it null"
            )
        kwargs = dict(getattr(kind, "timm_kwargs", {"out_indices": STAGES}))
        return EncoderPlan(kind, getattr(kind, "timm_model", name), kwargs)
    return timm_encoder(name, layers)


def create_encoder(plan: EncoderPlan, body: nn.Module) -> Encoder:
    """The encoder of `plan` around its built timm model `body` (channels and strides from its feature_info)."""
    info = body.feature_info
    channels, strides = info.channels(), info.reduction()
    if plan.kind is PlainViT:
        return PlainViT(
            channels,
            strides,
            size_divisor=math.lcm(*PYRAMID_STRIDES),
            patch_size=strides[0],
            layers=plan.layers,
        )
    if plan.kind is TimmStages:
        return TimmStages(
            channels, strides, math.lcm(*strides), getattr(body, "output_fmt", "NCHW") == "NHWC"
        )
    return plan.kind(channels, strides, math.lcm(*strides))


def build_body(plan: EncoderPlan, pretrained: bool) -> nn.Module:
    """timm.create_model for `plan`: a features_only model, or for a plain ViT the model wrapped by timm's
    FeatureGetterNet with the final norm kept (features_only would prune it)."""
    if plan.kind is PlainViT:
        model = timm.create_model(plan.timm_name, pretrained=pretrained, **plan.kwargs)
        return FeatureGetterNet(model, out_indices=list(plan.layers), norm=True)
    return timm.create_model(plan.timm_name, pretrained=pretrained, features_only=True, **plan.kwargs)


def timm_encoder(name: str, layers: Sequence[int] | None = None) -> EncoderPlan:
    """How the timm model `name` gives the decoder maps at strides 4, 8, 16, 32. A hierarchical encoder:
    its last feature at each of these strides (out_indices into its feature_info). A plain ViT (one
    stride for all its features, one feature per block): the blocks `layers` (None: the last four). A
    model timm builds for one input size gets dynamic_img_size. The feature_info is read from the model
    built on the meta device (no memory, no initialisation). A model that cannot give the maps is an
    error naming it and saying why."""
    where = f"model.backbone.name={name!r}"
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"{where} is neither one of sfseg's backbones ({', '.join(SFSEG_ENCODERS)}) nor a timm model"
            + (f"; close timm names: {', '.join(close)}" if close else "")
            + " (timm.list_models('<pattern>') lists them)"
        )
    kwargs: dict[str, Any] = {}
    config = timm.get_pretrained_cfg(name)
    if config is not None and config.fixed_input_size:
        kwargs["dynamic_img_size"] = True
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        height, width = config.input_size[1:]
        raise ValueError(
            f"{where}: timm builds this model for its {height}x{width} input only (it takes no "
            "dynamic_img_size), but segmentation feeds crops and whole images of any size divisible by 32"
        ) from err
    reductions = [feature["reduction"] for feature in getattr(model, "feature_info", None) or []]
    if not reductions:
        raise ValueError(
            f"{where}: timm gives no feature_info for this model, so it cannot return intermediate features "
            "(features_only); choose a model with a feature pyramid (e.g. convnext_tiny, swin_tiny_patch4_window7_224)"
        )
    if len(set(reductions)) == 1:
        return EncoderPlan(PlainViT, name, kwargs, vit_layers(name, layers, len(reductions), reductions[0]))
    if layers is not None:
        raise ValueError(
            f"model.backbone.layers applies to plain ViTs only; {where} is a hierarchical encoder (features "
            f"at strides {sorted(set(reductions))}) whose maps are chosen by stride: leave it null"
        )
    missing = [stride for stride in PYRAMID_STRIDES if stride not in reductions]
    if missing:
        raise ValueError(
            f"{where}: its features (timm's feature_info) have strides {sorted(set(reductions))}, none at "
            f"{', '.join(map(str, missing))}; the decoder needs one at each of strides {PYRAMID_STRIDES}"
        )
    last_at = {stride: index for index, stride in enumerate(reductions)}
    return EncoderPlan(
        TimmStages, name, {**kwargs, "out_indices": tuple(last_at[stride] for stride in PYRAMID_STRIDES)}
    )


def vit_layers(name: str, layers: Sequence[int] | None, depth: int, patch: int) -> tuple[int, ...]:
    """model.backbone.layers of the plain ViT `name` (`depth` blocks, patch stride `patch`) as ascending
    non-negative block indices; None: the last four (DINOv2's protocol), or all blocks of a shallower one."""
    where = f"model.backbone.name={name!r}"
    if patch > max(PYRAMID_STRIDES):
        raise ValueError(
            f"{where}: its patch stride is {patch}, coarser than the pyramid's coarsest stride "
            f"{max(PYRAMID_STRIDES)}; the neck resamples tokens to a stride of at most {max(PYRAMID_STRIDES)}"
        )
    if layers is None:
        layers = DEFAULT_VIT_LAYERS[-depth:]
    if isinstance(layers, str | int) or not len(layers):
        raise ValueError(f"model.backbone.layers={layers!r} must be a non-empty list of block indices")
    outside = [index for index in layers if not (isinstance(index, int) and -depth <= index < depth)]
    if outside:
        raise ValueError(
            f"model.backbone.layers={list(layers)}: {outside} outside the {depth} blocks of {name!r} "
            f"(indices 0..{depth - 1}, or -{depth}..-1 counting from the last)"
        )
    resolved = sorted(index % depth for index in layers)
    if len(set(resolved)) < len(resolved):
        raise ValueError(
            f"model.backbone.layers={list(layers)} names a block twice ({depth} blocks: {resolved})"
        )
    return tuple(resolved)
