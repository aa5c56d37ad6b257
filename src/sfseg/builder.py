"""A composed run config's parts: the datamodule, the LightningModule and the Trainer (what `sfseg.train`
fits, and what `sfseg.bench --training` times piece by piece), and the picture of a trained run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from sfseg.data.datamodule import SegmentationDataModule
from sfseg.module import SpecializeAndFuseModule
from sfseg.visualize import save_figure


def build(cfg: DictConfig) -> tuple[SegmentationDataModule, SpecializeAndFuseModule, L.Trainer]:
    """Instantiate the datamodule, the LightningModule and the Trainer of a composed config."""
    datamodule: SegmentationDataModule = instantiate(cfg.data)
    model = instantiate(
        cfg.model,
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.classes),
        # Plain lists, so that the checkpoint loads with weights_only (DESIGN 6).
        palette=[list(colour) for colour in datamodule.palette],
        label_values=datamodule.label_values,
    )
    # Training crops and padded validation images must fit the network, not only the pyramid.
    datamodule.match_network(model.net.size_divisor)
    callbacks = [instantiate(callback) for callback in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def save_pyramid_png(
    model: SpecializeAndFuseModule, datamodule: SegmentationDataModule, path: Path, num_images: int
) -> Path:
    """Draw the pyramids of the first val images with the trained model."""
    figure = model.predictor(datamodule.palette).pyramid_figure(*datamodule.val_examples(num_images))
    return save_figure(figure, path)
