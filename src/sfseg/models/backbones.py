"""Backbones: a timm encoder whose four stages are fused into one stride-4 feature X (DESIGN 2).

HRNetV2 concatenates HRNet's raw branches (timm's default `features_only` HRNet maps are the
classification "incre" features, not these). ResNet101 gets the light HRNet-style fusion decoder of
Sec. 5.1.2 so both backbones give D=720 at stride 4. `local` is a shallow encoder whose stride-4 map
sees only a bounded square of the image (the controlled experiment of `data=synthetic_context`).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
    "hrnet_w18_small_v2": HRNetV2,  # the official "HRNet-W18-Small-v2" release
    "hrnet_w18": HRNetV2,
    "hrnet_w32": HRNetV2,
    "hrnet_w48": HRNetV2,
    "resnet101": ResNetFusion,
    "resnet101c": ResNetFusion,  # deep stem: mmsegmentation's ResNetV1c
    "local": LocalResNet,
}


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None) -> Backbone:
    """Build backbone `name` (model.backbone.name).

    weights: a local weights file (.pth/.pt/.bin or .safetensors): timm's state dict of `name`, or one
        of the layouts `remap_weights` knows; when given it is loaded and `pretrained` is not
        consulted, so nothing is downloaded.
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


# Tensors of the files users have that are no part of the backbone: HRNet's ImageNet classifier, the
# heads (and class-weighted loss) of HRNet-Semantic-Segmentation, torchvision's fc and mmsegmentation's
# decode heads. They are dropped and counted, not reported as unexpected.
HEAD_PREFIXES = (
    "incre_modules.",
    "downsamp_modules.",
    "final_layer.",
    "classifier.",
    "last_layer.",
    "conv3x3_ocr.",
    "ocr_gather_head.",
    "ocr_distri_head.",
    "cls_head.",
    "aux_head.",
    "loss.",
    "fc.",
    "decode_head.",
    "auxiliary_head.",
)
# DataParallel's and HRNet-Semantic-Segmentation's FullModel's wrappers around the network's names.
WRAPPER_PREFIXES = ("module.", "model.")
# mmsegmentation's ResNetV1c deep stem (stem.{0,3,6} convs, stem.{1,4,7} norms) in timm's deep-stem names.
MMSEG_DEEP_STEM = {
    "stem.0.": "conv1.0.",
    "stem.1.": "conv1.1.",
    "stem.3.": "conv1.3.",
    "stem.4.": "conv1.4.",
    "stem.6.": "conv1.6.",
    "stem.7.": "bn1.",
}
MIN_LOADED_SHARE = 0.95
SHOWN_NAMES = 12  # names listed per kind in the report and the errors


@dataclass
class RemappedWeights:
    """A weights file's tensors in the timm model's names, and the keys that are no part of it."""

    state: dict[str, Tensor]
    dropped: list[str]  # head tensors of the file's network (HEAD_PREFIXES), or besides mmseg's backbone.*


def remap_weights(checkpoint: Mapping[str, Any], deep_stem: bool) -> RemappedWeights:
    """Bring the layouts users have to timm's names (model.backbone.weights):
    a timm state dict; the official HRNet ImageNet release (same names as timm); an
    HRNet-Semantic-Segmentation checkpoint (`state_dict`, `model.`/`module.` prefixes, heads dropped);
    torchvision's ResNet (timm's names plus fc); mmsegmentation's checkpoints (`state_dict`, `backbone.`,
    and with `deep_stem` (resnet101c) the ResNetV1c `stem.*` keys)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"it holds a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError("its 'state_dict' entry is not a mapping of tensors")
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        renamed[key] = value
    dropped: list[str] = []
    if any(key.startswith("backbone.") for key in renamed):  # an mmsegmentation segmentor
        dropped = [key for key in renamed if not key.startswith("backbone.")]
        renamed = {
            key.removeprefix("backbone."): value for key, value in renamed.items() if key not in dropped
        }
    if any(key.startswith("stem.") for key in renamed):
        if not deep_stem:
            raise ValueError(
                "it has mmsegmentation's ResNetV1c deep stem (stem.*), which this backbone lacks; "
                "use model/backbone=resnet101c"
            )
        for old, new in MMSEG_DEEP_STEM.items():
            renamed = {
                new + key.removeprefix(old) if key.startswith(old) else key: v for key, v in renamed.items()
            }
    dropped += [key for key in renamed if key.startswith(HEAD_PREFIXES)]
    return RemappedWeights({k: v for k, v in renamed.items() if not k.startswith(HEAD_PREFIXES)}, dropped)


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_NAMES])
    return shown + (f" ... ({len(keys) - SHOWN_NAMES} more)" if len(keys) > SHOWN_NAMES else "")


def _read_weights_file(file: Path, where: str) -> dict[str, Any]:
    """The tensors of a .pth/.pt/.bin (torch.save, read with weights_only) or .safetensors file."""
    if not file.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    if file.suffix == ".safetensors":
        return load_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{where}: torch.load(weights_only=True) refuses the objects besides the tensors in this file. "
            "If you trust it, save its state dict alone: python -c \"import torch; c = torch.load('<file>', "
            "weights_only=False); torch.save(c.get('state_dict', c), '<new file>')\""
        ) from err


def load_weights(body: nn.Module, path: str | Path, name: str) -> None:
    """Load a local weights file into the timm model `body` of backbone `name` (model.backbone.weights).

    The file's keys are remapped (`remap_weights`); the log says how many of the backbone's tensors
    loaded and names the missing and unexpected ones. BatchNorm's num_batches_tracked counters do not
    count (older releases lack them). A shape mismatch, or fewer than 95 % of the backbone's tensors
    found, is an error naming the file and the keys.
    """
    file = Path(path).expanduser()
    where = f"model.backbone.weights={str(path)!r}"
    checkpoint = _read_weights_file(file, where)
    target = body.state_dict()
    try:
        remapped = remap_weights(checkpoint, deep_stem="conv1.0.weight" in target)
    except ValueError as err:
        raise ValueError(f"{where} does not fit backbone {name!r}: {err}") from err
    state = remapped.state
    mismatched = [
        f"{key} {tuple(state[key].shape)} (backbone {tuple(tensor.shape)})"
        for key, tensor in target.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if mismatched:
        raise ValueError(
            f"{where} does not fit backbone {name!r}: {len(mismatched)} tensors differ in shape: {_names(mismatched)}"
        )
    counted = [key for key in target if not key.endswith("num_batches_tracked")]
    missing = [key for key in counted if key not in state]
    unexpected = [key for key in state if key not in target]
    loaded = len(counted) - len(missing)
    report = (
        f"backbone {name!r}: loaded {loaded}/{len(counted)} tensors from {file}; "
        f"{len(remapped.dropped)} head tensors dropped; {len(missing)} missing; {len(unexpected)} unexpected"
    )
    if loaded < MIN_LOADED_SHARE * len(counted):
        raise ValueError(
            f"{where}: only {loaded} of the {len(counted)} tensors of backbone {name!r} are in the file "
            f"(at least {MIN_LOADED_SHARE:.0%} must load); missing: {_names(missing)}; "
            f"unexpected: {_names(unexpected) or 'none'}. Supported: timm's {name!r} state dict, the official "
            "HRNet ImageNet release, HRNet-Semantic-Segmentation checkpoints, torchvision's and "
            "mmsegmentation's ResNet files"
        )
    body.load_state_dict({key: value for key, value in state.items() if key in target}, strict=False)
    if missing or unexpected:
        log.warning(
            "%s; missing (random init): %s; unexpected (ignored): %s",
            report,
            _names(missing) or "none",
            _names(unexpected) or "none",
        )
    else:
        log.info(report)
