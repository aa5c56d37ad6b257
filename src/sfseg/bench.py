"""Benchmark harness (not a test): what the pyramid costs next to the plain single-output path.

    python -m sfseg.bench [--device cpu|cuda] [--out bench] [--quick]

Writes <out>/results.json and <out>/results.md with, measured side by side in one run:
  (a) build_targets + relabel(true_positive) against a clone() of the same label batch;
  (b) fuse against an argmax over the finest logits (what a single-output model does instead);
  (c) inference latency and forward memory of backbone + FCNHead against backbone + the
      Specialize-and-Fuse heads with context none / anl / c2f (sfseg.inference.image_logits).
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
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sfseg.inference import image_logits
from sfseg.models import FCNHead, PyramidSegmenter, create_backbone
from sfseg.pyramid import IGNORE_INDEX, build_targets, fuse, level_strides, relabel

MODEL_VARIANTS = ("fcn", "sf_none", "sf_anl", "sf_c2f")
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
    model_repeats: int = 10
    model_warmup: int = 2


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


def build_variant(name: str, cfg: BenchConfig) -> tuple[nn.Module, Callable[[Tensor], object]]:
    """The model and its inference call (image-size logits) for one benchmark variant."""
    if name == "fcn":
        model = FCNBaseline(cfg.backbone, cfg.num_classes)
        return model, model
    context = name.removeprefix("sf_")
    segmenter = PyramidSegmenter(cfg.backbone, cfg.num_classes, cfg.num_levels, context=context)
    return segmenter, lambda images: image_logits(segmenter, images, TAU)


def _images(cfg: BenchConfig, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**10  # reported in kB
    raise KeyError(field)


def cpu_forward_memory(name: str, cfg: BenchConfig) -> float:
    """Peak-RSS growth (MB) over the first forward of a freshly built model, in its own process.

    Linux: the peak (VmHWM, what ru_maxrss reports) is reset to the current RSS right before the
    forward, because a process started by a big parent inherits the parent's ru_maxrss through
    exec and would then show no growth. Elsewhere: the ru_maxrss difference.
    """
    model, infer = build_variant(name, cfg)
    model.eval()
    images = _images(cfg, torch.device("cpu"))
    gc.collect()
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
        before = _proc_status_mb("VmRSS")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
    with torch.inference_mode():
        infer(images)
    if clear_refs.exists():
        return _proc_status_mb("VmHWM") - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before


def _cpu_memory_in_subprocess(name: str, quick: bool) -> float:
    child_args = [
        "--memory-child",
        name,
        f"--threads={torch.get_num_threads()}",
        *(["--quick"] if quick else []),
    ]
    command = [sys.executable, "-m", "sfseg.bench", *child_args]
    # Large blocks are mmapped and unmapped on free, so memory freed while building the model does
    # not sit resident and get reused by the forward unseen.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def bench_models(cfg: BenchConfig, device: torch.device, quick: bool) -> dict[str, object]:
    built = {name: build_variant(name, cfg) for name in MODEL_VARIANTS}
    images = _images(cfg, device)
    for model, _ in built.values():
        model.to(device).eval()
    with torch.inference_mode():
        latency = interleaved_medians(
            {name: (lambda infer=infer: infer(images)) for name, (_, infer) in built.items()},
            cfg.model_repeats,
            cfg.model_warmup,
            device,
        )
        memory: dict[str, float] = {}
        if device.type == "cuda":
            for name, (_, infer) in built.items():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                infer(images)
                memory[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        # Multiply-accumulates: a noise-free cost that explains the measured latency ratios.
        gmacs = {name: _gmacs(infer, images) for name, (_, infer) in built.items()}
    params = {name: _params_m(model) for name, (model, _) in built.items()}
    if device.type == "cpu":
        del built  # the children need the memory more than we do
        gc.collect()
        # Each child's peak is its own, so two run at once (one per core here) to save wall time.
        with ThreadPoolExecutor(max_workers=2) as pool:
            measured = pool.map(lambda name: _cpu_memory_in_subprocess(name, quick), MODEL_VARIANTS)
            memory = dict(zip(MODEL_VARIANTS, measured, strict=True))
    variants = {
        name: {
            "latency_ms": latency[name],
            "latency_ratio": latency[name] / latency["fcn"],
            "memory_mb": memory[name],
            "memory_ratio": memory[name] / memory["fcn"],
            "params_m": params[name],
            "gmacs": gmacs[name],
        }
        for name in MODEL_VARIANTS
    }
    method = (
        "torch.cuda.max_memory_allocated during the forward minus the memory allocated before it"
        if device.type == "cuda"
        else "peak RSS growth (VmHWM = ru_maxrss, reset before) over the first forward, "
        "each variant in a fresh process"
    )
    return {
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "batch": 1,
        "num_classes": cfg.num_classes,
        "num_levels": cfg.num_levels,
        "call": "FCN: head + bilinear upsampling; S&F: sfseg.inference.image_logits (heads, fuse, upsampling)",
        "memory_method": method,
        "variants": variants,
    }


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


def run(cfg: BenchConfig, device: torch.device, quick: bool) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    results = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device.type,
            "device_name": _device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "quick": quick,
            "config": asdict(cfg),
        },
        "targets": bench_targets(cfg, device),
        "fuse": bench_fuse(cfg, device),
        "models": bench_models(cfg, device, quick),
    }
    # Other processes on the machine skew CPU timings; the 1-minute load average shows how much.
    results["meta"]["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return results


def to_markdown(results: dict) -> str:
    meta, models = results["meta"], results["models"]
    cfg = meta["config"]
    lines = [
        "# sfseg benchmark",
        "",
        f"{meta['date']}, {meta['device']} ({meta['device_name']}, {meta['threads']} threads), "
        f"torch {meta['torch']}, timm {meta['timm']}{', --quick sizes' if meta['quick'] else ''}. "
        f"Medians after warm-up, variants interleaved; load average before/after {meta['load_average']}.",
        "",
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
        f"## Inference: {models['backbone']}, {models['image_size']}x{models['image_size']}, batch 1, "
        f"{models['num_classes']} classes, L={models['num_levels']} (median of {cfg['model_repeats']})",
        "",
        "| variant | latency (ms) | vs FCN | forward memory (MB) | vs FCN | GMACs | params (M) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in models["variants"].items():
        lines.append(
            f"| {name} | {row['latency_ms']:.1f} | {row['latency_ratio']:.2f}x | {row['memory_mb']:.0f} | "
            f"{row['memory_ratio']:.2f}x | {row['gmacs']:.1f} | {row['params_m']:.1f} |"
        )
    lines += [
        "",
        f"Calls: {models['call']}.",
        f"Forward memory: {models['memory_method']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m sfseg.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json/.md")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's); 1 keeps timings steady on a shared box"
    )
    parser.add_argument("--memory-child", choices=MODEL_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    if args.memory_child:
        print(cpu_forward_memory(args.memory_child, cfg))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    results = run(cfg, torch.device(args.device), args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
