"""Shared test helpers: composing the real Hydra configs and tiny run settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Overrides that make a run of the synthetic default take seconds on a CPU.
TINY = [
    "data.size=64",
    "data.train_samples=16",
    "data.val_samples=4",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "model.semantic_channels=32",
    "model.unity_channels=16",
    "trainer.max_steps=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "num_pyramid_images=2",
]

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: 2 threads spin-wait on a busy 2-core CPU
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in tests


# tests/test_gpu_check.py compiles the toy network of `sfseg.bench --compile-check --quick` (in its compile
# stage's own process) and tests/test_speed_settings.py compiles the same graphs in the test process: the
# one first and the other last, so that the second finds torch's compiler cache warm (on a fresh machine
# the C++ compiler spends a minute on them) and no test after it forks a process that has run a compiled
# backward (tests/processes.py).
FIRST, LAST = "tests/test_gpu_check.py", "tests/test_speed_settings.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """FIRST, the files with end-to-end (slow) tests, the others, LAST; each file's tests in their own
    order: `make test` runs one file per worker at a time (pytest-xdist --dist loadfile
    --no-loadscope-reorder), so the long files start at once on both workers and the quick ones fill in
    at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        file = item.path.relative_to(config.rootpath).as_posix()
        if file in (FIRST, LAST):
            return 0 if file == FIRST else 3
        return 1 if item.path in slow_files else 2

    items.sort(key=rank)  # stable: the rest keeps pytest's order


def compose_config(overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose the real config as `python -m sfseg.train` would, with the run folder set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    path.mkdir()
    yield path
    GlobalHydra.instance().clear()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread (on a small shared CPU box two OpenMP threads stall behind other load) and seed 0."""
    import torch  # here: torch must load after OMP_NUM_THREADS is set above

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
