"""Scale-out: Lightning DDP over 2 CPU processes (gloo), the global batch, and the SLURM launcher config."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import read_write

from sfseg.builder import build
from sfseg.data.datamodule import SyntheticDataModule
from sfseg.module import SpecializeAndFuseModule
from sfseg.train import check_global_batch, check_processes
from tests.conftest import TINY, compose_config
from tests.test_eval import run_eval
from tests.test_reproducibility import one_thread, run_train

# SyncBatchNorm runs on GPUs only; on CPU processes the test keeps plain BatchNorm.
CPU_DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true"]
CPU_DDP += ["trainer.sync_batchnorm=false"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training steps on 2 processes, global batch 8; the final validation one image per batch."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "run"
    result = run_train(
        *CPU_DDP,
        *(override for override in TINY if not override.startswith("data.batch_size=")),
        "global_batch_size=8",  # data.batch_size: trainer=ddp's per-device share, 4
        "data.val_batch_size=1",
        "num_pyramid_images=0",
        f"hydra.run.dir={run_dir}",
        cwd=root,
        env={"MASTER_PORT": str(free_port())},  # its own rendezvous port: other DDP runs may be going on
        fresh=True,  # Lightning starts rank 1 as `python -m sfseg.train ...`: rank 0 is the same
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ddp_trains_on_two_processes_with_the_global_batch(ddp_run: Path):
    config = yaml.safe_load((ddp_run / "config.yaml").read_text())
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["devices"] == 2
    assert config["data"]["batch_size"] * 2 == config["global_batch_size"] == 8
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    # 16 images at 8 per step: one epoch is 2 steps, so the best checkpoint comes from its validation.
    assert metrics["step"] == 2 and Path(metrics["checkpoint"]).is_file()
    assert (ddp_run / "train_ddp_process_1.log").is_file()  # Lightning started the second rank


@pytest.mark.slow
@pytest.mark.usefixtures(one_thread.__name__)
def test_ddp_validation_counts_equal_one_process_on_the_same_checkpoint(ddp_run: Path):
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    ddp_counts = torch.load(ddp_run / "val_counts.pt", weights_only=True)

    model = SpecializeAndFuseModule.load_from_checkpoint(metrics["checkpoint"], map_location="cpu")
    datamodule = SyntheticDataModule(size=64, val_samples=4, val_batch_size=1, num_levels=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)

    assert set(ddp_counts) == set(model.last_val_counts)
    for name, counts in model.last_val_counts.items():
        assert torch.equal(ddp_counts[name], counts), name
    assert ddp_counts["confmat"].sum() == 5 * 4 * 64 * 64  # fused + 4 levels over every val pixel once
    assert model.last_val_scores["mIoU"] == pytest.approx(metrics["mIoU"])


@pytest.mark.slow
def test_eval_scores_a_ddp_checkpoint_on_its_runs_data(ddp_run: Path, tmp_path: Path):
    # The run's data.batch_size came from train's per-device resolver, which sfseg.eval does not load.
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    result = run_eval(Path(metrics["checkpoint"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((ddp_run / "eval" / "metrics.json").read_text())
    assert scored["num_images"] == 4 and scored["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)


@pytest.mark.parametrize(
    ("devices", "num_nodes", "per_device"), [(4, 1, 4), (2, 2, 4), (8, 1, 2), (16, 1, 1)]
)
def test_ddp_splits_the_global_batch_of_16(devices: int, num_nodes: int, per_device: int, run_dir: Path):
    cfg = compose_config(
        ["trainer=ddp", f"trainer.devices={devices}", f"trainer.num_nodes={num_nodes}"], run_dir
    )
    assert cfg.global_batch_size == 16 and cfg.data.batch_size == per_device
    assert cfg.model.optimizer.lr == compose_config([], run_dir).model.optimizer.lr  # the paper's lr
    assert cfg.trainer.sync_batchnorm is True
    check_global_batch(cfg)


def test_a_global_batch_that_does_not_add_up_is_refused(run_dir: Path):
    with pytest.raises(ValueError, match=r"does not split evenly over trainer\.devices=3"):
        _ = compose_config(["trainer=ddp", "trainer.devices=3"], run_dir).data.batch_size
    # An experiment's per-device batch of 16 on 2 devices: 32 images per step.
    cfg = compose_config(["trainer=ddp", "trainer.devices=2", "data.batch_size=16"], run_dir)
    with pytest.raises(
        ValueError, match=r"global batch of 32, not global_batch_size=16: set data.batch_size=8"
    ):
        check_global_batch(cfg)


def test_ddp_in_a_sweep_with_the_basic_launcher_is_refused(run_dir: Path):
    cfg = compose_config([*TINY, *CPU_DDP], run_dir)
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    _, _, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"would run the whole sweep again.*hydra/launcher=submitit_slurm"):
        check_processes(trainer)


def test_spawned_ddp_is_refused(run_dir: Path):
    cfg = compose_config([*TINY, *CPU_DDP, "trainer.strategy=ddp_spawn"], run_dir)
    _, _, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"spawned or forked processes is not supported.*trainer=ddp"):
        check_processes(trainer)


# train.py hides this warning; pytest shows warnings its own filters do not name.
@pytest.mark.filterwarnings(
    r"ignore:\s*.hydra/launcher/submitit_slurm. is validated against ConfigStore schema"
)
def test_submitit_slurm_launcher_runs_one_task_per_device(run_dir: Path):
    cfg = compose_config(
        ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], run_dir
    )
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.timeout_min > 0 and launcher.partition is None
    plugin_keys = {item.name for item in dataclasses.fields(SlurmQueueConf)}
    assert set(launcher) == plugin_keys  # every key of the plugin's config, and no other
    # Hydra would instantiate it like this; the plugin passes the values on to submitit.
    params = instantiate(launcher).params
    assert params["tasks_per_node"] == 4 and params["nodes"] == 2 and params["timeout_min"] == 4320
