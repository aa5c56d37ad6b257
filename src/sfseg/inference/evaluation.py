"""Evaluation over a split: the chosen prediction scored with one confusion matrix, and the
single-scale whole-image fused pyramid scored level by level for the specialization analysis."""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from sfseg.inference.loading import Predictor
from sfseg.inference.passes import InferenceSettings, tta_probabilities
from sfseg.inference.pixels import (
    InputView,
    compared_rules,
    fused_logits,
    level_predictions,
    rule_predictions,
)
from sfseg.metrics import PyramidMetrics, SegmentationMetrics, TauSweepMetrics, UnityCalibration
from sfseg.models import PyramidOutput
from sfseg.pyramid import FuseRule, build_targets, level_strides
from sfseg.runs import write_json
from sfseg.visualize import percent, save_figure, tau_sweep_figure, unity_calibration_figure


@dataclass
class Evaluation:
    """What `evaluate` accumulated over a split.

    prediction: the evaluated prediction (whole/slide, scales, flip, fused or finest-only);
    pyramid: the single-scale whole-image fused pyramid, for the specialization analysis and the
    fuse's headroom; calibration: the unity pyramid's reliability counts; sweep: the same pyramids
    fused at other taus; fuse_rule: the rule of the fused output (the net's).
    """

    prediction: SegmentationMetrics
    pyramid: PyramidMetrics
    class_names: list[str]
    tau: float
    num_images: int
    calibration: UnityCalibration
    sweep: TauSweepMetrics | None = None
    fuse_rule: FuseRule = field(default_factory=FuseRule)
    # Measured time: "evaluation" (the loop without data loading) and "tau_sweep" (its re-fuses).
    seconds: dict[str, float] = field(default_factory=dict)

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

    def headroom(self) -> dict[str, Any]:
        """The single-scale pass's fused mIoU beside its headroom, as written to metrics.json["headroom"]
        (docs/fuse.md): the fuse rule, each level alone, the best single level, the oracle fuse, the
        shares of pixels the fuse missed, and the mIoU of every compared rule on the same pyramids."""
        return {"fuse_rule": self.fuse_rule.label, **self.pyramid.headroom()}

    def per_class_headroom(self) -> dict[str, dict[str, float]]:
        """Per class (by name), from the single-scale pass: the IoU of each level's own prediction
        (iou_level<l>), of the best single level by mIoU (iou_best_level) and of the oracle fuse
        (iou_oracle)."""
        per_class = self.pyramid.per_class()
        levels = {key: per_class[key] for key in per_class if key.startswith("iou_level")}
        columns = {
            **levels,
            "iou_best_level": levels[f"iou_level{self.pyramid.headroom()['best_level']}"],
            "iou_oracle": per_class["iou_oracle"],
        }
        return {name: dict(zip(self.class_names, values, strict=True)) for name, values in columns.items()}

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

    def unity_calibration(self) -> dict[str, Any]:
        """Per unity level, the reliability diagram (bins of predicted unity probability: cells, true
        unity cells, mean predicted probability, observed share of unity cells) and the expected
        calibration error, as written to unity_calibration.json."""
        report = self.calibration.compute()
        ece = report["ece"].reshape(-1)  # torchmetrics squeezes a one-element result (L=2) to a scalar
        strides = level_strides(self.pyramid.num_levels)
        return {
            "tau": self.tau,
            "bin_edges": report["edges"].tolist(),
            "levels": {
                f"level{level}": {
                    "stride": strides[level - 1],
                    "cells": report["cells"][level - 1].tolist(),
                    "unity_cells": report["unity_cells"][level - 1].tolist(),
                    "mean_predicted": report["mean_predicted"][level - 1].tolist(),
                    "observed": report["observed"][level - 1].tolist(),
                    "ece": float(ece[level - 1]),
                }
                for level in range(1, self.pyramid.num_levels)
            },
        }

    def tau_sweep(self) -> list[dict[str, float]]:
        """Per swept tau: mIoU, pixel and mean accuracy, the share of finest cells per level, the labels
        the fused map needs in all and per image, and per finest cell."""
        return [
            {**row, "labels_per_image": row["labels"] / max(self.num_images, 1)}
            for row in self.sweep.compute()
        ]


class _Stopwatch:
    """Seconds spent per key. On CUDA the clock waits for the queued kernels, so that work is billed
    to the part of the loop that launched it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[key] += time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.inference_mode()
def evaluate(
    predictor: Predictor,
    loader: DataLoader,
    settings: InferenceSettings | None = None,
    progress: bool = True,
    tau_sweep: Sequence[float] = (),
    calibration_bins: int = 10,
) -> Evaluation:
    """Run the predictor over a loader of {"image", "label"} batches and accumulate the metrics.

    tau_sweep: taus at which the single-scale pyramids are fused again and scored (the network runs once
    per batch; each tau adds one fuse, upsampling and scoring). calibration_bins: bins of predicted unity
    probability for the reliability diagrams.
    """
    settings = settings or InferenceSettings()
    device, tau = predictor.device, predictor.tau
    classes, levels, ignore = predictor.num_classes, predictor.levels, predictor.ignore_index
    prediction = SegmentationMetrics(classes, ignore).to(device)
    rules = compared_rules(predictor.net)
    pyramid = PyramidMetrics(
        classes, levels, tau, ignore, [rule.label for rule in rules], test_scale=predictor.test_scale
    ).to(device)
    calibration = UnityCalibration(levels, calibration_bins, ignore).to(device)
    sweep = TauSweepMetrics(classes, levels, tau_sweep, ignore).to(device) if tau_sweep else None
    clock = _Stopwatch(device)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if images.shape[-2:] != labels.shape[-2:]:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} and label size {tuple(labels.shape[-2:])} differ "
                "in a batch of the data's val split"
            )
        with clock("evaluation"), predictor.autocast_context():
            fused_pred, finest_pred = _score_pyramid(
                predictor, images, labels, pyramid, rules, calibration, sweep, clock
            )
            if settings.single_pass:
                pred = fused_pred if settings.fuse else finest_pred
            else:
                pred = tta_probabilities(predictor.net, images, settings, tau, predictor.test_scale).argmax(1)
        prediction.update(pred, labels)
    return Evaluation(
        prediction,
        pyramid,
        list(predictor.class_names),
        tau,
        len(loader.dataset),
        calibration,
        sweep,
        predictor.fuse_rule,
        dict(clock.seconds),
    )


def _score_pyramid(
    predictor: Predictor,
    images: Tensor,
    labels: Tensor,
    metrics: PyramidMetrics,
    rules: Sequence[FuseRule],
    calibration: UnityCalibration,
    sweep: TauSweepMetrics | None,
    clock: _Stopwatch,
) -> tuple[Tensor, Tensor]:
    """The single-scale whole-image pass at the model's test scale (`InputView`): update the pyramid
    metrics, the unity calibration and the tau sweep, return the fused and the finest-only predictions
    [B, H, W], every one scored on the labels at their own size. The unity pyramid is scored on the
    network's cells, against the labels brought to its input grid."""
    view = InputView.of(labels.shape[-2:], predictor.test_scale, predictor.net.size_divisor)
    out = predictor.net(view.images(images))
    fused, level_map = fused_logits(out, view, predictor.tau, rule=predictor.fuse_rule)
    fused_pred = fused.argmax(1)
    level_preds = level_predictions(out, view)
    unity_targets = build_targets(
        view.labels(labels, predictor.ignore_index), predictor.levels, predictor.ignore_index
    ).unity
    metrics.update(
        fused_pred=fused_pred,
        level_preds=level_preds,
        target=labels,
        unity_logits=out.unity,
        unity_targets=unity_targets,
        level_map=view.cells(level_map),
        rule_preds=rule_predictions(out, view, predictor.tau, rules),
    )
    calibration.update(out.unity, unity_targets)
    if sweep is not None:
        with clock("tau_sweep"):
            _sweep_taus(out, view, labels, sweep, predictor.fuse_rule)
    return fused_pred, level_preds[-1]


def _sweep_taus(
    out: PyramidOutput, view: InputView, labels: Tensor, sweep: TauSweepMetrics, rule: FuseRule
) -> None:
    """Fuse the same pyramid output with `rule` at every tau of the sweep and score it against labels
    [B, H, W] (a rule that does not read tau gives the same row at every tau)."""
    for index, tau in enumerate(sweep.taus):
        fused, level_map = fused_logits(out, view, tau, rule=rule)
        sweep.update(index, fused.argmax(1), labels, view.cells(level_map))


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


def write_per_class_csv(
    path: Path, scores: dict[str, Any], headroom: dict[str, dict[str, float]] | None = None
) -> Path:
    """class,iou,acc (fractions; empty for a class absent from the split), then one column per entry of
    `headroom` (Evaluation.per_class_headroom: iou_level<l>, iou_best_level, iou_oracle)."""
    headroom = headroom or {}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "acc", *headroom])
        for name, iou in scores["per_class_iou"].items():
            values = (iou, scores["per_class_acc"][name], *(column[name] for column in headroom.values()))
            writer.writerow([name, *("" if math.isnan(percent(v)) else f"{v:.6f}" for v in values)])
    return path


def write_unity_calibration(folder: Path, evaluation: Evaluation) -> list[Path]:
    """unity_calibration.json (per unity level: the bins' cells, true unity cells, mean prediction,
    observed share, and the ECE) and unity_calibration.png (the reliability diagrams)."""
    calibration = evaluation.unity_calibration()
    write_json(folder / "unity_calibration.json", calibration)
    return [
        folder / "unity_calibration.json",
        save_figure(unity_calibration_figure(calibration), folder / "unity_calibration.png"),
    ]


def write_tau_sweep(folder: Path, evaluation: Evaluation, checkpoint_tau: float) -> list[Path]:
    """tau_sweep.csv (fractions), tau_sweep.md (percent, with the measured cost of the sweep) and
    tau_sweep.png (mIoU against labels needed per image), the checkpoint's tau marked in each."""
    rows = evaluation.tau_sweep()
    levels = evaluation.pyramid.num_levels
    shares = [f"share_level{level}" for level in range(1, levels + 1)]
    columns = ["tau", "mIoU", "pixel_acc", "mean_acc", "labels_per_image", "labels_per_finest_cell", *shares]
    with (folder / "tau_sweep.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "checkpoint_tau"])
        for row in rows:
            writer.writerow([f"{row[key]:.6g}" for key in columns] + [row["tau"] == checkpoint_tau])
    lines = [
        "| τ | mIoU (%) | pixel acc. (%) | labels / image | labels / finest cell | "
        + " | ".join(f"level {level} (%)" for level in range(1, levels + 1))
        + " |",
        "|---" * (5 + levels) + "|",
    ]
    for row in rows:
        tau = f"**{row['tau']:g}** (checkpoint)" if row["tau"] == checkpoint_tau else f"{row['tau']:g}"
        values = [percent(row["mIoU"]), percent(row["pixel_acc"])]
        lines.append(
            f"| {tau} | {values[0]:.2f} | {values[1]:.2f} | {row['labels_per_image']:.1f} | "
            f"{row['labels_per_finest_cell']:.3f} | "
            + " | ".join(f"{100 * row[share]:.1f}" for share in shares)
            + " |"
        )
    seconds = evaluation.seconds
    if not evaluation.fuse_rule.reads_tau:
        lines += ["", f"The {evaluation.fuse_rule.label} fuse does not read τ: every row is the same fuse."]
    lines += [
        "",
        f"{evaluation.num_images} images. Level columns: the share of finest cells the fused map takes from "
        "each level; labels: one per level-l cell it takes from level l.",
        f"Cost: the network ran once per image batch, and each τ re-fused those pyramids: the {len(rows)} "
        f"re-fuses (with upsampling and scoring) took {seconds['tau_sweep']:.2f} s of the evaluation's "
        f"{seconds['evaluation']:.2f} s ({seconds['tau_sweep'] / len(rows):.3f} s per τ; data loading not counted).",
    ]
    (folder / "tau_sweep.md").write_text("\n".join(lines) + "\n")
    figure = save_figure(tau_sweep_figure(rows, checkpoint_tau), folder / "tau_sweep.png")
    return [folder / "tau_sweep.csv", folder / "tau_sweep.md", figure]
