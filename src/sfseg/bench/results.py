"""One `sfseg.bench` run: its sections measured in turn, with what the numbers depend on (device,
threads, versions, sizes, the load of the machine), and results.md from results.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from sfseg.bench.backbones import backbones_markdown, bench_backbones
from sfseg.bench.compile_check import bench_compile_check, compile_check_config, compile_check_markdown
from sfseg.bench.harness import BenchConfig, device_name
from sfseg.bench.profiling import PROFILE_SHARE, profile_markdown, profile_table
from sfseg.bench.pyramid_math import bench_fuse, bench_targets, pyramid_math_markdown
from sfseg.bench.table5 import bench_models, checkpoint_level_shares, table5_markdown
from sfseg.bench.training import bench_training, training_markdown
from sfseg.bench.variants import MODEL_VARIANTS


def run(
    cfg: BenchConfig,
    device: torch.device,
    quick: bool,
    ckpt: Path | None = None,
    profile: bool = False,
    variants: tuple[str, ...] = MODEL_VARIANTS,
    backbones: tuple[str, ...] | None = None,
    frozen_memory: tuple[str, ...] = (),
    compile_check: bool = False,
    training: list[list[str]] | None = None,
) -> dict[str, object]:
    """Table 5 and the pyramid math (with `profile`, the profiles); with `backbones`, the Backbones
    table alone (with the training memory of the `frozen_memory` rows, frozen and not); with
    `compile_check`, model.compile and model.channels_last against eager alone; with `training`
    (lists of `sfseg.train` overrides), where those runs' time goes, alone."""
    load_before = os.getloadavg()[0]
    results: dict[str, object] = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device.type,
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "quick": quick,
            "checkpoint": str(ckpt) if ckpt else None,
            "config": asdict(cfg),
        }
    }
    if backbones:
        results["backbones"] = bench_backbones(cfg, device, backbones, quick, frozen_memory)
    elif training:
        results["training"] = [bench_training(overrides, quick) for overrides in training]
    elif compile_check:
        results["compile_check"] = bench_compile_check(compile_check_config(device, quick), device)
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


def to_markdown(results: dict) -> str:
    """results.md: what the run depends on, then each section's tables."""
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
    if "training" in results:
        return "\n".join(lines + training_markdown(results["training"]))
    if "compile_check" in results:
        return "\n".join(lines + compile_check_markdown(results["compile_check"]))
    lines += pyramid_math_markdown(results["targets"], results["fuse"], cfg["repeats"])
    lines += table5_markdown(results["models"], cfg, meta["checkpoint"])
    lines += profile_markdown(results.get("profile", {}))
    return "\n".join(lines)


def write_results(out: Path, results: dict) -> None:
    """<out>/results.json and <out>/results.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results))
