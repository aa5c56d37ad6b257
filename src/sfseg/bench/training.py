"""Where a training run's time goes (`python -m sfseg.bench --training [--overrides ...]`): the run of a
`sfseg.train` config (default: the embedded default, `make train`) taken apart and each piece timed on
the real objects that `sfseg.train` builds.

Per optimizer step: the loader's work on one batch (rendering the synthetic scenes, where the data is
synthetic, and the albumentations pipeline; in `make train` it runs in a loader process beside the
training process), the pyramid targets (`on_after_batch_transfer`), the network's forward, the loss
(relabel and Eq. 1), the backward and the optimizer step. Per run: one validation over the val split,
the picture (`pyramid.png`) and the start of the process (importing `sfseg.train`). The projection adds
them up as the run does them; the time of a whole run is `make train`'s own (docs/training.md).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch.utils.data import default_collate

from sfseg import CONFIG_DIR
from sfseg.bench.harness import interleaved_medians
from sfseg.builder import build, save_pyramid_png
from sfseg.data.transforms import apply
from sfseg.module import training_loss

STEP_PARTS = ("targets", "forward", "loss", "backward", "optimizer")
CPU = torch.device("cpu")


def training_config(overrides: Sequence[str], run_dir: Path) -> DictConfig:
    """The config `python -m sfseg.train <overrides>` composes, with its run folder at `run_dir`."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The harness's interleaved medians (no warm-up), in seconds."""
    return {name: ms / 1e3 for name, ms in interleaved_medians(calls, repeats, 0, CPU).items()}


def loader_seconds(datamodule: Any, batch_size: int, repeats: int) -> dict[str, float]:
    """One batch's loader work: rendering its scenes (synthetic data only) and the training pipeline."""
    dataset = datamodule.train_set
    indices = range(batch_size)
    if hasattr(dataset, "render"):
        scenes = [dataset.render(i) for i in indices]
        return median_seconds(
            {
                "render": lambda: [dataset.render(i) for i in indices],
                "augment": lambda: default_collate([apply(dataset.transform, *scene) for scene in scenes]),
            },
            repeats,
        )
    # Files on disk: reading and decoding are part of the dataset's __getitem__.
    return median_seconds(
        {"read_and_augment": lambda: default_collate([dataset[i] for i in indices])}, repeats
    )


def step_seconds(model: Any, datamodule: Any, batch: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each part of a training step, on one batch, in the model's training mode."""
    model.train()
    optimizer = model.build_optimizer()  # the run's own kind of step (model.optimizer.name)
    samples: dict[str, list[float]] = {part: [] for part in STEP_PARTS}
    for index in range(warmup + repeats):
        marks = [time.perf_counter()]
        prepared = datamodule.on_after_batch_transfer(dict(batch), 0)
        marks.append(time.perf_counter())
        out = model.net(prepared["image"])
        marks.append(time.perf_counter())
        loss, _ = training_loss(
            out, prepared["targets"], model.policy, model.tau, model.loss_settings, model.aux_weight,
            model.ignore_index, model.net.fuse_rule,
        )  # fmt: skip
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if index >= warmup:
            for part, start, end in zip(STEP_PARTS, marks[:-1], marks[1:], strict=True):
                samples[part].append(end - start)
    return {part: statistics.median(times) for part, times in samples.items()}


def validation_seconds(model: Any, datamodule: Any) -> float:
    """One validation over the val split as `sfseg.train` runs it (its loader, metrics, every fuse rule),
    after a first pass that warms the loader (a synthetic split is rendered once, then kept)."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)
    start = time.perf_counter()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return time.perf_counter() - start


def startup_seconds(repeats: int = 3) -> float:
    """Starting a Python process that imports `sfseg.train` (what every `python -m sfseg.train` pays)."""
    command = [sys.executable, "-c", "import sfseg.train"]
    return median_seconds({"start": lambda: subprocess.run(command, check=True)}, repeats)["start"]


def validations_during_fit(trainer: DictConfig, steps: int, steps_per_epoch: int) -> int:
    """How often fit validates: every `val_check_interval` steps (an int, with check_val_every_n_epoch
    null), else every check_val_every_n_epoch epochs."""
    interval = trainer.get("val_check_interval")
    if trainer.get("check_val_every_n_epoch") is None and isinstance(interval, int):
        return steps // interval
    return steps // steps_per_epoch // int(trainer.check_val_every_n_epoch)


def bench_training(overrides: Sequence[str], quick: bool = False) -> dict[str, Any]:
    """Each piece of a training run's time (medians; `quick`: of fewer repeats), for the projection."""
    warmup, repeats, startup_repeats = (1, 2, 1) if quick else (2, 10, 3)
    with tempfile.TemporaryDirectory() as folder:
        cfg = training_config(overrides, Path(folder))
        datamodule, model, _ = build(cfg)
        datamodule.setup("fit")
        batch_size = cfg.data.batch_size
        batch = default_collate([datamodule.train_set[i] for i in range(batch_size)])
        loader = loader_seconds(datamodule, batch_size, max(repeats // 2, 1))
        step = step_seconds(model, datamodule, batch, warmup, repeats)
        validation = validation_seconds(model, datamodule)
        start = time.perf_counter()
        save_pyramid_png(model, datamodule, Path(folder) / "pyramid.png", cfg.num_pyramid_images)
        picture = time.perf_counter() - start
    steps = int(cfg.trainer.max_steps)
    steps_per_epoch = len(datamodule.train_set) // batch_size
    validations = validations_during_fit(cfg.trainer, steps, steps_per_epoch) + 1  # + the final one
    return {
        "overrides": list(overrides),
        "batch_size": batch_size,
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "keeps_scenes": bool(getattr(datamodule.train_set, "keeps_scenes", False)),
        "validations": validations,
        "loader_per_batch_s": loader,
        "step_s": step,
        "validation_s": validation,
        "picture_s": picture,
        "startup_s": startup_seconds(startup_repeats),
    }


def projected_run(result: dict[str, Any]) -> dict[str, float]:
    """The run's seconds by piece: every step's parts, the loader's work (in parallel in a loader process,
    but on a 2-core machine it takes its share of the cores; kept scenes are rendered in the first epoch
    only), the validations, the picture, the start."""
    steps = result["steps"]
    batches = {part: steps for part in result["loader_per_batch_s"]}
    if result["keeps_scenes"]:
        batches["render"] = min(steps, result["steps_per_epoch"])
    pieces = {f"step: {part}": steps * seconds for part, seconds in result["step_s"].items()}
    pieces.update({f"loader: {part}": batches[part] * s for part, s in result["loader_per_batch_s"].items()})
    pieces["validations"] = result["validations"] * result["validation_s"]
    pieces["picture"] = result["picture_s"]
    pieces["process start"] = result["startup_s"]
    return pieces


def training_markdown(results: Sequence[dict[str, Any]]) -> list[str]:
    """One table per measured config: each piece's seconds per step (or per event) and over the run."""
    lines = ["## Where a training run's time goes", ""]
    for result in results:
        pieces = projected_run(result)
        total = sum(pieces.values())
        step_total = sum(result["step_s"].values())
        lines += [
            f"`{' '.join(['python -m sfseg.train', *result['overrides']])}`",
            "",
            f"{result['steps']} steps of batch {result['batch_size']}, {result['validations']} validations. "
            f"A step (targets to optimizer) {step_total:.3f} s.",
            "",
            "| piece | seconds each | seconds in the run | share |",
            "|---|---:|---:|---:|",
        ]
        each = {f"step: {part}": s for part, s in result["step_s"].items()}
        each.update({f"loader: {part}": s for part, s in result["loader_per_batch_s"].items()})
        each.update(
            {
                "validations": result["validation_s"],
                "picture": result["picture_s"],
                "process start": result["startup_s"],
            }
        )
        for piece, seconds in pieces.items():
            lines.append(f"| {piece} | {each[piece]:.3f} | {seconds:.0f} | {100 * seconds / total:.1f} % |")
        lines += [f"| **sum** | | **{total:.0f}** | |", ""]
    return lines
