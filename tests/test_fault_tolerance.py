"""Killed runs resume from last.ckpt without losing or repeating steps beyond the checkpoint interval;
a non-finite loss stops the run naming the step and the loss term."""

from __future__ import annotations

import csv
import dataclasses
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sfseg.builder import build
from sfseg.models import PyramidOutput
from sfseg.train import train
from tests.conftest import TINY, compose_config
from tests.processes import Forked
from tests.test_reproducibility import one_thread, run_train, start_train

MAX_STEPS = 60
INTERVAL = 4
# One epoch of 60 steps (240 images at batch 4), a loss row per step, last.ckpt every 4 steps.
RUN = [
    *TINY,
    "num_pyramid_images=0",
    "data.train_samples=240",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.log_every_n_steps=1",
    f"callbacks.last_checkpoint.every_n_train_steps={INTERVAL}",
]


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def kill_after(process: Forked | subprocess.Popen, last: Path, min_step: int, kill_signal: int) -> None:
    """Send `kill_signal` once last.ckpt holds step >= min_step; wait for the process to end."""
    deadline = time.monotonic() + 300
    while not (last.is_file() and checkpoint_step(last) >= min_step):
        assert process.poll() is None, f"ended before step {min_step}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at step >= {min_step} in time"
        time.sleep(0.05)
    process.send_signal(kill_signal)
    process.communicate(timeout=120)


def logged(run_dir: Path, attempt: str) -> dict[int, dict[str, str]]:
    """What the CSV logger wrote in one attempt, merged by step, for the steps that logged a loss."""
    steps: dict[int, dict[str, str]] = {}
    with (run_dir / attempt / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            steps.setdefault(int(row["step"]), {}).update({key: value for key, value in row.items() if value})
    return {step: row for step, row in steps.items() if "train/loss" in row}


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_runs_every_step_once(tmp_path: Path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    folder = f"hydra.run.dir={run_dir}"

    # SIGTERM: Lightning stops at the next batch boundary and last.ckpt gets that very step.
    first = start_train(*RUN, folder, "logger.csv.name=attempt1", cwd=tmp_path)
    kill_after(first, last, min_step=8, kill_signal=signal.SIGTERM)
    assert first.returncode == 128 + signal.SIGTERM
    stopped_at = checkpoint_step(last)
    assert max(logged(run_dir, "attempt1")) == stopped_at - 1  # steps are 0-based: none lost

    # SIGKILL: no warning, no flush; last.ckpt is the last multiple of the interval.
    second = start_train(*RUN, folder, "ckpt_path=last", "logger.csv.name=attempt2", cwd=tmp_path)
    kill_after(second, last, min_step=stopped_at + 2 * INTERVAL, kill_signal=signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(last)
    assert killed_at % INTERVAL == 0 and killed_at > stopped_at

    third = run_train(*RUN, folder, "ckpt_path=last", "logger.csv.name=attempt3", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    rows = logged(run_dir, "attempt3")
    assert sorted(rows) == list(range(killed_at, MAX_STEPS))  # from the checkpoint's step, each once
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == MAX_STEPS
    assert checkpoint_step(last) == MAX_STEPS

    # The poly schedule went on where it stopped rather than starting again from the base lr.
    lr_column = next(key for key in rows[killed_at] if key.startswith("lr-"))
    base_lr = float(logged(run_dir, "attempt1")[0][lr_column])
    assert float(rows[killed_at][lr_column]) == pytest.approx(base_lr * (1 - killed_at / MAX_STEPS) ** 0.9)


def test_resume_without_a_last_checkpoint_says_which_folder_to_reuse(run_dir: Path):
    cfg = compose_config([*TINY, "ckpt_path=last"], run_dir)
    with pytest.raises(
        FileNotFoundError, match=r"no .*checkpoints/last\.ckpt.*hydra\.run\.dir=<that run folder>"
    ):
        train(cfg)


@pytest.mark.usefixtures(one_thread.__name__)
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_term(run_dir: Path):
    cfg = compose_config([*TINY, "trainer.max_steps=4", "num_pyramid_images=0"], run_dir)
    datamodule, model, trainer = build(cfg)

    def poison_level3_at_step2(
        module: torch.nn.Module, inputs: tuple, output: PyramidOutput
    ) -> PyramidOutput:
        if not module.training or model.global_step != 2:
            return output
        semantic = list(output.semantic)
        semantic[2] = semantic[2] * float("nan")
        return dataclasses.replace(output, semantic=semantic)

    model.net.register_forward_hook(poison_level3_at_step2)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(model, datamodule=datamodule)
    message = str(error.value)
    assert message.startswith("non-finite loss at step 2: train/loss=nan, train/ce_level3=nan (")
    assert "train/ce_level1=" in message and "train/bce_level3=" in message
    assert trainer.global_step == 2  # stopped there, no further optimizer step
