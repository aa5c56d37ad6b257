"""`seed=` makes CPU runs repeat exactly; the run folder records the resolved config and the versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY
from tests.processes import Forked, run_module, start_module

pytestmark = pytest.mark.slow

# One OpenMP thread per run: on a busy 2-core machine torch's threads spin-wait for each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process training with one intra-op thread, like the subprocess runs (see ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start_train(
    *overrides: str, cwd: Path, env: Mapping[str, str] | None = None, fresh: bool = False
) -> Forked | subprocess.Popen:
    """`python -m sfseg.train <overrides>` in the background, output captured; `env` adds variables;
    `fresh`: a new interpreter rather than a fork of this one (tests/processes.py)."""
    return start_module("sfseg.train", *overrides, cwd=cwd, env={**ENV, **(env or {})}, fresh=fresh)


def run_train(
    *overrides: str,
    cwd: Path,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    return run_module(
        "sfseg.train", *overrides, cwd=cwd, env={**ENV, **(env or {})}, fresh=fresh, timeout=timeout
    )


def scores(run_dir: Path) -> dict:
    """metrics.json without the checkpoint path, which names the run folder."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("checkpoint")
    return metrics


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny runs side by side: seed 0 twice and seed 1."""
    root = tmp_path_factory.mktemp("seeds")
    folders = {"first": root / "seed0_a", "again": root / "seed0_b", "other": root / "seed1"}
    seeds = {"first": 0, "again": 0, "other": 1}
    processes = {
        name: start_train(
            *TINY, "trainer.max_steps=4", f"seed={seeds[name]}", f"hydra.run.dir={folder}", cwd=root
        )
        for name, folder in folders.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
    return folders


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(seeded_runs: dict[str, Path]):
    first, again, other = (scores(seeded_runs[name]) for name in ("first", "again", "other"))
    assert first["step"] == 4
    assert first == again  # every score, per level and per class, to the last bit
    assert first != other


def test_run_folder_keeps_the_resolved_config(seeded_runs: dict[str, Path]):
    run_dir = seeded_runs["other"]
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text  # interpolations resolved
    config = yaml.safe_load(text)
    assert config["seed"] == 1 and config["data"]["seed"] == 1
    assert config["data"]["num_levels"] == config["model"]["levels"] == 4
    assert config["trainer"]["default_root_dir"] == str(run_dir)
    assert "hydra" not in config and (run_dir / ".hydra" / "config.yaml").is_file()


def test_run_folder_keeps_the_versions(seeded_runs: dict[str, Path]):
    import lightning

    versions = json.loads((seeded_runs["first"] / "versions.json").read_text())
    expected = {"python", "torch", "lightning", "timm", "hydra", "albumentations", "torchmetrics", "wandb"}
    expected |= {"numpy", "sfseg", "git_commit", "git_dirty", "torch_threads", "cpu_capability", "cpu"}
    assert expected <= set(versions)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # the model name the kernel reports, as lscpu shows it
        assert f"model name\t: {versions['cpu']}" in cpuinfo.read_text()
    assert versions["cpu"]
    assert versions["torch_threads"] == int(ENV["OMP_NUM_THREADS"])
    assert versions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert versions["torch"] == torch.__version__ and versions["lightning"] == lightning.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    assert versions["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)


def test_without_a_wandb_logger_nothing_goes_to_wandb(seeded_runs: dict[str, Path]):
    run_dir = seeded_runs["first"]
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the CSV logger stays the default
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id").exists()
