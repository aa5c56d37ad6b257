"""model.backbone.weights: local weights files in the layouts users have, loaded into the encoder's timm
model (encoder -> neck -> decoder, DESIGN 2; the neck and the decoder always start from scratch).

Layouts: timm's state dict of the model; the official HRNet ImageNet release; HRNet-Semantic-Segmentation
checkpoints; torchvision's and mmsegmentation's ResNets; and for plain ViTs whatever timm's own converter
of the model's family reads (`checkpoint_filter_fn` of timm.models.vision_transformer, .eva, ...): the
official facebookresearch/dinov2 and dinov3 releases among them.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

log = logging.getLogger(__name__)

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


def timm_layout(state: dict[str, Tensor], body: nn.Module) -> dict[str, Tensor]:
    """A plain ViT's file (its model held by timm's FeatureGetterNet) through timm's own converter of the
    model's family, `checkpoint_filter_fn` of the module that defines it: timm.models.vision_transformer
    reads the official DINOv2 release (mask_token dropped; with registers, register_tokens as reg_token
    and the class token's position embedding folded into it, as timm builds those models) and
    timm.models.eva the official DINOv3 one (storage_tokens as reg_token, ls1/ls2.gamma as gamma_1/2,
    the qkv bias split into q_bias and v_bias since K's is masked to zero, the RoPE periods, bias masks
    and mask_token dropped). A timm state dict passes through unchanged. Other encoders' files as they are."""
    if not isinstance(body, FeatureGetterNet):
        return state
    convert = getattr(sys.modules[type(body.model).__module__], "checkpoint_filter_fn", None)
    return state if convert is None else convert(dict(state), body.model)


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
    state = in_feature_names(timm_layout(remapped.state, body), target)
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
            "mmsegmentation's ResNet files, the official DINOv2 and DINOv3 releases"
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
