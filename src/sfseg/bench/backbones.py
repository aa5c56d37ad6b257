"""The Backbones table of `sfseg.bench --backbones`: the S&F model on each named backbone and on the
reference, each as the training config builds it (`variants.model_spec`: its decoder and heads);
parameters and GMACs of a dense inference split into encoder, decoder (with a ViT's neck) and heads, the
FCN baseline's GMACs on the same encoder and decoder and the sparse path's at a third of the finest
cells undecided; the training step time relative to the reference's, and with the encoder frozen relative
to unfrozen; with --frozen-memory, the training step's peak memory frozen and not."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from sfseg.bench.harness import (
    BenchConfig,
    bench_images,
    count_gmacs,
    count_gmacs_by_module,
    count_params_m,
    interleaved_medians,
)
from sfseg.bench.memory import MemoryJob, cpu_memory_in_subprocesses, cuda_peak_memory
from sfseg.bench.variants import (
    PYRAMID_PREFIX,
    Case,
    build_variant,
    inference_call,
    model_spec,
    training_call,
)
from sfseg.inference.sparse import even_level_shares
from sfseg.models import FCNHead, PyramidSegmenter

# The Backbones table's model: S&F with the paper's final context module, at BenchConfig.num_levels.
BACKBONES_VARIANT = "sf_c2f"
# The sparse column's share of undecided finest cells (about what the trained embedded default leaves).
SPARSE_SHARE = 0.33


def parse_backbones(text: str) -> tuple[str, ...]:
    """--backbones: a comma list of model.backbone.name values (sfseg's or any timm model's)."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError(f"--backbones {text!r}: give a comma list of backbone names (model.backbone.name)")
    return names


def frozen_copy(model: PyramidSegmenter) -> PyramidSegmenter:
    """The same network (same weights) with its encoder frozen (model.backbone.freeze=true)."""
    frozen = copy.deepcopy(model)
    frozen.backbone.freeze()
    return frozen


def cost_row(name: str, model: PyramidSegmenter, cfg: BenchConfig, device: torch.device) -> dict[str, object]:
    """Parameters and GMACs of one inference at cfg.image_size: the encoder (the timm model), the decoder
    (with a ViT's neck), the heads (with the fuse and the upsampling); the FCN baseline on the same
    encoder and decoder (its head, HRNet's, at the decoder's width); the sparse path at SPARSE_SHARE."""
    images = bench_images(cfg, device)
    backbone, spec = model.backbone, model_spec(name)
    with torch.inference_mode():
        counted = count_gmacs_by_module(inference_call(model, Case(BACKBONES_VARIANT), cfg, device), images)
        encoder = next(value for key, value in counted.items() if key.endswith("backbone.body"))
        decoder = next(value for key, value in counted.items() if key.endswith(".backbone")) - encoder
        size = cfg.image_size // backbone.stride
        head = FCNHead(backbone.out_channels, cfg.num_classes).to(device).eval()
        fcn_head = count_gmacs(head, torch.zeros(1, backbone.out_channels, size, size, device=device))
        shares = tuple(even_level_shares(SPARSE_SHARE, cfg.num_levels))
        sparse = count_gmacs(inference_call(model, Case(BACKBONES_VARIANT, shares), cfg, device), images)
    params = [count_params_m(part) for part in (backbone.body, backbone, model)]
    return {
        "backbone": name,
        "encoder": type(backbone.encoder).__name__,
        "decoder": spec.decoder["name"],
        "decoder_channels": backbone.out_channels,
        "semantic_channels": spec.semantic_channels,
        "unity_channels": spec.unity_channels,
        "size_divisor": model.size_divisor,
        "encoder_params_m": params[0],
        "decoder_params_m": params[1] - params[0],
        "heads_params_m": params[2] - params[1],
        "params_m": params[2],
        "encoder_gmacs": encoder,
        "decoder_gmacs": decoder,
        "heads_gmacs": counted["Global"] - encoder - decoder,
        "gmacs": counted["Global"],
        "fcn_gmacs": encoder + decoder + fcn_head,
        "sparse_gmacs": sparse,
        "sparse_vs_fcn": sparse / (encoder + decoder + fcn_head),
    }


def frozen_memory(
    names: tuple[str, ...], cfg: BenchConfig, device: torch.device, quick: bool, models: dict[str, nn.Module]
) -> dict[str, dict[str, float]]:
    """Peak memory (MB) of one training step, the encoder frozen and not: on CPU the peak RSS growth in a
    fresh process each (training steps one at a time); on CUDA torch.cuda.max_memory_allocated."""
    if device.type == "cpu":
        jobs = [
            MemoryJob(Case(BACKBONES_VARIANT), True, name, frozen)
            for name in names
            for frozen in (False, True)
        ]
        peaks = iter(cpu_memory_in_subprocesses(jobs, quick))
        return {
            name: {"train_memory_mb": next(peaks), "frozen_train_memory_mb": next(peaks)} for name in names
        }
    measured = {}
    for name in names:
        memory = {
            frozen: cuda_peak_memory(
                training_call(
                    models[name, frozen].train(), BACKBONES_VARIANT, replace(cfg, backbone=name), device
                ),
                device,
            )
            for frozen in (False, True)
        }
        measured[name] = {"train_memory_mb": memory[False], "frozen_train_memory_mb": memory[True]}
    return measured


def bench_backbones(
    cfg: BenchConfig,
    device: torch.device,
    backbones: tuple[str, ...],
    quick: bool = False,
    memory_of: tuple[str, ...] = (),
) -> dict[str, object]:
    """The Backbones table: `cost_row` of the S&F model (BACKBONES_VARIANT) on the reference cfg.backbone
    and on each of `backbones`, and the training step times, every model unfrozen and frozen, all
    interleaved: the ratios to the reference's unfrozen step and of each frozen step to its unfrozen
    one. `memory_of`: rows whose training step's peak memory is measured frozen and not."""
    names = tuple(dict.fromkeys((cfg.backbone, *backbones)))
    unknown = sorted(set(memory_of) - set(names))
    if unknown:
        raise ValueError(
            f"--frozen-memory {', '.join(unknown)}: not among the measured backbones {', '.join(names)}"
        )
    models: dict[tuple[str, bool], PyramidSegmenter] = {}
    for name in names:
        models[name, False] = build_variant(BACKBONES_VARIANT, replace(cfg, backbone=name)).to(device).eval()
        models[name, True] = frozen_copy(models[name, False])
    rows = {name: cost_row(name, models[name, False], cfg, device) for name in names}
    steps = {
        key: training_call(model.train(), BACKBONES_VARIANT, replace(cfg, backbone=key[0]), device)
        for key, model in models.items()
    }
    train_step = interleaved_medians(steps, cfg.train_repeats, cfg.train_warmup, device)
    for name, row in rows.items():
        row["train_step_ms"] = train_step[name, False]
        row["train_step_ratio"] = train_step[name, False] / train_step[cfg.backbone, False]
        row["frozen_train_step_ms"] = train_step[name, True]
        row["frozen_step_ratio"] = train_step[name, True] / train_step[name, False]
    for name, memory in frozen_memory(memory_of, cfg, device, quick, models).items():
        rows[name] |= memory | {
            "frozen_memory_ratio": memory["frozen_train_memory_mb"] / memory["train_memory_mb"]
        }
    return {
        "reference": cfg.backbone,
        "variant": BACKBONES_VARIANT,
        "num_levels": cfg.num_levels,
        "num_classes": cfg.num_classes,
        "image_size": cfg.image_size,
        "sparse_share": SPARSE_SHARE,
        "train_batch": cfg.train_batch,
        "train_size": cfg.train_size,
        "rows": list(rows.values()),
    }


def backbones_markdown(table: dict, cfg: dict) -> list[str]:
    size, train_size, reference = table["image_size"], table["train_size"], table["reference"]
    lines = [
        f"## Backbones: S&F ({table['variant'].removeprefix(PYRAMID_PREFIX)}, L={table['num_levels']}, "
        f"{table['num_classes']} classes) on each backbone",
        "",
        "Each backbone as the training config builds it (model/backbone=<name>, or model/backbone=timm "
        "model.backbone.name=<name>): its decoder, of width D, and the heads' widths D_s, D_u that go with it. "
        f"Parameters and GMACs of one dense inference (batch 1, {size}x{size}, FlopCounterMode) split into the "
        "encoder (the timm model), the decoder (with a ViT's neck) and the heads (with the fuse and the "
        "upsampling); FCN: the backbone with HRNet's FCN head at D (Table 5's baseline) on the same encoder "
        f"and decoder; sparse: S&F on the sparse path with {table['sparse_share']} of the finest cells "
        f"undecided. Training step: batch {table['train_batch']}, {train_size}x{train_size}, median of "
        f"{cfg['train_repeats']} after {cfg['train_warmup']} warm-up, every model unfrozen and with its encoder "
        f"frozen (model.backbone.freeze=true), all interleaved; ratios to {reference}'s unfrozen step and of "
        "each frozen step to its unfrozen one.",
        "",
        "| backbone | encoder | decoder (D) | D_s, D_u | params (M): encoder | decoder | heads | GMACs: encoder "
        f"| decoder | heads | S&F | FCN | sparse | sparse vs FCN | train step (ms) | vs {reference} | frozen vs unfrozen |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        lines.append(
            f"| {row['backbone']} | {row['encoder']} | {row['decoder']} ({row['decoder_channels']}) | "
            f"{row['semantic_channels']}, {row['unity_channels']} | {row['encoder_params_m']:.1f} | "
            f"{row['decoder_params_m']:.1f} | {row['heads_params_m']:.1f} | {row['encoder_gmacs']:.1f} | "
            f"{row['decoder_gmacs']:.1f} | {row['heads_gmacs']:.1f} | {row['gmacs']:.1f} | {row['fcn_gmacs']:.1f} | "
            f"{row['sparse_gmacs']:.1f} | {row['sparse_vs_fcn']:.2f}x | {row['train_step_ms']:.0f} | "
            f"{row['train_step_ratio']:.2f}x | {row['frozen_step_ratio']:.2f}x |"
        )
    return [*lines, "", *frozen_memory_markdown(table["rows"])]


def frozen_memory_markdown(rows: list[dict]) -> list[str]:
    measured = [row for row in rows if "train_memory_mb" in row]
    if not measured:
        return []
    lines = [
        "### A frozen encoder: training step and its peak memory",
        "",
        "Peak memory of one training step (on CPU the peak RSS growth in a fresh process each), the encoder "
        "unfrozen and frozen; the step times are the table's.",
        "",
        "| backbone | train memory (MB) | frozen (MB) | frozen vs unfrozen: memory | step |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in measured:
        lines.append(
            f"| {row['backbone']} | {row['train_memory_mb']:.0f} | {row['frozen_train_memory_mb']:.0f} | "
            f"{row['frozen_memory_ratio']:.2f}x | {row['frozen_step_ratio']:.2f}x |"
        )
    return [*lines, ""]
