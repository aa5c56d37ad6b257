"""The backbone: images -> X, the stride-4 map of D channels the heads read (DESIGN 2), as encoder
(models/encoders.py) -> neck (plain ViTs only, models/necks.py) -> decoder (models/decoders.py), with the
encoder's weights from timm's hub or a local file (models/weights.py) and, with freeze, kept as they are.

The paper's backbones keep their networks and their checkpoints' keys: the HRNets are HRNetV2 (the
`concat` decoder on their raw branches), ResNet-101 the Sec. 5.1.2 fusion decoder (`hrnet`, D=720), and
`local` its stride-4 map as it is. Any other timm model takes any decoder (docs/backbones.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from timm.layers import to_2tuple
from torch import Tensor, nn

from sfseg.models.decoders import Decoder, build_decoder
from sfseg.models.encoders import (
    PYRAMID_STRIDES,
    SFSEG_ENCODERS,
    Encoder,
    PlainViT,
    TimmStages,
    build_body,
    create_encoder,
    plan_encoder,
)
from sfseg.models.necks import ViTNeck
from sfseg.models.weights import load_weights
from sfseg.pyramid import FINEST_STRIDE

log = logging.getLogger(__name__)

# model.backbone.name values sfseg builds itself (any other name is a timm model).
BACKBONES = SFSEG_ENCODERS


def paper_decoder(name: str) -> dict[str, Any]:
    """The decoder backbone `name` had before model/decoder existed, and has in the paper's configs:
    HRNetV2's concatenation for the HRNets and `local`, the Sec. 5.1.2 fusion (D=720) for every other
    encoder. Checkpoints without a `decoder` entry are rebuilt with it."""
    kind = SFSEG_ENCODERS.get(name, TimmStages)
    return {"name": "hrnet" if kind is TimmStages else "concat", "channels": None}


def is_shifted_window_block(module: nn.Module) -> bool:
    """timm's Swin V1, V2 and V2-CR attention blocks with shifted windows (a non-zero `shift_size`)."""
    shift = getattr(module, "shift_size", 0)
    return any(shift) if isinstance(shift, Sequence) else bool(shift)


class Backbone(nn.Module):
    """images [B, 3, H, W] -> X [B, out_channels, H/4, W/4]: the encoder's timm model (`body`), a plain
    ViT's `neck`, and the decoder. The decoder's modules sit directly under the backbone (`reduce` and
    `fuse` for hrnet, ...), as the paper's checkpoints hold them (backbone.body.*, backbone.reduce.*,
    backbone.fuse.*, a ViT's backbone.neck.*); the decoder object itself is kept unregistered.

    frozen: the encoder trains nothing: its parameters need no gradient and it stays in eval mode
    (normalisation statistics and dropout) whatever `train()` the rest gets, as Lightning calls it at
    every epoch. The neck and the decoder train."""

    stride: ClassVar[int] = FINEST_STRIDE

    def __init__(
        self, name: str, encoder: Encoder, body: nn.Module, decoder: Decoder, neck: ViTNeck | None = None
    ) -> None:
        super().__init__()
        if any(True for _ in decoder.parameters(recurse=False)) or any(
            True for _ in decoder.buffers(recurse=False)
        ):
            raise TypeError(f"{type(decoder).__name__} must keep its tensors in submodules")
        self.name = name
        self.encoder = encoder
        self.body = body
        self.neck = neck
        for child, module in decoder.named_children():
            self.add_module(child, module)
        self.__dict__["decoder"] = decoder  # its modules are registered above, under their own names
        self.out_channels = decoder.out_channels
        # H and W must be multiples of this: what the encoder's strides need (decoders and the neck only
        # scale by the factors between them).
        self.size_divisor = encoder.size_divisor
        self.frozen = False

    def encode(self, images: Tensor) -> list[Tensor]:
        """The maps the decoder reads, finest first: the encoder's (through the neck for a plain ViT)."""
        maps = self.encoder.features(self.body, images)
        return maps if self.neck is None else self.neck(maps)

    def forward(self, images: Tensor) -> Tensor:
        return self.decoder(self.encode(images))

    def freeze(self) -> None:
        """model.backbone.freeze=true: the encoder keeps its weights (see the class's docstring)."""
        self.frozen = True
        self.body.requires_grad_(False)
        self.body.eval()

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

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


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    decoder: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    freeze: bool = False,
) -> Backbone:
    """Build backbone `name` (model.backbone.name): one of BACKBONES, or any timm model whose features
    give the decoder maps at strides 4..32 (`encoders.timm_encoder`).

    weights: a local weights file (.pth/.pt/.bin or .safetensors) in one of the layouts
        `weights.load_weights` reads; when given it is loaded and `pretrained` is not consulted, so
        nothing is downloaded.
    pretrained: download timm's ImageNet (or the tag's) weights from the Hugging Face hub.
    decoder: model.decoder ({"name", "channels"}); None: `paper_decoder(name)`.
    layers: model.backbone.layers, a plain ViT's blocks (None: the last four).
    freeze: model.backbone.freeze, the encoder trains nothing.
    """
    plan = plan_encoder(name, layers)
    if weights is not None:
        body = build_body(plan, pretrained=False)
        load_weights(body, weights, plan.timm_name)
    elif pretrained:
        try:
            body = build_body(plan, pretrained=True)
        except OSError as err:  # the hub's and urllib's network and missing-file errors are all OSErrors
            raise RuntimeError(
                f"could not fetch pretrained weights for model.backbone.name={name!r}: the Hugging Face hub "
                f"could not be reached ({type(err).__name__}). Without network, download timm's {plan.timm_name!r} "
                "weights elsewhere and set model.backbone.weights=<path to a local file> (.pth/.bin or "
                ".safetensors), or train from scratch with model.backbone.pretrained=false"
            ) from err
    else:
        body = build_body(plan, pretrained=False)
    encoder = create_encoder(plan, body)
    channels, strides, neck = encoder.channels, encoder.strides, None
    if isinstance(encoder, PlainViT):
        neck = ViTNeck(channels[0], encoder.patch_size, len(encoder.layers))
        channels, strides = neck.channels, list(PYRAMID_STRIDES)
    backbone = Backbone(
        name, encoder, body, build_decoder(decoder or paper_decoder(name), channels, strides), neck
    )
    if freeze:
        backbone.freeze()
    return backbone
