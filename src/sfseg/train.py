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

import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sfseg.builder import build, save_pyramid_png
from sfseg.callbacks import LastCheckpoint
from sfseg.cli import hydra_main
from sfseg.data.datamodule import SegmentationDataModule
from sfseg.module import SpecializeAndFuseModule
from sfseg.runs import (
    CHECKPOINT_FOLDER,
    LAST_CHECKPOINT,
    configure_wandb,
    evaluated_checkpoint,
    finishing_wandb,
    print_summary,
    resolve_ckpt_path,
    resolved_config,
    save_run_record,
    write_validation,
)


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


def equal_time_steps(steps: int, reference_crop: int | list[int], crop: int | list[int]) -> int:
    """The `sfseg_equal_time_steps` config resolver: `steps` at `reference_crop` scaled by the area ratio
    of the crops (int or [H, W]), so that runs with other crops train for about the same time."""

    def area(size: int | list[int]) -> int:
        return size * size if isinstance(size, int) else size[0] * size[1]

    return max(1, round(steps * area(reference_crop) / area(crop)))


def scale_range(test_scale: float, ratio: float) -> list[float]:
    """The `sfseg_scale_range` config resolver: training's random scale range around the test scale,
    from test_scale / ratio to test_scale x ratio (even on a log scale)."""
    return [test_scale / ratio, test_scale * ratio]


def coarse_level_weights(levels: int, coarse_weight: float) -> list[float]:
    """The `sfseg_coarse_level_weights` config resolver: model.loss.level_weights for any L, the coarse
    levels' CE terms weighing `coarse_weight` each against the finest level's 1 (L=1: [1.0], Eq. 1)."""
    return [float(coarse_weight)] * (int(levels) - 1) + [1.0]


# conf/hydra/launcher/submitit_slurm.yaml spells out every key of the plugin's config of the same name,
# so Hydra's deprecated merge onto that schema changes nothing; its warning would only alarm users.
warnings.filterwarnings(
    "ignore", message=r"\s*.hydra/launcher/submitit_slurm. is validated against ConfigStore schema"
)
OmegaConf.register_new_resolver("per_device_batch", per_device_batch, replace=True)
OmegaConf.register_new_resolver("job_folder_label", job_folder_label, replace=True)
OmegaConf.register_new_resolver("sfseg_equal_time_steps", equal_time_steps, replace=True)
OmegaConf.register_new_resolver("sfseg_scale_range", scale_range, replace=True)
OmegaConf.register_new_resolver("sfseg_coarse_level_weights", coarse_level_weights, replace=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, validate the best checkpoint (or the final weights), write metrics.json and pyramid.png;
    return the metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_global_batch(cfg)
    configure_wandb(cfg, run_dir)
    if rank_zero_only.rank == 0:
        save_run_record(cfg, run_dir)
    datamodule, model, trainer = build(cfg, run_dir)
    check_processes(trainer)
    last = last_checkpoint_path(trainer, run_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), last)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_config(cfg))

    with finishing_wandb(trainer.loggers):
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException as stop:
            # Lightning ends a SIGTERMed fit with exit status 0; last.ckpt is saved, the run is not done.
            raise SystemExit(128 + signal.SIGTERM) from stop
        checkpoint = validate_the_best(trainer, model, datamodule, last)
    metrics = {
        **model.last_val_scores,
        "per_class_iou": dict(zip(model.class_names, model.last_val_per_class["iou"], strict=True)),
        "checkpoint": checkpoint,
        "step": trainer.global_step,
    }
    if trainer.is_global_zero:
        write_validation(run_dir, metrics, model.last_val_counts)
        if cfg.get("num_pyramid_images", 0) > 0:
            save_pyramid_png(model, datamodule, run_dir / "pyramid.png", cfg.num_pyramid_images)
            print_summary(metrics, model.levels, run_dir)
    return metrics


def validate_the_best(
    trainer: L.Trainer, model: SpecializeAndFuseModule, datamodule: SegmentationDataModule, last: Path
) -> str:
    """Validate the checkpoint the run reports: the best by val/mIoU, or without one the final weights.
    When fit's last validation came before its last step (trainer.max_steps not a multiple of the
    validation interval), the final weights (last.ckpt) are validated too and win if they score higher,
    so no training step is lost to the choice. Returns the checkpoint; the model keeps its scores."""
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback else ""
    if best and model.validated_step < trainer.global_step and last.is_file():
        trainer.validate(model, datamodule=datamodule, ckpt_path=str(last), verbose=False)
        if model.last_val_scores["mIoU"] > float(callback.best_model_score):
            return str(last)
    checkpoint = evaluated_checkpoint(best, last)
    trainer.validate(model, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
    return checkpoint


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


def last_checkpoint_path(trainer: L.Trainer, run_dir: Path) -> Path:
    return next(
        (callback.path for callback in trainer.callbacks if isinstance(callback, LastCheckpoint)),
        run_dir / CHECKPOINT_FOLDER / LAST_CHECKPOINT,
    )


@hydra_main("train")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics["mIoU"]  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
