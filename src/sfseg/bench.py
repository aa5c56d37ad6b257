"""Benchmark harness (not a test): what the pyramid costs next to the plain single-output path.

    python -m sfseg.bench [--device cpu|cuda] [--out bench] [--quick] [--threads N] [--ckpt CKPT] [--profile]
                          [--variants fcn,sf_c2f,...] [--backbones convnext_tiny,vit_small_patch16_224,...]

Writes <out>/results.json and <out>/results.md with, measured side by side in one run:
  (a) build_targets + relabel(true_positive) against a clone() of the same label batch;
  (b) fuse against an argmax over the finest logits (what a single-output model does instead);
  (c) Table 5 in full: backbone + FCNHead (`fcn`, the reference of every ratio) against
      `ocr` / `ccnet`, the single-output "HRNet48 + OCR / + CCNet" rows (L=1, dense only), and the
      Specialize-and-Fuse heads at L=4 with context none / anl / anl_multi / c2f / ocr / ccnet
      (`sf_none` ... `sf_ccnet`): inference latency, peak memory and GMACs on the dense path and, for
      the sf_ rows, on the sparse path (sfseg.inference.image_logits) at forced shares of undecided
      finest cells and, with --ckpt, at the shares a trained checkpoint gives on its validation split;
      training step time (with OCR's auxiliary loss where the model has it) and peak memory;
      parameters. --variants picks rows (fcn is always measured);
  (d) with --profile, torch.profiler's top operators of FCN and of c2f sparse.
With --backbones, instead of (a)-(d), the Backbones table: the S&F model (L=4, c2f) on each named
backbone (any model.backbone.name) and on the reference (hrnet_w48): parameters, GMACs of a dense
inference, and the training step time relative to the reference's.
Times are medians over repeats after warm-up, with the variants interleaved (the order rotates
every round) so that drift of the machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sfseg.inference import evaluate, image_logits, load
from sfseg.inference.sparse import even_level_shares, forced_unity, unity_logits_for_shares
from sfseg.models import FCNHead, PyramidSegmenter, create_backbone
from sfseg.module import auxiliary_weight, training_loss
from sfseg.pyramid import (
    FINEST_STRIDE,
    IGNORE_INDEX,
    build_targets,
    fuse,
    level_strides,
    relabel,
)

# fcn: the reference of the ratios; ocr / ccnet: the single-output (L=1) model with that context;
# sf_<context>: the pyramid at BenchConfig.num_levels with that context, dense and sparse.
MODEL_VARIANTS = ("fcn", "sf_none", "sf_anl", "sf_anl_multi", "sf_c2f", "ocr", "ccnet", "sf_ocr", "sf_ccnet")
PYRAMID_PREFIX = "sf_"
# Shares of finest cells that no coarser level decides; 0.33 is about what the trained embedded
# default leaves (the goals are stated there).
SHARES = (0.25, 0.33, 0.5, 0.75, 1.0)
PROFILE_SHARE = 0.33
PROFILE_CALLS = 3
TAU = 0.9
# The Backbones table's model: S&F with the paper's final context module, at BenchConfig.num_levels.
BACKBONES_VARIANT = "sf_c2f"


@dataclass(frozen=True)
class BenchConfig:
    label_batch: int = 16
    label_size: int = 512
    num_classes: int = 150
    num_levels: int = 4
    fuse_batch: int = 16
    fuse_size: int = 128  # finest level side
    backbone: str = "hrnet_w48"
    image_size: int = 512
    repeats: int = 20
    warmup: int = 3
    model_repeats: int = 7
    model_warmup: int = 1
    shares: tuple[float, ...] = SHARES
    train_batch: int = 2
    train_size: int = 512
    train_repeats: int = 5
    train_warmup: int = 1


QUICK = BenchConfig(
    label_batch=4,
    label_size=128,
    fuse_batch=4,
    fuse_size=32,
    backbone="hrnet_w18_small",
    image_size=128,
    repeats=3,
    warmup=1,
    model_repeats=2,
    model_warmup=1,
    shares=(0.5,),
    train_size=128,
    train_repeats=1,
)


def realistic_labels(batch: int, size: int, num_classes: int, seed: int = 0) -> Tensor:
    """Piecewise-constant label maps: a stuff background, rectangles and ellipses of random classes
    and sizes painted over it, and a few ignore (255) blobs, like a scene-parsing annotation."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = coords[:, None], coords[None, :]

    def rand(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=gen).item()

    labels = torch.empty(batch, size, size, dtype=torch.long)
    for image in labels:
        image.fill_(int(torch.randint(num_classes, (), generator=gen)))
        for shape in range(24):
            cy, cx = rand(0, size), rand(0, size)
            ry, rx = rand(0.02, 0.35) * size, rand(0.02, 0.35) * size
            if shape % 2:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            value = IGNORE_INDEX if shape % 8 == 7 else int(torch.randint(num_classes, (), generator=gen))
            image[mask] = value
    return labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds per variant; every round runs all variants, in a rotated order."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def bench_targets(cfg: BenchConfig, device: torch.device) -> dict[str, object]:
    labels = realistic_labels(cfg.label_batch, cfg.label_size, cfg.num_classes).to(device)
    gen = torch.Generator().manual_seed(1)
    unity_logits = [
        (3 * torch.randn(cfg.label_batch, cfg.label_size // s, cfg.label_size // s, generator=gen)).to(device)
        for s in level_strides(cfg.num_levels)[:-1]
    ]

    def pyramid() -> object:
        return relabel(build_targets(labels, cfg.num_levels), unity_logits, "true_positive", TAU)

    ms = interleaved_medians({"targets": pyramid, "copy": labels.clone}, cfg.repeats, cfg.warmup, device)
    targets = build_targets(labels, cfg.num_levels)
    unity_share = [
        round(((u == 1).sum() / (u != IGNORE_INDEX).sum().clamp(min=1)).item(), 3) for u in targets.unity
    ]
    return {
        "operation": "build_targets + relabel(true_positive)",
        "baseline": "labels.clone()",
        "shape": [cfg.label_batch, cfg.label_size, cfg.label_size],
        "num_levels": cfg.num_levels,
        "unity_cell_share": unity_share,  # coarse to fine: how "realistic" the synthetic labels are
        "time_ms": ms["targets"],
        "baseline_ms": ms["copy"],
        "ratio": ms["targets"] / ms["copy"],
    }


def bench_fuse(cfg: BenchConfig, device: torch.device) -> dict[str, object]:
    gen = torch.Generator().manual_seed(2)
    strides = level_strides(cfg.num_levels)
    sides = [cfg.fuse_size * strides[-1] // s for s in strides]
    semantic = [
        torch.randn(cfg.fuse_batch, cfg.num_classes, side, side, generator=gen).to(device) for side in sides
    ]
    unity = [(3 * torch.randn(cfg.fuse_batch, side, side, generator=gen)).to(device) for side in sides[:-1]]
    finest = semantic[-1]
    ms = interleaved_medians(
        {"fuse": lambda: fuse(semantic, unity, TAU), "argmax": lambda: finest.argmax(dim=1)},
        cfg.repeats,
        cfg.warmup,
        device,
    )
    return {
        "operation": "fuse",
        "baseline": "argmax over the finest logits",
        "shape": [cfg.fuse_batch, cfg.num_classes, cfg.fuse_size, cfg.fuse_size],
        "num_levels": cfg.num_levels,
        "time_ms": ms["fuse"],
        "baseline_ms": ms["argmax"],
        "ratio": ms["fuse"] / ms["argmax"],
    }


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


def model_cases(
    cfg: BenchConfig, checkpoint_shares: list[float] | None, variants: tuple[str, ...] = MODEL_VARIANTS
) -> list[Case]:
    """Every variant dense, then every S&F (sf_) variant sparse at each forced share (the decided
    cells split evenly over levels 1..L-1) and at the checkpoint's own shares per level."""
    cases = [Case(variant) for variant in variants]
    for variant in filter(is_pyramid, variants):
        cases += [Case(variant, tuple(even_level_shares(share, cfg.num_levels))) for share in cfg.shares]
        if checkpoint_shares is not None:
            cases.append(Case(variant, tuple(checkpoint_shares), source="checkpoint"))
    return cases


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


def _images(cfg: BenchConfig, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**10  # reported in kB
    raise KeyError(field)


def cpu_peak_memory(case: Case, cfg: BenchConfig, train: bool) -> float:
    """Peak-RSS growth (MB) over the first inference (or training step) of a freshly built model, in
    its own process.

    Linux: the peak (VmHWM, what ru_maxrss reports) is reset to the current RSS right before the
    call, because a process started by a big parent inherits the parent's ru_maxrss through
    exec and would then show no growth. Elsewhere: the ru_maxrss difference.
    """
    device = torch.device("cpu")
    model = build_variant(case.variant, cfg).train(train)
    if train:
        call = training_call(model, case.variant, cfg, device)
    else:
        infer, images = inference_call(model, case, cfg, device), _images(cfg, device)

        def call() -> None:
            with torch.inference_mode():
                infer(images)

    gc.collect()
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
        before = _proc_status_mb("VmRSS")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
    call()
    if clear_refs.exists():
        return _proc_status_mb("VmHWM") - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before


def _cpu_memory_in_subprocess(case: Case, quick: bool, train: bool = False) -> float:
    child_args = [
        "--memory-child",
        case.variant,
        f"--threads={torch.get_num_threads()}",
        *(["--quick"] if quick else []),
        *(["--child-train"] if train else []),
        *([f"--child-shares={','.join(map(str, case.level_shares))}"] if case.level_shares else []),
    ]
    command = [sys.executable, "-m", "sfseg.bench", *child_args]
    # Large blocks are mmapped and unmapped on free, so memory freed while building the model does
    # not sit resident and get reused by the forward unseen.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def cuda_peak_memory(call: Callable[[], object], device: torch.device) -> float:
    """torch.cuda.max_memory_allocated during `call`, minus what was allocated before it (MB)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _undecided_share(level_map: Tensor, num_levels: int) -> float:
    return (level_map == num_levels - 1).float().mean().item()


def measure_inference(
    cases: list[Case], models: dict[str, nn.Module], cfg: BenchConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per case: median latency (interleaved), GMACs, the undecided share on the level map of the
    run (sparse cases) and, on CUDA, peak memory."""
    calls = {case.name: inference_call(models[case.variant], case, cfg, device) for case in cases}
    images = _images(cfg, device)
    with torch.inference_mode():
        measured = {
            "latency": interleaved_medians(
                {name: (lambda infer=infer: infer(images)) for name, infer in calls.items()},
                cfg.model_repeats,
                cfg.model_warmup,
                device,
            ),
            # Multiply-accumulates of the ops actually dispatched: gathered cells count at their number.
            "gmacs": {name: _gmacs(infer, images) for name, infer in calls.items()},
            "share": {
                case.name: _undecided_share(calls[case.name](images), cfg.num_levels)
                for case in cases
                if case.level_shares is not None
            },
        }
        if device.type == "cuda":
            measured["memory"] = {
                name: cuda_peak_memory(lambda infer=infer: infer(images), device)
                for name, infer in calls.items()
            }
    return measured


def measure_training(
    models: dict[str, nn.Module], cfg: BenchConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per variant: median training step time (interleaved) and, on CUDA, peak memory."""
    for model in models.values():
        model.train()
    steps = {variant: training_call(model, variant, cfg, device) for variant, model in models.items()}
    measured = {"train_step": interleaved_medians(steps, cfg.train_repeats, cfg.train_warmup, device)}
    if device.type == "cuda":
        measured["train_memory"] = {
            variant: cuda_peak_memory(step, device) for variant, step in steps.items()
        }
    return measured


def measure_cpu_memory(
    cases: list[Case], variants: tuple[str, ...], quick: bool
) -> dict[str, dict[str, float]]:
    """Peak RSS growth of each case's inference and each variant's training step, in fresh processes:
    two inference children at once (one per core here), training children one at a time (GBs each)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = pool.map(lambda case: _cpu_memory_in_subprocess(case, quick), cases)
        memory = dict(zip((case.name for case in cases), measured, strict=True))
    train_memory = {
        variant: _cpu_memory_in_subprocess(Case(variant), quick, train=True) for variant in variants
    }
    return {"memory": memory, "train_memory": train_memory}


def table5_rows(
    cases: list[Case], measured: dict[str, dict[str, float]], params: dict[str, float]
) -> list[dict]:
    """One row per case, with its ratios to FCN; dense rows carry their variant's training step."""
    rows = []
    for case in cases:
        row = {
            "case": case.name,
            "variant": case.variant,
            "path": case.path,
            "share_source": None if case.level_shares is None else case.source,
            "level_shares": None if case.level_shares is None else list(case.level_shares),
            "undecided_share": measured["share"].get(case.name),
            "params_m": params[case.variant],
        }
        keys = {"latency": "latency_ms", "memory": "memory_mb", "gmacs": "gmacs"}
        if case.level_shares is None:
            keys |= {"train_step": "train_step_ms", "train_memory": "train_memory_mb"}
        for kind, key in keys.items():
            by = case.name if kind in ("latency", "memory", "gmacs") else case.variant
            row[key] = measured[kind][by]
            row[f"{kind}_ratio"] = measured[kind][by] / measured[kind]["fcn"]
        rows.append(row)
    return rows


def bench_models(
    cfg: BenchConfig,
    device: torch.device,
    quick: bool,
    checkpoint_shares: list[float] | None = None,
    variants: tuple[str, ...] = MODEL_VARIANTS,
) -> dict[str, object]:
    """Table 5: every case's inference latency, peak memory and GMACs; every variant's training step
    time and peak memory (training is always dense) and parameters. Ratios are to FCN in this run."""
    cases = model_cases(cfg, checkpoint_shares, variants)
    models = {variant: build_variant(variant, cfg).to(device).eval() for variant in variants}
    params = {variant: _params_m(model) for variant, model in models.items()}
    measured = measure_inference(cases, models, cfg, device) | measure_training(models, cfg, device)
    del models
    gc.collect()  # the memory children need the memory more than we do
    if device.type == "cpu":
        measured |= measure_cpu_memory(cases, variants, quick)
        method = (
            "peak RSS growth (VmHWM = ru_maxrss, reset before) over the first call, each case in a fresh "
            "process"
        )
    else:
        method = "torch.cuda.max_memory_allocated during the call minus the memory allocated before it"
    return {
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "batch": 1,
        "train_batch": cfg.train_batch,
        "train_size": cfg.train_size,
        "num_classes": cfg.num_classes,
        "num_levels": cfg.num_levels,
        "tau": TAU,
        "call": "FCN: head + bilinear upsampling; S&F: sfseg.inference.image_logits (heads, fuse, upsampling), "
        "dense (sparse=False) or sparse under a forced unity pyramid",
        "train_call": "forward, loss (FCN: cross entropy; the others: relabel true_positive + Eq. 1, plus "
        f"OCR's auxiliary CE x {auxiliary_weight({'name': 'ocr'})}), backward, SGD step",
        "variants": list(variants),
        "memory_method": method,
        "checkpoint_level_shares": checkpoint_shares,
        "rows": table5_rows(cases, measured, params),
    }


def parse_backbones(text: str) -> tuple[str, ...]:
    """--backbones: a comma list of model.backbone.name values (sfseg's or any timm model's)."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError(f"--backbones {text!r}: give a comma list of backbone names (model.backbone.name)")
    return names


def bench_backbones(cfg: BenchConfig, device: torch.device, backbones: tuple[str, ...]) -> dict[str, object]:
    """The Backbones table: the S&F model (BACKBONES_VARIANT) on the reference cfg.backbone and on each of
    `backbones`: parameters and GMACs of one dense inference at cfg.image_size, each of the encoder (the
    timm model), the backbone (the encoder with its fusion decoder or concatenation, and a ViT's neck) and
    the whole model (with heads, fuse and upsampling); and the training step time, the models
    interleaved, with its ratio to the reference's in this run."""
    names = tuple(dict.fromkeys((cfg.backbone, *backbones)))
    models = {
        name: build_variant(BACKBONES_VARIANT, replace(cfg, backbone=name)).to(device) for name in names
    }
    images = _images(cfg, device)
    rows = {}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            rows[name] = {
                "backbone": name,
                "adapter": type(model.backbone).__name__,
                "size_divisor": model.size_divisor,
                "encoder_params_m": _params_m(model.backbone.body),
                "backbone_params_m": _params_m(model.backbone),
                "params_m": _params_m(model),
                "encoder_gmacs": _gmacs(model.backbone.body, images),
                "backbone_gmacs": _gmacs(model.backbone, images),
                "gmacs": _gmacs(inference_call(model, Case(BACKBONES_VARIANT), cfg, device), images),
            }
    steps = {
        name: training_call(model.train(), BACKBONES_VARIANT, cfg, device) for name, model in models.items()
    }
    train_step = interleaved_medians(steps, cfg.train_repeats, cfg.train_warmup, device)
    for name, row in rows.items():
        row["train_step_ms"] = train_step[name]
        row["train_step_ratio"] = train_step[name] / train_step[cfg.backbone]
    return {
        "reference": cfg.backbone,
        "variant": BACKBONES_VARIANT,
        "num_levels": cfg.num_levels,
        "num_classes": cfg.num_classes,
        "image_size": cfg.image_size,
        "train_batch": cfg.train_batch,
        "train_size": cfg.train_size,
        "rows": list(rows.values()),
    }


def backbones_markdown(table: dict, cfg: dict) -> list[str]:
    size, train_size = table["image_size"], table["train_size"]
    lines = [
        f"## Backbones: S&F ({table['variant'].removeprefix(PYRAMID_PREFIX)}, L={table['num_levels']}, "
        f"{table['num_classes']} classes) on each backbone",
        "",
        f"Parameters and GMACs of one dense inference (batch 1, {size}x{size}, FlopCounterMode) of the encoder "
        "(the timm model), the backbone (encoder + fusion decoder, or HRNetV2's concatenation; a ViT's neck) "
        "and the whole S&F model (heads, fuse and upsampling). Training step: batch "
        f"{table['train_batch']}, {train_size}x{train_size}, "
        f"median of {cfg['train_repeats']} after {cfg['train_warmup']} warm-up, the models interleaved; the "
        f"ratio is to {table['reference']} in this run.",
        "",
        "| backbone | adapter | size divisor | params (M): encoder | backbone | S&F | GMACs: encoder | backbone "
        f"| S&F | train step (ms) | vs {table['reference']} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        lines.append(
            f"| {row['backbone']} | {row['adapter']} | {row['size_divisor']} | {row['encoder_params_m']:.1f} | "
            f"{row['backbone_params_m']:.1f} | {row['params_m']:.1f} | {row['encoder_gmacs']:.1f} | "
            f"{row['backbone_gmacs']:.1f} | {row['gmacs']:.1f} | "
            f"{row['train_step_ms']:.0f} | {row['train_step_ratio']:.2f}x |"
        )
    return [*lines, ""]


def checkpoint_level_shares(ckpt_path: Path, num_levels: int, device: torch.device) -> list[float]:
    """The share of finest cells the fuse takes from each level, coarse to fine, over the validation
    split of a trained checkpoint's run (`specialization.json`'s parsimony, single-scale whole image)."""
    predictor = load(ckpt_path, device=device)
    if predictor.levels != num_levels:
        raise ValueError(
            f"--ckpt {ckpt_path} has L={predictor.levels} levels; the benchmark's models have L={num_levels}"
        )
    datamodule = predictor.datamodule()
    datamodule.setup("validate")
    evaluation = evaluate(predictor, datamodule.val_dataloader(), progress=False)
    return list(evaluation.specialization()["parsimony"]["share_per_level"].values())


def profile_table(cfg: BenchConfig, device: torch.device, share: float, rows: int = 20) -> dict[str, str]:
    """torch.profiler's top operators by self time over PROFILE_CALLS inferences (after warm-up): FCN
    and S&F c2f sparse at `share` undecided."""
    tables = {}
    images = _images(cfg, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for case in (Case("fcn"), Case("sf_c2f", tuple(even_level_shares(share, cfg.num_levels)))):
        model = build_variant(case.variant, cfg).to(device).eval()
        infer = inference_call(model, case, cfg, device)
        with torch.inference_mode():
            for _ in range(cfg.model_warmup):
                infer(images)
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(PROFILE_CALLS):
                    infer(images)
                _sync(device)
        tables[case.name] = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    return tables


def _gmacs(infer: Callable[[Tensor], object], images: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        infer(images)
    return counter.get_total_flops() / 2e9  # FlopCounterMode counts a multiply-add as 2 flops


def _params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def run(
    cfg: BenchConfig,
    device: torch.device,
    quick: bool,
    ckpt: Path | None = None,
    profile: bool = False,
    variants: tuple[str, ...] = MODEL_VARIANTS,
    backbones: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """Table 5 and the pyramid math (with `profile`, the profiles); with `backbones`, the Backbones
    table alone."""
    load_before = os.getloadavg()[0]
    results: dict[str, object] = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device.type,
            "device_name": _device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "quick": quick,
            "checkpoint": str(ckpt) if ckpt else None,
            "config": asdict(cfg),
        }
    }
    if backbones:
        results["backbones"] = bench_backbones(cfg, device, backbones)
    else:
        checkpoint_shares = checkpoint_level_shares(ckpt, cfg.num_levels, device) if ckpt else None
        results["targets"] = bench_targets(cfg, device)
        results["fuse"] = bench_fuse(cfg, device)
        results["models"] = bench_models(cfg, device, quick, checkpoint_shares, variants)
        if profile:
            results["profile"] = profile_table(cfg, device, PROFILE_SHARE)
    # Other processes on the machine skew CPU timings; the 1-minute load average shows how much.
    results["meta"]["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return results


def _cell(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def to_markdown(results: dict) -> str:
    meta = results["meta"]
    cfg = meta["config"]
    lines = [
        "# sfseg benchmark",
        "",
        f"{meta['date']}, {meta['device']} ({meta['device_name']}, {meta['threads']} threads), "
        f"torch {meta['torch']}, timm {meta['timm']}{', --quick sizes' if meta['quick'] else ''}. "
        f"Medians after warm-up, variants interleaved; load average before/after {meta['load_average']}.",
        "",
    ]
    if "backbones" in results:
        return "\n".join(lines + backbones_markdown(results["backbones"], cfg))
    lines += [
        f"## Pyramid math (median of {cfg['repeats']})",
        "",
        "| operation | input | time (ms) | baseline | baseline (ms) | ratio |",
        "|---|---|---:|---|---:|---:|",
    ]
    for key in ("targets", "fuse"):
        row = results[key]
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"| {row['operation']} | {shape}, L={row['num_levels']} | {row['time_ms']:.2f} | "
            f"{row['baseline']} | {row['baseline_ms']:.2f} | {row['ratio']:.2f}x |"
        )
    lines += [
        "",
        f"Unity-cell share of the labels, coarse to fine: {results['targets']['unity_cell_share']}.",
        "",
        *table5_markdown(results["models"], cfg, meta["checkpoint"]),
    ]
    for name, table in results.get("profile", {}).items():
        lines += [f"## Profile: {name}, top operators by self time over {PROFILE_CALLS} calls", ""]
        lines += ["```", table.rstrip(), "```", ""]
    return "\n".join(lines)


def table5_markdown(models: dict, cfg: dict, checkpoint: str | None) -> list[str]:
    size, train_size = models["image_size"], models["train_size"]
    lines = [
        f"## Table 5: {models['backbone']}, {models['num_classes']} classes, L={models['num_levels']} "
        f"(ocr, ccnet: L=1, the single output), tau={models['tau']}",
        "",
        f"Inference: batch 1, {size}x{size} (median of {cfg['model_repeats']}). Training step: batch "
        f"{models['train_batch']}, {train_size}x{train_size} (median of {cfg['train_repeats']}); training is "
        "dense on every path. Ratios are to FCN in this run. `share` is the share of finest cells no coarser "
        "level decided, measured on the level map of the run.",
        "",
        "| variant | path | share | latency (ms) | vs FCN | inference memory (MB) | vs FCN | GMACs | vs FCN "
        "| train step (ms) | vs FCN | train memory (MB) | vs FCN | params (M) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in models["rows"]:
        share = _cell(row["undecided_share"], 3) + (" (ckpt)" if row["share_source"] == "checkpoint" else "")
        lines.append(
            f"| {row['variant']} | {row['path']} | {share} | {row['latency_ms']:.1f} | "
            f"{row['latency_ratio']:.2f}x | {row['memory_mb']:.0f} | {row['memory_ratio']:.2f}x | "
            f"{row['gmacs']:.1f} | {row['gmacs_ratio']:.3f}x | {_cell(row.get('train_step_ms'))} | "
            f"{_cell(row.get('train_step_ratio'), 2, 'x')} | {_cell(row.get('train_memory_mb'), 0)} | "
            f"{_cell(row.get('train_memory_ratio'), 2, 'x')} | {row['params_m']:.1f} |"
        )
    shares = models["checkpoint_level_shares"]
    lines += [
        "",
        "Sparse rows force the unity pyramid (`sfseg.inference.sparse`): the decided finest cells are split "
        "evenly over levels 1..L-1 at random positions"
        + (
            f"; the ckpt rows use the checkpoint's own shares per level, coarse to fine "
            f"{[round(share, 3) for share in shares]} ({checkpoint})"
            if shares
            else ""
        )
        + ".",
        f"Calls: {models['call']}. Training step: {models['train_call']}.",
        f"Memory: {models['memory_method']}.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m sfseg.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json/.md")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's); 1 keeps timings steady on a shared box"
    )
    parser.add_argument(
        "--ckpt", type=Path, help="a trained checkpoint: add sparse rows at its validation split's shares"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"add torch.profiler tables (FCN, c2f sparse at {PROFILE_SHARE})",
    )
    parser.add_argument(
        "--variants",
        help=f"comma list of Table 5 rows to measure (default: all): {', '.join(MODEL_VARIANTS)}; "
        "fcn is always measured (the ratios are to it)",
    )
    parser.add_argument(
        "--backbones",
        help="comma list of model.backbone.name values (sfseg's or any timm model's): measure the Backbones "
        "table (S&F on each and on the reference, hrnet_w48; --quick: hrnet_w18_small) instead of Table 5",
    )
    parser.add_argument("--memory-child", choices=MODEL_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-shares", help=argparse.SUPPRESS)
    parser.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variants = parse_variants(args.variants)
        backbones = parse_backbones(args.backbones) if args.backbones is not None else None
    except ValueError as error:
        parser.error(str(error))
    cfg = QUICK if args.quick else BenchConfig()
    if args.memory_child:
        shares = tuple(float(share) for share in args.child_shares.split(",")) if args.child_shares else None
        print(cpu_peak_memory(Case(args.memory_child, shares), cfg, train=args.child_train))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.ckpt is not None and not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such checkpoint file")
    results = run(cfg, torch.device(args.device), args.quick, args.ckpt, args.profile, variants, backbones)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
