"""Backbones: a timm encoder whose stages are fused into one stride-4 feature X (DESIGN 2).

HRNetV2 concatenates HRNet's raw branches (timm's default `features_only` HRNet maps are the
classification "incre" features, not these). ResNet-101 gets the light HRNet-style fusion decoder of
Sec. 5.1.2 so both backbones give D=720 at stride 4. `local` is a shallow encoder whose stride-4 map
sees only a bounded square of the image (the controlled experiment of `data=synthetic_context`).
Any other timm model (`model/backbone=timm`, docs/backbones.md) goes through the same fusion decoder:
a hierarchical encoder with its stride 4, 8, 16 and 32 features, a plain ViT with a simple feature
pyramid built from its single-stride tokens (ViTDet's).
"""

from __future__ import annotations

import difflib
import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import LayerNorm2d, to_2tuple
from torch import Tensor, nn

from sfseg.models.layers import conv_bn_relu
from sfseg.pyramid import FINEST_STRIDE

log = logging.getLogger(__name__)

STAGES = (1, 2, 3, 4)  # timm feature indices of strides 4, 8, 16, 32 (HRNet, ResNet)
PYRAMID_STRIDES = (4, 8, 16, 32)  # the strides the fusion decoder fuses, as HRNet's four branches
# The fusion decoder reduces the map at stride s to HRNet-W48's branch width there: 48, 96, 192, 384.
HRNET48_WIDTH_PER_STRIDE = 12


def _concat_at_finest(features: list[Tensor]) -> Tensor:
    """Upsample every map bilinearly to the first (stride 4) one's size and concatenate channels."""
    size = features[0].shape[-2:]
    resized = [features[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]
    ]
    return torch.cat(resized, dim=1)


def is_shifted_window_block(module: nn.Module) -> bool:
    """timm's Swin V1, V2 and V2-CR attention blocks with shifted windows (a non-zero `shift_size`)."""
    shift = getattr(module, "shift_size", 0)
    return any(shift) if isinstance(shift, Sequence) else bool(shift)


class Backbone(nn.Module):
    """images [B, 3, H, W] -> X [B, out_channels, H/4, W/4]; `body` is the timm features_only model."""

    stride: ClassVar[int] = FINEST_STRIDE
    # H and W must be multiples of this: the coarsest stage's stride (HRNet's branch fusion upsamples by
    # exact factors, and the fused map is then exactly H/4 x W/4), or what a timm model's tokens need.
    size_divisor: int = 32
    # The timm model to build (None: the model.backbone.name itself) and the stages it returns.
    timm_model: ClassVar[str | None] = None
    out_indices: ClassVar[tuple[int, ...]] = STAGES
    timm_kwargs: ClassVar[dict[str, str]] = {}
    out_channels: int
    name: str = ""  # model.backbone.name; create_backbone sets it

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def dynamic_export_size(self, height: int, width: int) -> tuple[int, int]:
        """The smallest example size, at least (height, width), from which an ONNX graph with free height
        and width (`sfseg.export dynamic=true`) holds at every input size. Shifted-window attention
        (Swin) builds its mask from the padded window grid: where a block's input spans a single window
        at the example, the export fixes that block's mask and onnxruntime fails at other sizes. So each
        such block must see more than one window per side; its token grid is measured on one forward
        pass at (height, width)."""
        blocks = [module for module in self.body.modules() if is_shifted_window_block(module)]
        if not blocks:
            return height, width
        grids: list[tuple[tuple[int, int], tuple[int, int]]] = []  # (token grid, window) per block

        def record(block: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            grids.append((tuple(inputs[0].shape[1:3]), to_2tuple(block.window_size)))  # [B, H, W, C]

        hooks = [block.register_forward_pre_hook(record) for block in blocks]
        weight = next(self.body.parameters())
        try:
            with torch.no_grad():
                self.body(torch.zeros(1, 3, height, width, dtype=weight.dtype, device=weight.device))
        finally:
            for hook in hooks:
                hook.remove()
        needed = [height, width]
        for grid, window in grids:
            for axis, side in enumerate((height, width)):
                needed[axis] = max(needed[axis], (window[axis] + 1) * (side // grid[axis]))
        return needed[0], needed[1]


class HRNetV2(Backbone):
    """HRNetV2 representation: the four branches at stride 4, concatenated (W48: 48+96+192+384=720)."""

    timm_kwargs: ClassVar[dict[str, str]] = {"feature_location": ""}

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body)
        self.out_channels = sum(body.feature_info.channels())

    def forward(self, images: Tensor) -> Tensor:
        return _concat_at_finest(self.body(images))


class FusedStages(Backbone):
    """The light HRNet-style fusion decoder (Sec. 5.1.2) on an encoder's maps at strides 4, 8, 16, 32:
    each reduced by Conv1x1-BN-ReLU to HRNet-W48's branch width at its stride (48, 96, 192, 384),
    upsampled to stride 4, concatenated and mixed by a Conv3x3-BN-ReLU: a stride-4 D=720 map without
    dilation. `channels` and `strides` are the encoder's, as its timm feature_info gives them."""

    def __init__(self, body: nn.Module, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__(body)
        reduced = [HRNET48_WIDTH_PER_STRIDE * stride for stride in strides]
        self.out_channels = sum(reduced)
        self.size_divisor = math.lcm(*strides)
        self.reduce = nn.ModuleList(
            conv_bn_relu(c_in, c_out) for c_in, c_out in zip(channels, reduced, strict=True)
        )
        self.fuse = conv_bn_relu(self.out_channels, self.out_channels, kernel_size=3)

    def stages(self, images: Tensor) -> list[Tensor]:
        """The encoder's maps [B, C_i, H/s_i, W/s_i] at strides 4, 8, 16, 32."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        stages = self.stages(images)
        return self.fuse(
            _concat_at_finest([reduce(s) for reduce, s in zip(self.reduce, stages, strict=True)])
        )


class TimmStages(FusedStages):
    """A hierarchical timm encoder through the fusion decoder: ResNet-101 (256..2048 channels), or any of
    ConvNeXt, EfficientNet, RegNet, MobileNetV3, ResNe(X)t, Swin, ... (`timm_pyramid` picks its
    features at strides 4, 8, 16, 32). Maps come in NCHW or, as Swin's, NHWC."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body, body.feature_info.channels(), body.feature_info.reduction())
        self.channels_last = getattr(body, "output_fmt", "NCHW") == "NHWC"

    def stages(self, images: Tensor) -> list[Tensor]:
        features = self.body(images)
        return [f.permute(0, 3, 1, 2) for f in features] if self.channels_last else features


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: the single-stride tokens [B, C, H/s, W/s] of a plain ViT as maps
    at strides 4, 8, 16, 32. Finer strides by 2x2 stride-2 transposed convolutions, each halving the
    channels (LayerNorm and GELU between two), the token stride as it is, coarser ones by max pooling.
    (Patch 16: two deconvolutions for stride 4, one for 8, identity for 16, a 2x2 max pool for 32.)"""

    def __init__(self, channels: int, token_stride: int) -> None:
        super().__init__()
        self.channels: list[int] = []
        self.scales = nn.ModuleList()
        for stride in PYRAMID_STRIDES:
            layers: list[nn.Module] = []
            width = channels
            for _ in range(int(math.log2(token_stride // stride)) if stride < token_stride else 0):
                if layers:
                    layers += [LayerNorm2d(width), nn.GELU()]
                layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
                width //= 2
            if stride > token_stride:
                layers.append(nn.MaxPool2d(kernel_size=stride // token_stride))
            self.scales.append(nn.Sequential(*layers))
            self.channels.append(width)

    def forward(self, tokens: Tensor) -> list[Tensor]:
        return [scale(tokens) for scale in self.scales]


class TimmViT(FusedStages):
    """A plain ViT (vit_*, deit_*, ...): timm's `forward_intermediates` (its features_only getter) gives the
    last block's tokens as a map at the patch stride; SimpleFeaturePyramid makes strides 4..32 of it.
    H and W must be multiples of the patch stride and of 32."""

    def __init__(self, body: nn.Module) -> None:
        (token_stride,) = body.feature_info.reduction()
        neck = SimpleFeaturePyramid(body.feature_info.channels()[0], token_stride)
        super().__init__(body, neck.channels, PYRAMID_STRIDES)
        self.neck = neck
        self.size_divisor = math.lcm(token_stride, *PYRAMID_STRIDES)

    def stages(self, images: Tensor) -> list[Tensor]:
        (tokens,) = self.body(images)
        return self.neck(tokens)


class LocalResNet(Backbone):
    """A bounded receptive field: timm's resnet10t up to its first stage (a deep stem of three 3x3
    convolutions, a 3x3 max pool, one basic block), whose stride-4 map X (64 channels) is a function of
    a 31 x 31 pixel square of the image only. No later stage, no decoder: anything wider than that
    square a prediction can only get from the pyramid's pooling (Eq. 3) or a context module."""

    timm_model: ClassVar[str | None] = "resnet10t"
    out_indices: ClassVar[tuple[int, ...]] = (1,)
    size_divisor: int = FINEST_STRIDE
    receptive_field: ClassVar[int] = 31  # pixels; tests/test_mechanism.py measures it

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body)
        self.out_channels = body.feature_info.channels()[-1]

    def forward(self, images: Tensor) -> Tensor:
        (x,) = self.body(images)
        return x


# model.backbone.name (the timm model name, or the name of a timm model's configuration) -> how its
# stages become X. Any other timm model name goes through `timm_pyramid`.
BACKBONES: dict[str, type[Backbone]] = {
    "hrnet_w18_small": HRNetV2,
    "hrnet_w18_small_v2": HRNetV2,  # the official "HRNet-W18-Small-v2" release
    "hrnet_w18": HRNetV2,
    "hrnet_w32": HRNetV2,
    "hrnet_w48": HRNetV2,
    "resnet101": TimmStages,
    "resnet101c": TimmStages,  # deep stem: mmsegmentation's ResNetV1c
    "local": LocalResNet,
}


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None) -> Backbone:
    """Build backbone `name` (model.backbone.name): one of BACKBONES, or any other timm model whose
    features give the fusion decoder its stride 4..32 maps (`timm_pyramid`).

    weights: a local weights file (.pth/.pt/.bin or .safetensors): timm's state dict of `name`, or one
        of the layouts `remap_weights` knows; when given it is loaded and `pretrained` is not
        consulted, so nothing is downloaded.
    pretrained: download timm's ImageNet weights from the Hugging Face hub.
    """
    if name in BACKBONES:
        kind = BACKBONES[name]
        timm_name = kind.timm_model or name
        kwargs: dict[str, Any] = {"out_indices": kind.out_indices, **kind.timm_kwargs}
    else:
        kind, kwargs = timm_pyramid(name)
        timm_name = name
    kwargs["features_only"] = True
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
    backbone = kind(body)
    backbone.name = name
    return backbone


def timm_pyramid(name: str) -> tuple[type[FusedStages], dict[str, Any]]:
    """How the timm model `name` gives the fusion decoder maps at strides 4, 8, 16, 32: the backbone
    class and timm.create_model's arguments. A hierarchical encoder: its last feature at each of these
    strides (out_indices into its feature_info). A plain ViT (one stride for all its features): the last
    block's tokens, for SimpleFeaturePyramid. A model timm builds for one input size gets
    dynamic_img_size. The feature_info is read from the model built on the meta device (no memory, no
    initialisation). A model that cannot give the pyramid is an error naming it and saying why."""
    where = f"model.backbone.name={name!r}"
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"{where} is neither one of sfseg's backbones ({', '.join(BACKBONES)}) nor a timm model"
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
        stride = reductions[0]
        if stride not in PYRAMID_STRIDES:
            raise ValueError(
                f"{where}: all its features have stride {stride} (a plain ViT's patch size); the simple "
                f"feature pyramid scales them by powers of two to strides {PYRAMID_STRIDES}, so the token "
                f"stride must be one of {PYRAMID_STRIDES} (e.g. a patch-16 model)"
            )
        return TimmViT, {**kwargs, "out_indices": (len(reductions) - 1,)}
    missing = [stride for stride in PYRAMID_STRIDES if stride not in reductions]
    if missing:
        raise ValueError(
            f"{where}: its features (timm's feature_info) have strides {sorted(set(reductions))}, none at "
            f"{', '.join(map(str, missing))}; the fusion decoder needs one at each of strides {PYRAMID_STRIDES}"
        )
    last_at = {stride: index for index, stride in enumerate(reductions)}
    return TimmStages, {**kwargs, "out_indices": tuple(last_at[stride] for stride in PYRAMID_STRIDES)}


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


def remap_weights(checkpoint: Mapping[str, Any], deep_stem: bool, own_stem: bool = False) -> RemappedWeights:
    """Bring the layouts users have to timm's names (model.backbone.weights):
    a timm state dict; the official HRNet ImageNet release (same names as timm); an
    HRNet-Semantic-Segmentation checkpoint (`state_dict`, `model.`/`module.` prefixes, heads dropped);
    torchvision's ResNet (timm's names plus fc); mmsegmentation's checkpoints (`state_dict`, `backbone.`,
    and with `deep_stem` (resnet101c) the ResNetV1c `stem.*` keys). `own_stem`: the backbone has a
    module named stem (timm's ConvNeXt, RegNet, ...), so the file's `stem.*` keys are its own."""
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
    if not own_stem and any(key.startswith("stem.") for key in renamed):
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


def in_feature_names(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A timm model's tensors under the names its features_only wrapper gives them, where those differ:
    FeatureListNet flattens the model's top-level nn.Sequentials (stages.0.* -> stages_0.*), and
    FeatureGetterNet (a plain ViT's) holds the model as `model`."""
    renamed = {}
    for key, value in state.items():
        if key not in target:
            key = next((name for name in (key.replace(".", "_", 1), f"model.{key}") if name in target), key)
        renamed[key] = value
    return renamed


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
        remapped = remap_weights(
            checkpoint,
            deep_stem="conv1.0.weight" in target,
            own_stem=any(key.startswith("stem") for key in target),
        )
    except ValueError as err:
        raise ValueError(f"{where} does not fit backbone {name!r}: {err}") from err
    state = in_feature_names(remapped.state, target)
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
