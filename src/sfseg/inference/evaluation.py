"""Evaluation over a split: the chosen prediction scored with one confusion matrix, and the
single-scale whole-image fused pyramid scored level by level for the specialization analysis."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from sfseg.inference.loading import Predictor
from sfseg.inference.passes import InferenceSettings, tta_probabilities
from sfseg.inference.pixels import fused_logits, level_predictions, pad_to_divisor
from sfseg.metrics import PyramidMetrics, SegmentationMetrics
from sfseg.pyramid import build_targets, level_strides
from sfseg.visualize import percent


@dataclass
class Evaluation:
    """What `evaluate` accumulated over a split.

    prediction: the evaluated prediction (whole/slide, scales, flip, fused or finest-only);
    pyramid: the single-scale whole-image fused pyramid, for the specialization analysis.
    """

    prediction: SegmentationMetrics
    pyramid: PyramidMetrics
    class_names: list[str]
    tau: float
    num_images: int

    def scores(self) -> dict[str, Any]:
        """mIoU, pixel and mean accuracy, per-class IoU and accuracy keyed by class name."""
        scores = self.prediction.compute()
        return {
            "mIoU": scores["mIoU"],
            "pixel_acc": scores["pixel_acc"],
            "mean_acc": scores["mean_acc"],
            "per_class_iou": dict(zip(self.class_names, scores["iou"], strict=True)),
            "per_class_acc": dict(zip(self.class_names, scores["acc"], strict=True)),
            "num_images": self.num_images,
        }

    def specialization(self) -> dict[str, Any]:
        """The Sec. 5.5 analysis with level and class names, as written to specialization.json."""
        report = self.pyramid.specialization_report()
        levels = self.pyramid.num_levels
        names = [f"level{level}" for level in range(1, levels + 1)]
        cells, labels = report["cells"], report["labels"]
        finest_cells = int(cells.sum())

        def by_class(values: Tensor) -> dict[str, float]:
            return dict(zip(self.class_names, values.tolist(), strict=True))

        return {
            "levels": levels,
            "strides": level_strides(levels),
            "tau": self.tau,
            "pyramid_scores": self.pyramid.compute(),
            "table9": {
                "rows": "level whose own semantic prediction is scored (l')",
                "columns": "level the fused map took the pixels from (l)",
                "miou": report["table9"].tolist(),
                "pixels_per_column": report["group_pixels"].tolist(),
            },
            "fig3": {
                "fused_iou": by_class(report["fused_iou"]),
                "iou_minus_fused": {
                    name: by_class(row) for name, row in zip(names, report["iou_minus_fused"], strict=True)
                },
            },
            "parsimony": {
                "finest_cells": finest_cells,
                "finest_cells_per_level": dict(zip(names, cells.tolist(), strict=True)),
                "share_per_level": dict(
                    zip(names, (cells.double() / max(finest_cells, 1)).tolist(), strict=True)
                ),
                "labels_per_level": dict(zip(names, labels.tolist(), strict=True)),
                "labels": int(labels.sum()),
                "labels_per_finest_cell": int(labels.sum()) / max(finest_cells, 1),
            },
            "unity": {
                "precision": dict(zip(names[:-1], report["unity_precision"].tolist(), strict=True)),
                "recall": dict(zip(names[:-1], report["unity_recall"].tolist(), strict=True)),
            },
        }


@torch.inference_mode()
def evaluate(
    predictor: Predictor,
    loader: DataLoader,
    settings: InferenceSettings | None = None,
    progress: bool = True,
) -> Evaluation:
    """Run the predictor over a loader of {"image", "label"} batches and accumulate the metrics."""
    settings = settings or InferenceSettings()
    device, tau = predictor.device, predictor.tau
    prediction = SegmentationMetrics(predictor.num_classes, predictor.ignore_index).to(device)
    pyramid = PyramidMetrics(predictor.num_classes, predictor.levels, tau, predictor.ignore_index).to(device)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if images.shape[-2:] != labels.shape[-2:]:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} and label size {tuple(labels.shape[-2:])} differ "
                "in a batch of the data's val split"
            )
        with predictor.autocast_context():
            fused_pred, finest_pred = _score_pyramid(predictor, images, labels, pyramid)
            if settings.single_pass:
                pred = fused_pred if settings.fuse else finest_pred
            else:
                pred = tta_probabilities(predictor.net, images, settings, tau).argmax(1)
        prediction.update(pred, labels)
    return Evaluation(prediction, pyramid, list(predictor.class_names), tau, len(loader.dataset))


def _score_pyramid(
    predictor: Predictor, images: Tensor, labels: Tensor, metrics: PyramidMetrics
) -> tuple[Tensor, Tensor]:
    """The single-scale whole-image pass: update the pyramid metrics, return the fused and the
    finest-only predictions [B, H, W]. Padding is labelled ignore, so it is never scored."""
    height, width = labels.shape[-2:]
    padded = pad_to_divisor(images, predictor.net.size_divisor)
    padded_labels = F.pad(
        labels, (0, padded.shape[-1] - width, 0, padded.shape[-2] - height), value=predictor.ignore_index
    )
    out = predictor.net(padded)
    fused, level_map = fused_logits(out, padded.shape[-2:], predictor.tau)
    fused_pred = fused.argmax(1)
    level_preds = level_predictions(out, padded.shape[-2:])
    metrics.update(
        fused_pred=fused_pred,
        level_preds=level_preds,
        target=padded_labels,
        unity_logits=out.unity,
        unity_targets=build_targets(padded_labels, predictor.levels, predictor.ignore_index).unity,
        level_map=level_map,
    )
    return fused_pred[..., :height, :width], level_preds[-1][..., :height, :width]


def per_class_table(scores: dict[str, Any]) -> str:
    """The per-class IoU / accuracy table (percent; '-' for a class absent from the split)."""
    names = list(scores["per_class_iou"])
    summary = (("mIoU", "mIoU"), ("pixel accuracy", "pixel_acc"), ("mean accuracy", "mean_acc"))
    width = max(len("class"), *(len(name) for name in names), *(len(label) for label, _ in summary))

    def cell(value: float | None) -> str:
        value = percent(value)
        return f"{'-':>8}" if math.isnan(value) else f"{value:8.2f}"

    lines = [f"{'class':<{width}}  {'IoU %':>8}  {'Acc %':>8}", "-" * (width + 20)]
    lines += [
        f"{name:<{width}}  {cell(scores['per_class_iou'][name])}  {cell(scores['per_class_acc'][name])}"
        for name in names
    ]
    lines.append("-" * (width + 20))
    lines += [f"{label:<{width}}  {cell(scores[key])}" for label, key in summary]
    return "\n".join(lines)


def write_per_class_csv(path: Path, scores: dict[str, Any]) -> Path:
    """class,iou,acc (fractions; empty for a class absent from the split)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "acc"])
        for name, iou in scores["per_class_iou"].items():
            acc = scores["per_class_acc"][name]
            writer.writerow([name, *("" if math.isnan(percent(v)) else f"{v:.6f}" for v in (iou, acc))])
    return path
