"""How `sfseg.bench` measures: the sizes (BenchConfig; QUICK for a smoke run), realistic inputs, medians
of interleaved repeats, and counts of multiply-accumulates and parameters."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sfseg.pyramid import IGNORE_INDEX
from sfseg.runs import cpu_model

# Shares of finest cells that no coarser level decides; 0.33 is about what the trained embedded
# default leaves (the goals are stated there).
SHARES = (0.25, 0.33, 0.5, 0.75, 1.0)


TAU = 0.9


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
    label_size=64,
    fuse_batch=4,
    fuse_size=16,
    backbone="hrnet_w18_small",
    image_size=64,
    repeats=3,
    warmup=1,
    model_repeats=2,
    model_warmup=1,
    shares=(0.5,),
    train_size=64,
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


def sync(device: torch.device) -> None:
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
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def bench_images(cfg: BenchConfig, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)


def count_gmacs(infer: Callable[[Tensor], object], images: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        infer(images)
    return counter.get_total_flops() / 2e9  # FlopCounterMode counts a multiply-add as 2 flops


def count_gmacs_by_module(infer: Callable[[Tensor], object], images: Tensor) -> dict[str, float]:
    """GMACs of one call in all ("Global") and per module, by FlopCounterMode's module names (the first
    module called, then its attributes: "PyramidSegmenter.backbone.body")."""
    counter = FlopCounterMode(display=False)
    with counter:
        infer(images)
    return {module: sum(counts.values()) / 2e9 for module, counts in counter.get_flop_counts().items()}


def count_params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()
