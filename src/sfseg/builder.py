"""A composed run config's parts: the datamodule, the LightningModule and the Trainer (what `sfseg.train`
fits, and what `sfseg.bench --training` times piece by piece), and the picture of a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sfseg.data.datamodule import SegmentationDataModule
from sfseg.data.statistics import count_split
from sfseg.module import CLASS_WEIGHT_METHODS, CLASS_WEIGHT_POWERS, SpecializeAndFuseModule
from sfseg.runs import plain, write_json
from sfseg.visualize import save_figure

CLASS_WEIGHTS_FILE = "class_weights.json"


def build(
    cfg: DictConfig, run_dir: Path | None = None
) -> tuple[SegmentationDataModule, SpecializeAndFuseModule, L.Trainer]:
    """Instantiate the datamodule, the LightningModule and the Trainer of a composed config. With
    model.loss.class_weights=median_frequency or sqrt_median_frequency the weights are counted on the
    train split and kept in `run_dir`/class_weights.json (a resumed run reads them back)."""
    datamodule: SegmentationDataModule = instantiate(cfg.data)
    loss = plain(cfg.model.get("loss")) or {"name": "ce"}
    if loss.get("class_weights") in CLASS_WEIGHT_METHODS:  # a tuple: a list of weights compares, never hashes
        loss["class_weights"] = counted_class_weights(loss["class_weights"], datamodule, run_dir)
    model = instantiate(
        cfg.model,
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.classes),
        # Plain lists, so that the checkpoint loads with weights_only (DESIGN 6).
        palette=[list(colour) for colour in datamodule.palette],
        label_values=datamodule.label_values,
        test_scale=datamodule.test_scale,
        loss=loss,
    )
    # Training crops and padded validation images must fit the network, not only the pyramid.
    datamodule.match_network(model.net.size_divisor)
    callbacks = [instantiate(callback) for callback in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(logger) for logger in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def counted_class_weights(
    method: str, datamodule: SegmentationDataModule, run_dir: Path | None
) -> list[float]:
    """model.loss.class_weights=median_frequency (SegNet's weights) or sqrt_median_frequency (their square
    roots) on the datamodule's train split, written to `run_dir`/class_weights.json with the counts they
    come from; read back from that file when it exists (a resumed run, or a DDP rank after rank 0), so a
    run counts them once."""
    record = run_dir / CLASS_WEIGHTS_FILE if run_dir is not None else None
    if record is not None and record.is_file():
        return json.loads(record.read_text())["weights"]
    datamodule.setup("fit")
    stats = count_split(datamodule, "train", progress=False)
    median_frequency = stats.median_frequency_weights()
    weights = (median_frequency ** CLASS_WEIGHT_POWERS[method]).tolist()
    if record is not None and rank_zero_only.rank == 0:
        classes = {
            name: {
                "pixels": int(stats.class_pixels[index]),
                "pixels_of_images_with_it": int(stats.class_image_pixels[index]),
                "median_frequency_weight": float(median_frequency[index]),
                "weight": weights[index],
            }
            for index, name in enumerate(datamodule.classes)
        }
        content = {"method": method, "split": "train", "images": stats.images, "weights": weights}
        partial = record.with_suffix(".partial")
        write_json(partial, {**content, "classes": classes})
        partial.replace(record)  # whole or absent for another process that looks
    return weights


def save_pyramid_png(
    model: SpecializeAndFuseModule, datamodule: SegmentationDataModule, path: Path, num_images: int
) -> Path:
    """Draw the pyramids of the first val images with the trained model."""
    figure = model.predictor(datamodule.palette).pyramid_figure(*datamodule.val_examples(num_images))
    return save_figure(figure, path)
