"""Training entry point: `python -m sfseg.train [overrides]` (Hydra; `-m` sweeps one job per combination).

The run folder gets:
  checkpoints/   the best checkpoint by val/mIoU, and last.ckpt (`ckpt_path=last` resumes from it)
  metrics.json   the final validation of the best checkpoint (last.ckpt if fit never validated);
                 val_counts.pt: its summed counts (PyramidMetrics' states: fused and per-level
                 confusion matrices, unity hits, cells per level), over all DDP ranks
  pyramid.png    the two pyramids, the level map and the fused output for a few val images
  config.yaml    the resolved config; versions.json: python, package versions and the git commit
  csv/, wandb/   the loggers' files
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import secrets
import signal
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from sfseg import CONFIG_DIR
from sfseg.callbacks import LastCheckpoint
from sfseg.data.datamodule import SegmentationDataModule
from sfseg.module import SpecializeAndFuseModule, plain
from sfseg.pyramid import fuse
from sfseg.visualize import pyramid_figure, save_figure

REPO_ROOT = Path(CONFIG_DIR).parent
WANDB_ID_FILE = "wandb_run_id"
# versions.json: key -> distribution name (torch: torch.__version__, which keeps the build tag).
PACKAGES = {
    "lightning": "lightning",
    "timm": "timm",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "albumentations": "albumentations",
    "torchmetrics": "torchmetrics",
    "wandb": "wandb",
    "numpy": "numpy",
    "sfseg": "sfseg",
}


def per_device_batch(global_batch: int, devices: int, num_nodes: int = 1) -> int:
    """The `per_device_batch` config resolver: the global batch split evenly over all processes."""
    if not isinstance(devices, int) or not isinstance(num_nodes, int):
        raise ValueError(
            f"trainer.devices={devices!r} and trainer.num_nodes={num_nodes!r} must be numbers of devices "
            "and nodes when global_batch_size is set"
        )
    processes = devices * num_nodes
    if processes < 1 or global_batch % processes:
        raise ValueError(
            f"global_batch_size={global_batch} does not split evenly over trainer.devices={devices} x "
            f"trainer.num_nodes={num_nodes} = {processes} processes"
        )
    return global_batch // processes


def job_folder_label(override_dirname: str, max_length: int = 100) -> str:
    """The `job_folder_label` config resolver: a sweep job's overrides as one folder name, with the "/"
    of group overrides as "." (no nested folders) and cut to stay within file name limits."""
    return override_dirname.replace("/", ".")[:max_length]


# conf/hydra/launcher/submitit_slurm.yaml spells out every key of the plugin's config of the same name,
# so Hydra's deprecated merge onto that schema changes nothing; its warning would only alarm users.
warnings.filterwarnings(
    "ignore", message=r"\s*.hydra/launcher/submitit_slurm. is validated against ConfigStore schema"
)
OmegaConf.register_new_resolver("per_device_batch", per_device_batch, replace=True)
OmegaConf.register_new_resolver("job_folder_label", job_folder_label, replace=True)


def build(cfg: DictConfig) -> tuple[SegmentationDataModule, SpecializeAndFuseModule, L.Trainer]:
    """Instantiate the datamodule, the LightningModule and the Trainer of a composed config."""
    datamodule: SegmentationDataModule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, class_names=list(datamodule.classes))
    callbacks = [instantiate(callback) for callback in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, validate the best checkpoint (or the final weights), write metrics.json and pyramid.png;
    return the metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_global_batch(cfg)
    configure_wandb(cfg, run_dir)
    if rank_zero_only.rank == 0:
        save_run_record(cfg, run_dir)
    datamodule, model, trainer = build(cfg)
    check_processes(trainer)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), trainer, run_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_config(cfg))

    with finishing_wandb(trainer.loggers):
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException as stop:
            # Lightning ends a SIGTERMed fit with exit status 0; last.ckpt is saved, the run is not done.
            raise SystemExit(128 + signal.SIGTERM) from stop
        checkpoint = evaluated_checkpoint(trainer, run_dir)
        trainer.validate(model, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
    metrics = {
        **model.last_val_scores,
        "per_class_iou": dict(zip(model.class_names, model.last_val_per_class["iou"], strict=True)),
        "checkpoint": checkpoint,
        "step": trainer.global_step,
    }
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        torch.save(model.last_val_counts, run_dir / "val_counts.pt")
        if cfg.get("num_pyramid_images", 0) > 0:
            save_pyramid_png(model, datamodule, run_dir / "pyramid.png", cfg.num_pyramid_images)
            print_summary(metrics, model.levels, run_dir)
    return metrics


def check_global_batch(cfg: DictConfig) -> None:
    """With `global_batch_size` set, data.batch_size must be its share of one process."""
    global_batch = cfg.get("global_batch_size")
    if global_batch is None:
        return
    devices, num_nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    share = per_device_batch(global_batch, devices, num_nodes)
    if cfg.data.batch_size != share:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} on trainer.devices={devices} x trainer.num_nodes="
            f"{num_nodes} processes is a global batch of {cfg.data.batch_size * devices * num_nodes}, not "
            f"global_batch_size={global_batch}: set data.batch_size={share} (or global_batch_size=null)"
        )


def check_processes(trainer: L.Trainer) -> None:
    """Refuse the multi-process launches that would break a run of this script (DESIGN 6)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size == 1 or environment is None or environment.creates_processes_externally:
        return  # one process, or SLURM / torchrun started every process (submitit_slurm does)
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ValueError(
            f"trainer.strategy={type(trainer.strategy).__name__} with spawned or forked processes is not "
            "supported: the final validation's scores would stay in those processes. Use trainer=ddp"
        )
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            f"trainer=ddp with {trainer.world_size} processes in a sweep (-m) with Hydra's basic launcher: "
            "Lightning starts every extra process by re-running this command line, which would run the "
            "whole sweep again. On a cluster add hydra/launcher=submitit_slurm (one SLURM task per device); "
            "on one machine run the sweep with trainer.devices=1, or each job as a single run with trainer=ddp"
        )


def configure_wandb(cfg: DictConfig, run_dir: Path) -> None:
    """Complete a W&B logger's config: the run id kept in the run folder (a resumed run continues its
    W&B run), the run folder's name as the run name, and for sweep jobs one group per sweep."""
    hydra_cfg = HydraConfig.get()
    for logger_cfg in (cfg.get("logger") or {}).values():
        if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
            continue
        with open_dict(logger_cfg):
            logger_cfg.id = logger_cfg.get("id") or wandb_run_id(run_dir)
            logger_cfg.name = logger_cfg.get("name") or run_dir.name
            if not logger_cfg.get("group") and hydra_cfg.mode == RunMode.MULTIRUN:
                logger_cfg.group = f"{cfg.task_name}-{Path(hydra_cfg.sweep.dir).name}"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, made on its first run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


@contextmanager
def finishing_wandb(loggers: Sequence[Logger]) -> Iterator[None]:
    """End the W&B run with the job, so that the next job of a sweep gets its own run (DESIGN 6)."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        yield
        return
    import wandb

    try:
        yield
    except BaseException:
        wandb.finish(exit_code=1)
        raise
    wandb.finish()


def last_checkpoint_path(trainer: L.Trainer, run_dir: Path) -> Path:
    return next(
        (callback.path for callback in trainer.callbacks if isinstance(callback, LastCheckpoint)),
        run_dir / "checkpoints" / LastCheckpoint.FILENAME,
    )


def evaluated_checkpoint(trainer: L.Trainer, run_dir: Path) -> str:
    """The best checkpoint by val/mIoU; without one (no validation during fit), last.ckpt, which holds
    the final weights; "" if neither exists."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last = last_checkpoint_path(trainer, run_dir)
    return best or (str(last) if last.is_file() else "")


def resolve_ckpt_path(ckpt_path: str | None, trainer: L.Trainer, run_dir: Path) -> str | None:
    """`last` is this run folder's checkpoints/last.ckpt. Without one, an error: Lightning itself would
    only warn and train from scratch."""
    if ckpt_path != "last":
        return ckpt_path
    last = last_checkpoint_path(trainer, run_dir)
    if not last.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last: there is no {last}. Resume a run by running it again in its own folder: "
            "hydra.run.dir=<that run folder> ckpt_path=last (a sweep: the same hydra.sweep.dir and "
            "overrides), or give ckpt_path=<path to a .ckpt>"
        )
    return str(last)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as the run used it, interpolations resolved; Hydra's own node is in .hydra/."""
    return {key: plain(cfg[key]) for key in cfg if key != "hydra"}


def save_run_record(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml (resolved) and versions.json, to rerun or compare the run later."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(cfg)))
    write_json(run_dir / "versions.json", package_versions())


def package_versions() -> dict[str, Any]:
    """Python, the packages that shape a run (None if absent), CUDA, and the git commit of the source."""
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for key, distribution in PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    versions["cuda"] = torch.version.cuda
    return {**versions, **git_state(REPO_ROOT)}


def git_state(repo: Path) -> dict[str, Any]:
    """The commit of `repo` and whether tracked files differ from it; None without git or a repository."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(repo), *args],
                capture_output=True,
                text=True,
                timeout=10,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # read only: no index refresh
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON with NaN written as null (an absent class or an empty level has no score)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        return value

    path.write_text(json.dumps(clean(data), indent=2) + "\n")


@torch.no_grad()
def save_pyramid_png(
    model: SpecializeAndFuseModule, datamodule: SegmentationDataModule, path: Path, num_images: int
) -> Path:
    """Draw the pyramids of the first val images with the trained model."""
    loader = datamodule.val_dataloader()
    images, labels = [], []
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["label"])
        if sum(len(x) for x in images) >= num_images:
            break
    images = torch.cat(images)[:num_images].to(model.device)
    labels = torch.cat(labels)[:num_images]
    model.eval()
    out = model(images)
    fused, level_map = fuse(out.semantic, out.unity, model.tau)
    fused_pred = model._to_label_size(fused, labels)
    figure = pyramid_figure(
        images, labels, out.semantic, out.unity, level_map, fused_pred, datamodule.palette
    )
    return save_figure(figure, path)


def print_summary(metrics: dict[str, Any], levels: int, run_dir: Path) -> None:
    rows = [("fused mIoU", metrics["mIoU"]), ("finest-only mIoU", metrics["mIoU_finest"])]
    rows += [(f"level {level} mIoU", metrics[f"mIoU_level{level}"]) for level in range(1, levels + 1)]
    rows += [("pixel accuracy", metrics["pixel_acc"])]
    rows += [
        (f"share of cells, level {level}", metrics[f"share_level{level}"]) for level in range(1, levels + 1)
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 12))
    for name, value in rows:
        print(f"{name:<{width}}  {100 * value:8.2f} %")
    print("-" * (width + 12))
    print(f"run folder : {run_dir}")
    print(f"checkpoint : {metrics['checkpoint']}")
    print(f"metrics    : {run_dir / 'metrics.json'}")
    print(f"pictures   : {run_dir / 'pyramid.png'}\n")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics["mIoU"]  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
