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


# Files that run one after the other, in this order, on one worker: the later ones find torch's compiler
# cache warm with the graphs the earlier ones compiled (the same toy network at the same shapes; on a
# fresh machine compiling them takes a minute of C++ compilation).
IN_A_ROW = ("tests/test_speed_settings.py", "tests/test_gpu_check.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """IN_A_ROW first, then the files with end-to-end (slow) tests, each file's tests in their own order:
    `make test` runs one file (IN_A_ROW: those files) per worker at a time (pytest-xdist --dist loadfile
    --no-loadscope-reorder), so the long files start at once on both workers and the quick ones fill in
    at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        file = item.path.relative_to(config.rootpath).as_posix()
        if file in IN_A_ROW:
            return 0, IN_A_ROW.index(file)
        return (1 if item.path in slow_files else 2), 0

    items.sort(key=rank)  # stable: the rest keeps pytest's order


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """--dist loadfile with IN_A_ROW as one unit of work; other modes as pytest-xdist makes them."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class InARowScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return IN_A_ROW[0] if file in IN_A_ROW else file

    return InARowScheduling(config, log)


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
