"""The models `sfseg.bench` compares (the FCN baseline, the single-output and the S&F variants) and what it
runs on them: one inference of a Table 5 case, one training step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import Tensor, nn

from sfseg import CONFIG_DIR
from sfseg.bench.harness import TAU, BenchConfig, realistic_labels
from sfseg.inference import image_logits
from sfseg.inference.sparse import forced_unity, unity_logits_for_shares
from sfseg.models import BACKBONES, FCNHead, PyramidSegmenter, create_backbone
from sfseg.module import auxiliary_weight, training_loss
from sfseg.pyramid import FINEST_STRIDE, IGNORE_INDEX, build_targets

# fcn: the reference of the ratios; ocr / ccnet: the single-output (L=1) model with that context;
# sf_<context>: the pyramid at BenchConfig.num_levels with that context, dense and sparse.
MODEL_VARIANTS = ("fcn", "sf_none", "sf_anl", "sf_anl_multi", "sf_c2f", "ocr", "ccnet", "sf_ocr", "sf_ccnet")


PYRAMID_PREFIX = "sf_"


@dataclass(frozen=True)
class ModelSpec:
    """The network of backbone `name` as the training config composes it (`python -m sfseg.train
    model/backbone=<name>`, or model/backbone=timm model.backbone.name=<name> for a timm model, without an
    experiment): its decoder (the paper's for sfseg's backbones, segformer for timm models), the heads'
    widths that go with it, and a plain ViT's layers."""

    name: str
    decoder: dict[str, Any]
    semantic_channels: int
    unity_channels: int
    layers: list[int] | None = None


@functools.cache
def model_spec(name: str) -> ModelSpec:
    overrides = [
        "~experiment",
        f"model/backbone={name if name in BACKBONES else 'timm'}",
        f"model.backbone.name={name}",
    ]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        model = OmegaConf.to_container(compose("train", overrides=overrides).model)
    return ModelSpec(
        name,
        model["decoder"],
        model["semantic_channels"],
        model["unity_channels"],
        model["backbone"].get("layers"),
    )


class FCNBaseline(nn.Module):
    """Backbone + FCNHead, logits upsampled to the image: the single-output inference path, on the same
    encoder and decoder as the S&F variants (`model_spec`)."""

    def __init__(self, spec: ModelSpec, num_classes: int, frozen: bool = False) -> None:
        super().__init__()
        self.backbone = create_backbone(spec.name, decoder=spec.decoder, layers=spec.layers, freeze=frozen)
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


def build_variant(name: str, cfg: BenchConfig, frozen: bool = False) -> nn.Module:
    """Variant `name` on cfg.backbone as the config builds it (`model_spec`); `frozen`: its encoder frozen."""
    spec = model_spec(cfg.backbone)
    if name == "fcn":
        return FCNBaseline(spec, cfg.num_classes, frozen)
    return PyramidSegmenter(
        spec.name,
        cfg.num_classes,
        cfg.num_levels if is_pyramid(name) else 1,
        context=name.removeprefix(PYRAMID_PREFIX),
        unity_channels=spec.unity_channels,
        semantic_channels=spec.semantic_channels,
        decoder=spec.decoder,
        layers=spec.layers,
        freeze=frozen,
    )


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
    targets built beforehand (the datamodule builds them with the batch). The optimizer holds what
    trains (not a frozen encoder)."""
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(cfg.train_batch, 3, cfg.train_size, cfg.train_size, generator=gen).to(device)
    labels = realistic_labels(cfg.train_batch, cfg.train_size, cfg.num_classes, seed=5).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.01, momentum=0.9, weight_decay=1e-4)
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
