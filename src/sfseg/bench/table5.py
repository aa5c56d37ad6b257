"""Table 5 of `sfseg.bench`: every case's inference latency, peak memory and GMACs, every variant's training
step time and peak memory, and parameters, as ratios to FCN measured in the same run."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import Tensor, nn

from sfseg.bench.harness import (
    TAU,
    BenchConfig,
    bench_images,
    count_gmacs,
    count_params_m,
    interleaved_medians,
)
from sfseg.bench.memory import CPU_MEMORY_METHOD, cuda_peak_memory, measure_cpu_memory
from sfseg.bench.variants import (
    MODEL_VARIANTS,
    Case,
    build_variant,
    inference_call,
    is_pyramid,
    training_call,
)
from sfseg.inference import evaluate, load
from sfseg.inference.sparse import even_level_shares
from sfseg.module import auxiliary_weight


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


def _undecided_share(level_map: Tensor, num_levels: int) -> float:
    return (level_map == num_levels - 1).float().mean().item()


def measure_inference(
    cases: list[Case], models: dict[str, nn.Module], cfg: BenchConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per case: median latency (interleaved), GMACs, the undecided share on the level map of the
    run (sparse cases) and, on CUDA, peak memory."""
    calls = {case.name: inference_call(models[case.variant], case, cfg, device) for case in cases}
    images = bench_images(cfg, device)
    with torch.inference_mode():
        measured = {
            "latency": interleaved_medians(
                {name: (lambda infer=infer: infer(images)) for name, infer in calls.items()},
                cfg.model_repeats,
                cfg.model_warmup,
                device,
            ),
            # Multiply-accumulates of the ops actually dispatched: gathered cells count at their number.
            "gmacs": {name: count_gmacs(infer, images) for name, infer in calls.items()},
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
    params = {variant: count_params_m(model) for variant, model in models.items()}
    measured = measure_inference(cases, models, cfg, device) | measure_training(models, cfg, device)
    del models
    gc.collect()  # the memory children need the memory more than we do
    if device.type == "cpu":
        measured |= measure_cpu_memory(cases, variants, quick)
        method = CPU_MEMORY_METHOD
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


def _cell(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


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
