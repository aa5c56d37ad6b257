"""The stages of `python -m sfseg.gpu_check` that run the project's own commands (`sfseg.bench`,
`sfseg.train`, `sfseg.ablation`) as a user would, and read what those write: table5, training, compile,
mechanism. Each runs in its own process (sfseg.gpu_check.runner) and returns (result, problems): what it
measured, and what makes it fail. This module imports no model code, so a stage's process starts fast.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sfseg.gpu_check.sizes import CheckSizes, workers
from sfseg.sweeps import load_job_config, write_report

# Table 5 (RTX 2080 Ti, 512x512): testing FPS, training it/s, memory (GB), for the bench rows it has.
# Its "HRNet48 + ANL" (26 / 2.2 / 8.6G) is single-output ANL, a model sfseg.bench has no row for.
PAPER_TABLE5 = {
    "fcn": (28, 2.6, 8.2),
    "ccnet": (21, 1.7, 9.9),
    "ocr": (24, 2.1, 9.6),
    "sf_c2f": (24, 2.0, 8.9),
}
# Seconds of the mechanism stage kept for the report of a sweep stopped for time.
REPORT_RESERVE_S = 30
GOAL_LINE = re.compile(r"^\d+\. (?P<goal>.*): \*\*(?P<verdict>met|not met)\*\*$")


def run_command(command: Sequence[str], timeout: float | None = None) -> None:
    """Run one of the project's commands with this process's output; raise on an error or a timeout."""
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, timeout=timeout)


def paper_ratios(variant: str) -> dict[str, float | None]:
    """Table 5's time, training-step and memory ratios of `variant` to HRNet48 (FCN), where it has one."""
    if variant not in PAPER_TABLE5:
        return {"paper_time_ratio": None, "paper_train_ratio": None, "paper_memory_ratio": None}
    (fps, its, memory), (fcn_fps, fcn_its, fcn_memory) = PAPER_TABLE5[variant], PAPER_TABLE5["fcn"]
    return {
        "paper_time_ratio": fcn_fps / fps,
        "paper_train_ratio": fcn_its / its,
        "paper_memory_ratio": memory / fcn_memory,
    }


def table5(sizes: CheckSizes, device: torch.device, folder: Path, seconds: float) -> tuple[dict, list[str]]:
    """`sfseg.bench` on this device with the Table 5 rows, and the paper's ratios beside its own."""
    command = [sys.executable, "-m", "sfseg.bench", "--device", device.type, "--out", str(folder)]
    command += ["--variants", sizes.bench_variants, *(["--quick"] if sizes.bench_quick else [])]
    run_command(command)
    results = json.loads((folder / "results.json").read_text())
    models = results["models"]
    keys = ("variant", "path", "undecided_share", "latency_ms", "latency_ratio", "memory_ratio")
    train_keys = ("train_step_ms", "train_step_ratio", "train_memory_mb", "train_memory_ratio")
    rows = []
    for row in models["rows"]:
        dense = row["path"] == "dense"
        paper = paper_ratios(row["variant"] if dense else "")
        rows.append({key: row[key] for key in keys} | {key: row.get(key) for key in train_keys} | paper)
    measured = {row["variant"] for row in rows}
    problems = [
        f"no row for {variant}" for variant in sizes.bench_variants.split(",") if variant not in measured
    ]
    bench = {key: models[key] for key in ("backbone", "image_size", "num_classes", "train_batch")}
    bench["device_name"] = results["meta"]["device_name"]
    return {
        "command": " ".join(command[1:]),
        "results": str(folder / "results.md"),
        "bench": bench,
        "rows": rows,
    }, problems


def compile_stage(
    sizes: CheckSizes, device: torch.device, folder: Path, seconds: float
) -> tuple[dict, list[str]]:
    """`sfseg.bench --compile-check` on this device: model.compile and model.channels_last against eager
    (on CUDA hrnet_w48 at 512x512 in bf16); a setting whose output is not eager's is a problem."""
    command = [sys.executable, "-m", "sfseg.bench", "--device", device.type, "--out", str(folder)]
    command += ["--compile-check", *(["--quick"] if sizes.bench_quick else [])]
    run_command(command)
    results = json.loads((folder / "results.json").read_text())
    check = results["compile_check"]
    problems = [
        f"{row['setting']}: {path} inference differs from eager's"
        for row in check["rows"]
        for path in ("dense", "sparse")
        if not row[f"agrees_{path}"]["agrees"]
    ]
    result = {"command": " ".join(command[1:]), "results": str(folder / "results.md")}
    return result | {"device_name": results["meta"]["device_name"]} | check, problems


def training_overrides(sizes: CheckSizes, device: torch.device, folder: Path) -> list[str]:
    """`python -m sfseg.train` on the embedded data at the check's sizes, bf16, timed by StepTimes, with
    no checkpoint (its save would land inside the timed steps)."""
    return [
        f"model/backbone={sizes.train_backbone}",
        f"model.semantic_channels={sizes.semantic_channels}",
        f"model.unity_channels={sizes.unity_channels}",
        f"data.size={sizes.train_size}",
        f"data.batch_size={sizes.train_batch}",
        f"data.num_workers={workers(sizes)}",
        f"data.val_samples={sizes.train_val_samples}",
        f"data.val_batch_size={sizes.train_batch}",
        f"trainer.max_steps={sizes.train_steps}",
        "trainer.precision=bf16-mixed",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint",
        "num_pyramid_images=0",
        f"hydra.run.dir='{folder}'",
        "+callbacks.step_times._target_=sfseg.callbacks.StepTimes",
        f"+callbacks.step_times.path='{folder / 'step_times.json'}'",
    ]


def training(sizes: CheckSizes, device: torch.device, folder: Path, seconds: float) -> tuple[dict, list[str]]:
    """bf16 training steps of the check's backbone on the embedded data: throughput, the data's share of
    the step time, peak memory, and the loss at the start and the end."""
    run_command([sys.executable, "-m", "sfseg.train", *training_overrides(sizes, device, folder)])
    record = json.loads((folder / "step_times.json").read_text())
    steps = record["steps"]
    timed = steps[sizes.train_warmup :]
    total = sum(step["data_s"] + step["step_s"] for step in timed)
    losses = [step["loss"] for step in steps]
    loss_steps = max(1, min(10, len(steps) // 10))
    result = {
        "run_dir": str(folder),
        "backbone": sizes.train_backbone,
        "size": sizes.train_size,
        "batch": sizes.train_batch,
        "steps": len(steps),
        "warmup": sizes.train_warmup,
        "workers": workers(sizes),
        "precision": record["precision"],
        "images_per_s": sum(step["batch"] for step in timed) / total,
        "median_step_s": statistics.median(step["data_s"] + step["step_s"] for step in timed),
        "data_share": sum(step["data_s"] for step in timed) / total,
        "peak_memory_mb": record["peak_memory_mb"],
        "memory_method": record["memory_method"],
        "loss_steps": loss_steps,
        "loss_start": statistics.fmean(losses[:loss_steps]),
        "loss_end": statistics.fmean(losses[-loss_steps:]),
    }
    problems = [] if len(steps) == sizes.train_steps else [f"{len(steps)} of {sizes.train_steps} steps ran"]
    if not all(map(math.isfinite, losses)):
        problems.append("non-finite training loss")
    return result, problems


def mechanism(
    sizes: CheckSizes, device: torch.device, folder: Path, seconds: float
) -> tuple[dict, list[str]]:
    """`sfseg.ablation --preset mechanism` with all the preset's seeds when `seconds` allow, else fewer.
    Out of time, it reports the jobs that finished."""
    seeds = sizes.mechanism_seeds if seconds >= sizes.mechanism_full_s else sizes.mechanism_short_seeds
    command = [
        sys.executable,
        "-m",
        "sfseg.ablation",
        "--preset",
        "mechanism",
        "--seeds",
        seeds,
        "--out",
        str(folder),
    ]
    if sizes.mechanism_steps is not None:
        command += ["--steps", str(sizes.mechanism_steps)]
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    command += [f"trainer.accelerator={accelerator}", f"data.num_workers={workers(sizes)}"]
    command += ["trainer.enable_progress_bar=false", *sizes.mechanism_overrides]
    result: dict[str, Any] = {
        "command": " ".join(command[1:]),
        "seeds": seeds,
        "report": str(folder / "report.md"),
    }
    start = time.monotonic()
    try:
        run_command(command, timeout=seconds - REPORT_RESERVE_S)
    except subprocess.TimeoutExpired:
        # The sweep's training process is left to the stage's end, when the runner stops its group.
        return partial_mechanism(
            folder, result | {"seconds": time.monotonic() - start}, 2 * len(seeds.split(","))
        )
    report = (folder / "report.md").read_text()
    goals = [match.groupdict() for match in map(GOAL_LINE.match, report.splitlines()) if match]
    result |= {
        "seconds": time.monotonic() - start,
        "steps": job_steps(folder),
        "goals": [{"goal": goal["goal"], "met": goal["verdict"] == "met"} for goal in goals],
        "report_md": report,
    }
    return result, [] if goals else ["the report states no goals"]


def job_steps(folder: Path) -> int | None:
    """trainer.max_steps of the sweep's first job, None before any job started."""
    job = next(folder.glob("*/config.yaml"), None)
    return None if job is None else load_job_config(job.parent)["trainer"]["max_steps"]


def partial_mechanism(folder: Path, result: dict[str, Any], jobs: int) -> tuple[dict, list[str]]:
    """A sweep stopped for time: sfseg.sweeps' table of the jobs that finished, by L."""
    finished = len(list(folder.glob("*/metrics.json")))
    problems = [
        f"out of time after {finished} of {jobs} jobs ({result['seconds']:.0f} s): fewer seeds or more --minutes"
    ]
    result |= {"steps": job_steps(folder), "goals": [], "report_md": "No job finished in time."}
    if finished:
        result |= {
            "report": str(folder / "report.md"),
            "report_md": write_report(folder, by=["model.levels"])[2],
        }
    return result, problems


StageFunction = Callable[[CheckSizes, torch.device, Path, float], tuple[dict, list[str]]]
COMMAND_STAGES: dict[str, StageFunction] = {
    "table5": table5,
    "training": training,
    "compile": compile_stage,
    "mechanism": mechanism,
}
