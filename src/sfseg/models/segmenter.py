"""The Specialize-and-Fuse segmenter: backbone -> unity head + semantic head (Fig. 2a)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sfseg.models.backbones import create_backbone, paper_decoder
from sfseg.models.decoders import decoder_config
from sfseg.models.heads import FuseGate, SemanticHead, UnityHead
from sfseg.pyramid import FINEST_STRIDE, FuseRule, kept_cells, level_strides

log = logging.getLogger(__name__)


@dataclass
class PyramidOutput:
    """The two raw pyramids, coarse to fine.

    semantic: L logit maps [B, C, H/s_l, W/s_l]; unity: L-1 logit maps [B, H/s_l, W/s_l] ([] for L=1).
    auxiliary: OCR's auxiliary class logits [B, C, H/4, W/4] (its soft object regions, trained against
    the finest labels); None for the other context modules.
    gate_logits: the learned fuse's level logits [B, L, H/4, W/4] (model/fuse=learned); None otherwise.
    """

    semantic: list[Tensor]
    unity: list[Tensor]
    auxiliary: Tensor | None = None
    gate_logits: Tensor | None = None


# The keys model.fuse may hold besides its name, per rule.
FUSE_OPTIONS = {
    "hard": {"upsample"},
    "soft": {"upsample"},
    "learned": {"upsample", "hidden_channels", "lr_mult"},
}


def fuse_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """model.fuse checked: {"name": <rule>, ...its options}; None (a checkpoint from before the rule was
    a setting) is Eq. 2's hard fuse."""
    config = dict(config or {"name": "hard"})
    rule = FuseRule(config.get("name"), config.get("upsample"))
    unknown = set(config) - {"name"} - FUSE_OPTIONS[rule.name]
    if unknown:
        raise ValueError(
            f"model.fuse has unknown keys {sorted(unknown)} for model.fuse.name={rule.name}; "
            f"allowed: {sorted(FUSE_OPTIONS[rule.name])}"
        )
    lr_mult = config.get("lr_mult", 1.0)
    if isinstance(lr_mult, bool) or not isinstance(lr_mult, int | float) or lr_mult <= 0:
        raise ValueError(f"model.fuse.lr_mult must be a number > 0, got {lr_mult!r}")
    return config


class PyramidSegmenter(nn.Module):
    """Backbone (stride 4, D channels: the decoder's width) with the unity head (D_u) and the semantic
    head (D_s), whose context module works at D_s.

    num_levels=1 is the standard single output: no unity head, unity == []. fuse: the fuse rule
    (`pyramid.FuseRule`, or its name); `learned` adds the fuse gate (`FuseGate`, fuse_hidden_channels
    wide), whose level logits every forward returns. The net stores the rule; `pyramid.fuse` applies it.
    decoder, layers, freeze: `backbones.create_backbone`'s (model.decoder, model.backbone.layers,
    model.backbone.freeze); decoder None is the backbone's paper decoder.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        num_levels: int = 4,
        context: str = "c2f",
        unity_channels: int = 64,
        semantic_channels: int = 512,
        pretrained: bool = False,
        weights: str | None = None,
        fuse: FuseRule | str = "hard",
        fuse_hidden_channels: int = 32,
        decoder: Mapping[str, Any] | None = None,
        layers: Sequence[int] | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        coarsest_stride = level_strides(num_levels)[0]  # also validates num_levels
        self.num_levels = num_levels
        self.fuse_rule = FuseRule(fuse) if isinstance(fuse, str) else fuse
        self.backbone = create_backbone(backbone, pretrained, weights, decoder, layers, freeze)
        # What the pyramid's cells and the backbone both need; evaluation and export pad to it.
        self.size_divisor = math.lcm(coarsest_stride, self.backbone.size_divisor)
        channels = self.backbone.out_channels
        self.unity_head = UnityHead(channels, num_levels, unity_channels) if num_levels > 1 else None
        self.semantic_head = SemanticHead(channels, num_classes, num_levels, semantic_channels, context)
        self.fuse_gate = (
            FuseGate(num_levels, fuse_hidden_channels, self.fuse_rule.upsample)
            if self.fuse_rule.trained
            else None
        )
        self.channels_last = False  # use_channels_last() sets it

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], load_backbone_weights: bool = True) -> PyramidSegmenter:
        """Build from the `model` config's values (SpecializeAndFuseModule's hyperparameters).

        load_backbone_weights=False skips the backbone's pretrained or local weights: a checkpoint's
        state dict replaces them anyway, and they may need a network or a file that is not there.
        A checkpoint from before model/decoder has none: its backbone's paper decoder rebuilds it.
        """
        backbone = hparams["backbone"]
        fuse = fuse_config(hparams.get("fuse"))
        decoder = decoder_config(hparams.get("decoder") or paper_decoder(backbone["name"]))
        pretrained = load_backbone_weights and bool(backbone.get("pretrained", False))
        weights = backbone.get("weights") if load_backbone_weights else None
        freeze = backbone.get("freeze", False)
        if not isinstance(freeze, bool):
            raise ValueError(f"model.backbone.freeze must be true or false, got {freeze!r}")
        if freeze and load_backbone_weights and not (pretrained or weights):
            log.warning(
                "model.backbone.freeze=true with neither model.backbone.pretrained nor model.backbone.weights: "
                "the frozen encoder's features are random"
            )
        return cls(
            backbone=backbone["name"],
            num_classes=hparams["num_classes"],
            num_levels=hparams["levels"],
            context=hparams["context"]["name"],
            unity_channels=hparams.get("unity_channels", 64),
            semantic_channels=hparams.get("semantic_channels", 512),
            pretrained=pretrained,
            weights=weights,
            fuse=FuseRule(fuse["name"], fuse.get("upsample")),
            fuse_hidden_channels=fuse.get("hidden_channels", 32),
            decoder=decoder,
            layers=backbone.get("layers"),
            freeze=freeze,
        )

    def use_channels_last(self) -> PyramidSegmenter:
        """model.channels_last: the parameters and buffers, and from now on every input of forward and
        sparse_forward, in torch.channels_last (NHWC) memory format. The state dict keeps its keys and
        values; only their layout in memory changes."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def compile_dense(self) -> PyramidSegmenter:
        """model.compile: torch.compile each part of the dense forward (backbone, unity head, semantic head
        with its context module, the learned fuse's gate) in place (nn.Module.compile), so the state dict
        keeps its keys (no `_orig_mod.`). sparse_forward runs the compiled backbone and unity head, and its
        per-cell semantic work eagerly. Compilation happens at the first call of each part."""
        for part in (self.backbone, self.unity_head, self.semantic_head, self.fuse_gate):
            if part is not None:
                part.compile()
        return self

    def forward(self, images: Tensor) -> PyramidOutput:
        images = self._prepare(images)
        features = self.backbone(images)
        unity = self.unity_head(features) if self.unity_head is not None else []
        semantic, auxiliary = self.semantic_head(features)
        gate_logits = self.fuse_gate(semantic, unity) if self.fuse_gate is not None else None
        return PyramidOutput(semantic=semantic, unity=unity, auxiliary=auxiliary, gate_logits=gate_logits)

    def sparse_forward(self, images: Tensor, tau: float) -> PyramidOutput:
        """The pyramids as Eq. 2's fuse at `tau` reads them, computing each level's per-cell semantic
        work only at the cells the fuse keeps (`pyramid.kept_cells`): fuse(sparse_forward(x, tau), tau)
        equals fuse(forward(x), tau) (up to float rounding; the level map exactly). The semantic maps
        are zero at every other cell, so they are not the levels' own predictions. Inference only, and
        for Eq. 2 with nearest Up() only (`FuseRule.sparse`: the others read every level at every cell)."""
        if not self.fuse_rule.sparse:
            raise ValueError(
                f"sparse_forward computes only the cells Eq. 2 keeps; the {self.fuse_rule.label} fuse reads "
                "every level at every cell: use the dense forward"
            )
        if self.training:
            raise RuntimeError("sparse_forward is for inference: call .eval() first (batch norm statistics)")
        images = self._prepare(images)
        features = self.backbone(images)
        unity = self.unity_head(features) if self.unity_head is not None else []
        projected, auxiliary = self.semantic_head.context_inputs(features)
        del features  # both heads have read it
        batch, _, height, width = images.shape
        finest = (batch, height // FINEST_STRIDE, width // FINEST_STRIDE)
        kept = kept_cells(unity, finest, tau, images.device)
        semantic = self.semantic_head.sparse_forward(projected, kept, auxiliary)
        return PyramidOutput(semantic=semantic, unity=unity, auxiliary=auxiliary)

    def _prepare(self, images: Tensor) -> Tensor:
        """The images checked for size, in the network's memory format."""
        self._check_size(images)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _check_size(self, images: Tensor) -> None:
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"input size {height}x{width} must be divisible by {self.size_divisor}: the coarsest "
                f"pyramid stride {level_strides(self.num_levels)[0]} (model.levels={self.num_levels}) and "
                f"the backbone's size divisor {self.backbone.size_divisor}; pad inputs to a multiple"
            )
