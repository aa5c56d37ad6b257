"""End to end through the real entry point: train, checkpoint, metrics.json, pyramid.png, multirun."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfseg.module import SpecializeAndFuseModule
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sfseg.train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_writes_checkpoint_metrics_and_pictures(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ["mIoU", "mIoU_finest", "pixel_acc", *[f"mIoU_level{i}" for i in range(1, 5)]]:
        assert key in metrics
    shares = [metrics[f"share_level{i}"] for i in range(1, 5)]
    assert sum(shares) == pytest.approx(1.0)
    assert set(metrics["per_class_iou"]) >= {"sky", "person", "pole"}
    assert (run_dir / "pyramid.png").stat().st_size > 10_000
    assert "fused mIoU" in result.stdout and str(run_dir / "metrics.json") in result.stdout

    checkpoint = Path(metrics["checkpoint"])
    assert checkpoint.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    # Plain hyperparameters: loads with torch's safe loader (the default since torch 2.6).
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["backbone"]["name"] == "hrnet_w18_small"

    # The checkpoint loads back for evaluation and predicts what the run measured.
    model = SpecializeAndFuseModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert model.levels == 4 and model.policy == "true_positive"
    from sfseg.data.datamodule import SyntheticDataModule

    datamodule = SyntheticDataModule(size=64, val_samples=4, val_batch_size=4, num_levels=4)
    datamodule.setup("validate")
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    assert model.last_val_scores["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)


def test_multirun_runs_one_job_per_combination(tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        *TINY,
        "num_pyramid_images=0",
        "model/context=none,c2f",
        "model.levels=1,2",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(path.parent for path in sweep_dir.glob("*/metrics.json"))
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add(overrides)
        hparams = torch.load(json.loads((job / "metrics.json").read_text())["checkpoint"], weights_only=True)[
            "hyper_parameters"
        ]
        assert f"model.levels={hparams['levels']}" in overrides
        assert f"model/context={hparams['context']['name']}" in overrides
    assert len(seen) == 4


def test_the_final_steps_are_validated_when_the_last_validation_came_before_them(tmp_path: Path):
    # 16 scenes in batches of 4: validation at the end of each epoch (step 4); trainer.max_steps=6 ends
    # fit mid-epoch, so the final weights are validated too, and the better of the two is reported.
    run_dir = tmp_path / "run"
    overrides = [override for override in TINY if not override.startswith("trainer.max_steps")]
    result = run_train(*overrides, "trainer.max_steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        validations = {
            int(row["step"]): float(row["val/mIoU"]) for row in csv.DictReader(handle) if row["val/mIoU"]
        }
    assert set(validations) == {
        3,
        6,
    }  # Lightning logs the step-4 validation at step 3; the final weights at 6
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(max(validations.values()), abs=1e-6)
    final_wins = validations[6] > validations[3]
    name = Path(metrics["checkpoint"]).name
    assert (name == "last.ckpt") if final_wins else name.startswith("step000004")
