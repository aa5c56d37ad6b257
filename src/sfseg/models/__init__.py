"""Models: the backbone (encoder -> neck -> decoder, timm encoders) and the Specialize-and-Fuse heads (Sec. 4)."""

from sfseg.models.backbones import BACKBONES, create_backbone
from sfseg.models.context import CONTEXT_MODULES, build_context
from sfseg.models.decoders import DECODERS
from sfseg.models.heads import ConvBlock, FCNHead, FuseGate, SemanticHead, UnityHead
from sfseg.models.segmenter import PyramidOutput, PyramidSegmenter

__all__ = [
    "BACKBONES",
    "CONTEXT_MODULES",
    "DECODERS",
    "ConvBlock",
    "FCNHead",
    "FuseGate",
    "PyramidOutput",
    "PyramidSegmenter",
    "SemanticHead",
    "UnityHead",
    "build_context",
    "create_backbone",
]
