"""The pyramid math's cost in `sfseg.bench`: build_targets + relabel against a copy of the label batch,
the fuse against an argmax over the finest logits."""

from __future__ import annotations

import torch

from sfseg.bench.harness import TAU, BenchConfig, interleaved_medians, realistic_labels
from sfseg.pyramid import IGNORE_INDEX, build_targets, fuse, level_strides, relabel


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


def pyramid_math_markdown(targets: dict, fuse_row: dict, repeats: int) -> list[str]:
    lines = [
        f"## Pyramid math (median of {repeats})",
        "",
        "| operation | input | time (ms) | baseline | baseline (ms) | ratio |",
        "|---|---|---:|---|---:|---:|",
    ]
    for row in (targets, fuse_row):
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"| {row['operation']} | {shape}, L={row['num_levels']} | {row['time_ms']:.2f} | "
            f"{row['baseline']} | {row['baseline_ms']:.2f} | {row['ratio']:.2f}x |"
        )
    return [*lines, "", f"Unity-cell share of the labels, coarse to fine: {targets['unity_cell_share']}.", ""]
