"""Models: timm backbones and the Specialize-and-Fuse heads (Sec. 4)."""

from sfseg.models.backbones import BACKBONES, create_backbone
from sfseg.models.context import CONTEXT_MODULES, build_context
from sfseg.models.heads import ConvBlock, FCNHead, FuseGate, SemanticHead, UnityHead
from sfseg.models.segmenter import PyramidOutput, PyramidSegmenter

__all__ = [
    "BACKBONES",
    "CONTEXT_MODULES",
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
