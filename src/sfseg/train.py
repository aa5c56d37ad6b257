"""Training entry point: `python -m sfseg.train [overrides]` (Hydra; `-m` sweeps one job per combination).

The run folder gets the checkpoints, metrics.json (final validation of the best checkpoint) and
pyramid.png (the two pyramids, the level map and the fused output for a few val images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from sfseg import CONFIG_DIR
from sfseg.data.datamodule import SegmentationDataModule
from sfseg.module import SpecializeAndFuseModule
from sfseg.pyramid import fuse
from sfseg.visualize import pyramid_figure, save_figure


def build(cfg: DictConfig) -> tuple[SegmentationDataModule, SpecializeAndFuseModule, L.Trainer]:
    """Instantiate the datamodule, the LightningModule and the Trainer of a composed config."""
    datamodule: SegmentationDataModule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, class_names=list(datamodule.classes))
    callbacks = [instantiate(callback) for callback in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, validate the best checkpoint, write metrics.json and pyramid.png; return the metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics = {
        **model.last_val_scores,
        "per_class_iou": dict(zip(model.class_names, model.last_val_per_class["iou"], strict=True)),
        "checkpoint": best,
        "step": trainer.global_step,
    }
    write_json(run_dir / "metrics.json", metrics)
    if trainer.is_global_zero and cfg.get("num_pyramid_images", 0) > 0:
        save_pyramid_png(model, datamodule, run_dir / "pyramid.png", cfg.num_pyramid_images)
        print_summary(metrics, model.levels, run_dir)
    return metrics


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
