"""Tracking, read back from the run files: W&B with the real client offline (what a sweep's jobs write),
and TensorBoard's event files next to the CSV logger's table."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from tests.conftest import TINY
from tests.test_reproducibility import run_train

pytestmark = pytest.mark.slow

# Two validations per run (16 images at batch 4: an epoch is 4 steps), then the final one.
SWEEP = [
    "-m",
    *TINY,
    "num_pyramid_images=0",
    "logger=wandb",
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=1",
    "callbacks.last_checkpoint.every_n_train_steps=4",
    "model.levels=1,4",
]
# What every run logs: the losses, the fused, per-level and unity metrics of each validation.
LOGGED = {
    "train/loss",
    *(f"train/ce_level{i}" for i in range(1, 5)),
    *(f"train/bce_level{i}" for i in range(1, 4)),
    "val/mIoU",
    "val/mIoU_finest",
    "val/pixel_acc",
    "val/loss",
    *(f"val/{name}_level{i}" for name in ("mIoU", "share") for i in range(1, 5)),
    *(f"val/unity_{name}_level{i}" for name in ("precision", "recall") for i in range(1, 4)),
}
BLOCK_SIZE = 32 * 1024  # the .wandb file is a LevelDB-style log of protobuf records
RECORD_HEADER = 7  # checksum (4), length (2), type (1)
FULL, LAST = 1, 4


@dataclass
class WandbRun:
    """What one offline run directory holds: the run record, config, summary and history rows."""

    directory: Path
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks, found = RECORD_HEADER, [], []
    while position + RECORD_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < RECORD_HEADER:  # block trailer padding
            position += left_in_block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunks.append(data[position + RECORD_HEADER : position + RECORD_HEADER + length])
        position += RECORD_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            found.append(record)
            chunks = []
    return found


def read_run(directory: Path) -> WandbRun:
    (log,) = directory.glob("*.wandb")
    run = WandbRun(directory)
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run = record.run
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            run.summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
        elif kind == "history":
            run.history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return run


def run_dirs(job: Path) -> list[Path]:
    return sorted((job / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A two-job sweep logged to W&B, then resumed from last.ckpt to 12 steps: job folder per L."""
    root = tmp_path_factory.mktemp("tracking")
    sweep_dir = root / "sweep"
    first = run_train(*SWEEP, f"hydra.sweep.dir={sweep_dir}", cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(
        *SWEEP, "trainer.max_steps=12", "ckpt_path=last", f"hydra.sweep.dir={sweep_dir}", cwd=root
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    jobs = {}
    for metrics_file in sweep_dir.glob("*/metrics.json"):
        config = yaml.safe_load((metrics_file.parent / "config.yaml").read_text())
        jobs[config["model"]["levels"]] = metrics_file.parent
    assert sorted(jobs) == [1, 4]
    return jobs


def test_each_sweep_job_is_its_own_run_in_one_group(sweep: dict[int, Path]):
    runs = {levels: read_run(run_dirs(job)[0]) for levels, job in sweep.items()}
    assert runs[1].run.run_id != runs[4].run.run_id  # wandb.finish() between the jobs
    sweep_name = sweep[1].parent.name
    assert runs[1].run.run_group == runs[4].run.run_group == f"train-{sweep_name}"
    for levels, job in sweep.items():
        assert runs[levels].run.display_name == job.name
        assert runs[levels].run.project == "sfseg"


def test_resolved_config_losses_and_metrics_are_logged(sweep: dict[int, Path]):
    run = read_run(run_dirs(sweep[4])[0])
    assert run.config["model"]["levels"] == 4 and run.config["data"]["num_levels"] == 4
    assert run.config["logger"]["wandb"]["id"] == run.run.run_id
    assert {key for row in run.history for key in row} >= LOGGED
    validations = [row for row in run.history if "val/mIoU" in row]
    assert len(validations) == 3  # after each of the 2 epochs, and the final one of the best checkpoint


def test_images_with_mask_overlays_and_the_per_class_table(sweep: dict[int, Path]):
    directory = run_dirs(sweep[4])[0]
    run = read_run(directory)
    images = [row for row in run.history if "val/examples/_type" in row]
    assert len(images) == 3 and all(row["val/examples/count"] == 4 for row in images)
    media = directory / "files" / "media"
    assert len(list((media / "images" / "val").glob("examples_*.png"))) >= 8
    assert list((media / "images" / "mask" / "val").glob("examples_*.mask.png"))
    labels = run.config["_wandb"]["mask/class_labels"]
    assert labels["val/examples_wandb_delimeter_ground_truth"]["value"]["4"] == "road"
    assert labels["val/examples_wandb_delimeter_prediction"]["value"]["255"] == "ignore"
    assert labels["val/examples_wandb_delimeter_level_map"]["value"] == {
        "0": "level 1 (stride 32)",
        "1": "level 2 (stride 16)",
        "2": "level 3 (stride 8)",
        "3": "level 4 (stride 4)",
    }
    (table_file, *_) = sorted((media / "table" / "val").glob("per_class_iou_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["class", "IoU", "accuracy"]
    assert [row[0] for row in table["data"]][:3] == ["sky", "wall", "water"]


def test_best_miou_summary_is_the_best_checkpoint_score(sweep: dict[int, Path]):
    for job in sweep.values():
        summary = read_run(run_dirs(job)[-1]).summary
        metrics = json.loads((job / "metrics.json").read_text())
        # metrics.json validates the best checkpoint again: the same weights, the same score.
        assert summary["best/mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)
        assert f"step{summary['best/step']:06d}" in metrics["checkpoint"]


def test_resume_continues_the_same_wandb_run(sweep: dict[int, Path]):
    job = sweep[4]
    first, resumed = (read_run(directory) for directory in run_dirs(job))
    assert first.run.run_id == resumed.run.run_id == (job / "wandb_run_id").read_text().strip()
    steps = [row["trainer/global_step"] for row in resumed.history if "train/loss" in row]
    assert min(steps) >= 8 and json.loads((job / "metrics.json").read_text())["step"] == 12


# ---------------------------------------------------------------------------------------------
# TensorBoard


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of 4 steps logged to TensorBoard and CSV at once (logger=[csv,tensorboard])."""
    root = tmp_path_factory.mktemp("tensorboard")
    run_dir = root / "run"
    overrides = [*TINY, "logger=[csv,tensorboard]", "trainer.max_steps=8", "trainer.log_every_n_steps=1"]
    result = run_train(*overrides, "num_pyramid_images=0", f"hydra.run.dir={run_dir}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_tensorboard_event_files_hold_what_the_csv_table_holds(tensorboard_run: Path):
    events = EventAccumulator(str(tensorboard_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) >= LOGGED
    with (tensorboard_run / "csv" / "metrics.csv").open() as handle:
        table = [row for row in csv.DictReader(handle) if row["val/mIoU"]]
    logged = events.Scalars("val/mIoU")
    # After each of the 2 epochs, and the final validation of the best checkpoint, which metrics.json holds.
    assert [event.step for event in logged] == [int(row["step"]) for row in table] and len(logged) == 3
    assert [event.value for event in logged] == pytest.approx([float(row["val/mIoU"]) for row in table])
    metrics = json.loads((tensorboard_run / "metrics.json").read_text())
    assert logged[-1].value == pytest.approx(metrics["mIoU"], abs=1e-6)
    hparams = yaml.safe_load((tensorboard_run / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["model"]["levels"] == 4 and hparams["data"]["num_levels"] == 4


def test_tensorboard_shows_the_pyramids_after_each_validation(tensorboard_run: Path):
    events = EventAccumulator(str(tensorboard_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    pictures = events.Images("val/pyramid")
    assert [picture.step for picture in pictures] == [4, 8]  # the fit's validations, not the final one
    assert all(picture.width > 400 and picture.height > 200 for picture in pictures)
