"""The models `sfseg.bench` compares (the FCN baseline, the single-output and the S&F variants) and what it
runs on them: one inference of a Table 5 case, one training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfseg.bench.harness import TAU, BenchConfig, realistic_labels
from sfseg.inference import image_logits
from sfseg.inference.sparse import forced_unity, unity_logits_for_shares
from sfseg.models import FCNHead, PyramidSegmenter, create_backbone
from sfseg.module import auxiliary_weight, training_loss
from sfseg.pyramid import FINEST_STRIDE, IGNORE_INDEX, build_targets

# fcn: the reference of the ratios; ocr / ccnet: the single-output (L=1) model with that context;
# sf_<context>: the pyramid at BenchConfig.num_levels with that context, dense and sparse.
MODEL_VARIANTS = ("fcn", "sf_none", "sf_anl", "sf_anl_multi", "sf_c2f", "ocr", "ccnet", "sf_ocr", "sf_ccnet")


PYRAMID_PREFIX = "sf_"


class FCNBaseline(nn.Module):
    """Backbone + FCNHead, logits upsampled to the image: the single-output inference path."""

    def __init__(self, backbone: str, num_classes: int) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone)
        self.head = FCNHead(self.backbone.out_channels, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Case:
    """One inference row of Table 5: a variant on the dense path, or on the sparse path with the unity
    pyramid forced so that the fuse takes `level_shares` of the finest cells from each level."""

    variant: str
    level_shares: tuple[float, ...] | None = None  # None: the dense path
    source: str = "forced"  # forced | checkpoint

    @property
    def name(self) -> str:
        if self.level_shares is None:
            return self.variant
        return f"{self.variant}@{'ckpt' if self.source == 'checkpoint' else self.level_shares[-1]}"

    @property
    def path(self) -> str:
        return "dense" if self.level_shares is None else "sparse"


def is_pyramid(variant: str) -> bool:
    """Whether the variant has L > 1 levels (an sf_ row), so a sparse path."""
    return variant.startswith(PYRAMID_PREFIX)


def parse_variants(text: str | None) -> tuple[str, ...]:
    """--variants: a comma list of MODEL_VARIANTS (None: all), in MODEL_VARIANTS' order, with fcn
    always in it because every ratio is to fcn."""
    if text is None:
        return MODEL_VARIANTS
    asked = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(asked - set(MODEL_VARIANTS))
    if unknown or not asked:
        raise ValueError(
            f"--variants {text!r}: unknown {', '.join(unknown) or '(empty list)'}; "
            f"allowed: {', '.join(MODEL_VARIANTS)}"
        )
    return tuple(variant for variant in MODEL_VARIANTS if variant in asked | {"fcn"})


def build_variant(name: str, cfg: BenchConfig) -> nn.Module:
    if name == "fcn":
        return FCNBaseline(cfg.backbone, cfg.num_classes)
    levels = cfg.num_levels if is_pyramid(name) else 1
    return PyramidSegmenter(cfg.backbone, cfg.num_classes, levels, context=name.removeprefix(PYRAMID_PREFIX))


def inference_call(
    model: nn.Module, case: Case, cfg: BenchConfig, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """What one inference of `case` runs: FCN's forward, or sfseg.inference.image_logits (heads, fuse,
    upsampling), sparse under the forced unity pyramid. Returns the level map (FCN: the logits)."""
    if case.variant == "fcn":
        return model
    if case.level_shares is None:
        return lambda images: image_logits(model, images, TAU, sparse=False)[1]
    finest = cfg.image_size // FINEST_STRIDE
    unity = unity_logits_for_shares([case.level_shares], (finest, finest), device=device)

    def infer(images: Tensor) -> Tensor:
        with forced_unity(model, unity):
            return image_logits(model, images, TAU, sparse=True)[1]

    return infer


def training_call(
    model: nn.Module, variant: str, cfg: BenchConfig, device: torch.device
) -> Callable[[], None]:
    """One training step (forward, loss, backward, SGD step) on a realistic label batch. FCN: cross
    entropy on the upsampled logits; the others: sfseg.module.training_loss as in training
    (relabel(true_positive), Eq. 1, OCR's auxiliary CE at its default weight), with the pyramid
    targets built beforehand (the datamodule builds them with the batch)."""
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(cfg.train_batch, 3, cfg.train_size, cfg.train_size, generator=gen).to(device)
    labels = realistic_labels(cfg.train_batch, cfg.train_size, cfg.num_classes, seed=5).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if variant != "fcn":
        targets = build_targets(labels, model.num_levels)
        aux_weight = auxiliary_weight({"name": variant.removeprefix(PYRAMID_PREFIX)})

    def loss() -> Tensor:
        if variant == "fcn":
            return F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)
        return training_loss(model(images), targets, "true_positive", TAU, aux_weight=aux_weight)[0]

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradient held between steps

    return step
