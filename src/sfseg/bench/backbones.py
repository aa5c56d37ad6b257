"""The Backbones table of `sfseg.bench --backbones`: the S&F model on each named backbone and on the
reference, parameters and GMACs of a dense inference, and the training step time relative to the
reference's."""

from __future__ import annotations

from dataclasses import replace

import torch

from sfseg.bench.harness import BenchConfig, bench_images, count_gmacs, count_params_m, interleaved_medians
from sfseg.bench.variants import PYRAMID_PREFIX, Case, build_variant, inference_call, training_call

# The Backbones table's model: S&F with the paper's final context module, at BenchConfig.num_levels.
BACKBONES_VARIANT = "sf_c2f"


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
    images = bench_images(cfg, device)
    rows = {}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            rows[name] = {
                "backbone": name,
                "adapter": type(model.backbone).__name__,
                "size_divisor": model.size_divisor,
                "encoder_params_m": count_params_m(model.backbone.body),
                "backbone_params_m": count_params_m(model.backbone),
                "params_m": count_params_m(model),
                "encoder_gmacs": count_gmacs(model.backbone.body, images),
                "backbone_gmacs": count_gmacs(model.backbone, images),
                "gmacs": count_gmacs(inference_call(model, Case(BACKBONES_VARIANT), cfg, device), images),
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
