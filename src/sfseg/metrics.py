"""Dataset-level segmentation metrics (DESIGN 5): one confusion matrix per split, summed over DDP ranks."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from sfseg.analysis import (
    class_accuracy,
    class_iou,
    iou_minus_fused,
    labels_per_level,
    mean_iou,
    missed_counts,
    oracle_prediction,
    reliability,
    specialization_confusion,
    specialization_miou,
    unity_precision_recall,
)
from sfseg.pyramid import (
    IGNORE_INDEX,
    check_tau,
    level_counts,
    level_strides,
    unity_calibration_counts,
    unity_counts,
)


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """[C, C] counts, rows = ground truth, columns = prediction; ignored pixels are left out."""
    valid = target != ignore_index
    if valid.any() and int(target[valid].max()) >= num_classes:
        raise ValueError(
            f"label value {int(target[valid].max())} is outside 0..{num_classes - 1} and not {ignore_index}"
        )
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confmat: Tensor) -> dict[str, float | list[float]]:
    """mIoU over the classes present in the ground truth or the prediction, pixel and mean accuracy,
    and per-class IoU and accuracy (NaN for absent classes)."""
    iou = class_iou(confmat)
    accuracy = class_accuracy(confmat)
    total = confmat.sum()
    return {
        "mIoU": float(mean_iou(confmat)),
        "pixel_acc": float(confmat.diagonal().sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(torch.nanmean(accuracy)),
        "iou": iou.tolist(),
        "acc": accuracy.tolist(),
    }


class _SyncedMetric(Metric):
    """A Metric whose extra read-outs (besides `compute`) also see the states summed over ranks."""

    def synced(self) -> AbstractContextManager[None]:
        # compute() syncs on its own; other methods must ask, or under DDP they read one rank's share.
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )


class SegmentationMetrics(_SyncedMetric):
    """One confusion matrix over a split; `compute` gives `segmentation_scores` of it."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), "sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.confmat += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float | list[float]]:
        return segmentation_scores(self.confmat)


class PyramidMetrics(_SyncedMetric):
    """Accumulates, over a split, the confusion matrices of the fused output and of each level's own
    prediction, Table 9's confusion matrices (pixels grouped by the level the fused map took them
    from), the unity pyramid's hits at tau, and how many finest cells and labels each level gives.
    The fuse's headroom (docs/fuse.md): the oracle fuse's confusion matrix, the pixels where the fuse
    took a wrong level while another was right (split by the level-1 cell being mixed), and the
    confusion matrix of each fuse rule in `rules` applied to the same pyramids.

    Every state is a sum, so under DDP the ranks' states add up to the whole split's. Extra keyword
    arguments go to torchmetrics' Metric (e.g. `dist_sync_fn`).
    """

    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        num_levels: int,
        tau: float = 0.9,
        ignore_index: int = IGNORE_INDEX,
        rules: Sequence[str] = (),
        test_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.tau = tau
        self.ignore_index = ignore_index
        self.rules = tuple(rules)
        # Labels at their own size, the network's input resized by test_scale: a level-1 cell spans
        # stride / test_scale label pixels (rounded) in the missed-pixel split.
        self.coarsest_cell = max(1, round(level_strides(num_levels)[0] / test_scale))
        # Row 0 is the fused output, rows 1..L are levels 1..L.
        self.add_state(
            "confmat", torch.zeros(num_levels + 1, num_classes, num_classes, dtype=torch.long), "sum"
        )
        # [level the fused map took the pixel from, level whose prediction is scored, C, C] (Table 9).
        self.add_state(
            "specialization",
            torch.zeros(num_levels, num_levels, num_classes, num_classes, dtype=torch.long),
            "sum",
        )
        self.add_state("unity", torch.zeros(max(num_levels - 1, 0), 3, dtype=torch.long), "sum")
        self.add_state("cells", torch.zeros(num_levels, dtype=torch.long), "sum")
        self.add_state("labels", torch.zeros(num_levels, dtype=torch.long), "sum")
        self.add_state("oracle", torch.zeros(num_classes, num_classes, dtype=torch.long), "sum")
        # [level-1 cell pure / mixed, valid pixels / fused wrong / fused wrong but some level right]
        self.add_state("missed", torch.zeros(2, 3, dtype=torch.long), "sum")
        self.add_state(
            "rule_confmat", torch.zeros(len(self.rules), num_classes, num_classes, dtype=torch.long), "sum"
        )

    def update(
        self,
        fused_pred: Tensor,
        level_preds: list[Tensor],
        target: Tensor,
        unity_logits: list[Tensor],
        unity_targets: list[Tensor],
        level_map: Tensor,
        rule_preds: Sequence[Tensor] = (),
    ) -> None:
        """fused_pred, level_preds (L maps) and target are [B, H, W] at label size; level_map is
        `fuse`'s [B, h_L, w_L] over the image (`InputView.level_map`), spread over the label's pixels
        (`pixel_levels`). rule_preds: the fused prediction of each of `self.rules` on the same pyramids,
        [B, H, W] each."""
        if len(rule_preds) != len(self.rules):
            raise ValueError(f"expected one prediction per rule {list(self.rules)}, got {len(rule_preds)}")
        preds = [fused_pred, *level_preds]
        for row, pred in enumerate(preds):
            self.confmat[row] += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        oracle = oracle_prediction(fused_pred, level_preds, target)
        self.oracle += confusion_matrix(oracle, target, self.num_classes, self.ignore_index)
        self.missed += missed_counts(fused_pred, level_preds, target, self.coarsest_cell, self.ignore_index)
        for row, pred in enumerate(rule_preds):
            self.rule_confmat[row] += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.specialization += specialization_confusion(
            level_preds, target, level_map, self.num_classes, self.ignore_index
        )
        if unity_logits:
            self.unity += unity_counts(unity_logits, unity_targets, self.tau, self.ignore_index).to(
                self.unity
            )
        self.cells += level_counts(level_map, self.num_levels).to(self.cells)
        self.labels += labels_per_level(level_map, self.num_levels).to(self.labels)

    def compute(self) -> dict[str, float]:
        fused = segmentation_scores(self.confmat[0])
        result = {"mIoU": fused["mIoU"], "pixel_acc": fused["pixel_acc"], "mean_acc": fused["mean_acc"]}
        result.update(self._level_scores())
        result["mIoU_finest"] = result[f"mIoU_level{self.num_levels}"]
        result.update(self._headroom())
        precision, recall = unity_precision_recall(self.unity)
        for level, (prec, rec) in enumerate(zip(precision.tolist(), recall.tolist(), strict=True), start=1):
            result[f"unity_precision_level{level}"] = prec
            result[f"unity_recall_level{level}"] = rec
        shares = self.cells.double() / self.cells.sum().clamp(min=1)
        for level, share in enumerate(shares.tolist(), start=1):
            result[f"share_level{level}"] = share
        # Parsimony: labels the fused map needs per finest cell (1.0 = no saving over the finest level).
        result["labels_per_finest_cell"] = float(self.labels.sum() / self.cells.sum().clamp(min=1))
        return result

    def headroom(self) -> dict[str, float]:
        """The fused mIoU beside its headroom (docs/fuse.md): each level alone (mIoU_level<l>), the best
        single level, the oracle fuse, the pixels the fuse missed, and each compared rule."""
        with self.synced():
            return {"mIoU": float(mean_iou(self.confmat[0])), **self._level_scores(), **self._headroom()}

    def _level_scores(self) -> dict[str, float]:
        levels = mean_iou(self.confmat[1:]).tolist()
        return {f"mIoU_level{level}": miou for level, miou in enumerate(levels, start=1)}

    def _headroom(self) -> dict[str, float]:
        """The fuse's headroom (docs/fuse.md): the best single level, the oracle fuse, the shares of
        valid pixels the fuse missed (wrong while some level was right), in all and in level-1 cells
        that are mixed / of one class in the ground truth, and the mIoU of each compared rule."""
        level_miou = mean_iou(self.confmat[1:])
        best = int(torch.nan_to_num(level_miou, nan=-1.0).argmax())
        valid, _, missed = self.missed.double().unbind(-1)  # each [pure, mixed]
        total = valid.sum().clamp(min=1)
        result = {
            "best_level": best + 1,
            "mIoU_best_level": float(level_miou[best]),
            "mIoU_oracle": float(mean_iou(self.oracle)),
            "missed_share": float(missed.sum() / total),
            "missed_share_mixed": float(missed[1] / total),
            "missed_share_pure": float(missed[0] / total),
            "mixed_pixel_share": float(valid[1] / total),
        }
        for rule, miou in zip(self.rules, mean_iou(self.rule_confmat).tolist(), strict=True):
            result[f"mIoU_fuse_{rule}"] = miou
        return result

    def per_class(self) -> dict[str, list[float]]:
        """Per-class IoU and accuracy of the fused output, IoU of each level's own prediction
        (iou_level<l>) and of the oracle fuse (iou_oracle)."""
        with self.synced():
            scores = segmentation_scores(self.confmat[0])
            levels = class_iou(self.confmat[1:]).tolist()
            return {
                "iou": scores["iou"],
                "acc": scores["acc"],
                **{f"iou_level{level}": iou for level, iou in enumerate(levels, start=1)},
                "iou_oracle": class_iou(self.oracle).tolist(),
            }

    def specialization_report(self) -> dict[str, Tensor]:
        """The Sec. 5.5 analysis of the split, as tensors (float64 scores, NaN where undefined):

        table9 [L predicting (rows), L assigned (columns)] mIoU and group_pixels [L assigned];
        level_iou [L, C], fused_iou [C] and iou_minus_fused [L, C] (Fig. 3, classes in the ground
        truth only); cells [L] (finest cells taken from each level), labels [L] (labels taken from
        each level, one per level-l cell); unity_precision and unity_recall [L-1].
        """
        with self.synced():
            precision, recall = unity_precision_recall(self.unity)
            return {
                "table9": specialization_miou(self.specialization),
                "group_pixels": self.specialization[:, 0].sum(dim=(-2, -1)),
                "level_iou": class_iou(self.confmat[1:]),
                "fused_iou": class_iou(self.confmat[0]),
                "iou_minus_fused": iou_minus_fused(self.confmat[1:], self.confmat[0]),
                "cells": self.cells.clone(),
                "labels": self.labels.clone(),
                "unity_precision": precision,
                "unity_recall": recall,
            }


class UnityCalibration(_SyncedMetric):
    """The unity pyramid's calibration over a split: per unity level and per bin of predicted unity
    probability, the cells with a valid pixel, the true unity cells among them and the sum of their
    predicted probabilities (sums, so under DDP the ranks' states add up to the whole split's)."""

    full_state_update = False

    def __init__(
        self, num_levels: int, num_bins: int = 10, ignore_index: int = IGNORE_INDEX, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_bins < 1:
            raise ValueError(f"eval.calibration_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.ignore_index = ignore_index
        shape = (max(num_levels - 1, 0), num_bins)
        self.add_state("cells", torch.zeros(shape, dtype=torch.long), "sum")
        self.add_state("unity_cells", torch.zeros(shape, dtype=torch.long), "sum")
        self.add_state("probability", torch.zeros(shape, dtype=torch.float64), "sum")

    def update(self, unity_logits: list[Tensor], unity_targets: list[Tensor]) -> None:
        if not unity_logits:
            return
        cells, unity_cells, probability = unity_calibration_counts(
            unity_logits, unity_targets, self.num_bins, self.ignore_index
        )
        self.cells += cells
        self.unity_cells += unity_cells
        self.probability += probability

    def compute(self) -> dict[str, Tensor]:
        """Per unity level [L-1, bins]: cells, unity_cells, mean_predicted and observed (NaN in an
        empty bin); ece [L-1]; edges [bins + 1] of the probability bins."""
        return {
            "edges": torch.linspace(0, 1, self.num_bins + 1, dtype=torch.float64),
            "cells": self.cells.clone(),
            "unity_cells": self.unity_cells.clone(),
            **reliability(self.cells, self.unity_cells, self.probability),
        }


class TauSweepMetrics(_SyncedMetric):
    """The fused output re-scored at several unity thresholds on the same pyramids: per tau, the
    confusion matrix and, per level, the finest cells and the labels the fused map takes from it."""

    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        num_levels: int,
        taus: Sequence[float],
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not taus:
            raise ValueError("eval.tau_sweep needs at least one tau")
        self.taus = [check_tau(tau, "eval.tau_sweep") for tau in taus]
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.ignore_index = ignore_index
        count = len(self.taus)
        self.add_state("confmat", torch.zeros(count, num_classes, num_classes, dtype=torch.long), "sum")
        self.add_state("cells", torch.zeros(count, num_levels, dtype=torch.long), "sum")
        self.add_state("labels", torch.zeros(count, num_levels, dtype=torch.long), "sum")

    def update(self, tau_index: int, fused_pred: Tensor, target: Tensor, level_map: Tensor) -> None:
        """The fused prediction [B, H, W] and level map [B, h_L, w_L] at `self.taus[tau_index]`."""
        self.confmat[tau_index] += confusion_matrix(fused_pred, target, self.num_classes, self.ignore_index)
        self.cells[tau_index] += level_counts(level_map, self.num_levels).to(self.cells)
        self.labels[tau_index] += labels_per_level(level_map, self.num_levels).to(self.labels)

    def compute(self) -> list[dict[str, float]]:
        """One row per tau: tau, mIoU, pixel and mean accuracy, the share of finest cells per level,
        the labels taken (one per level-l cell) and labels per finest cell."""
        rows = []
        for tau, confmat, cells, labels in zip(self.taus, self.confmat, self.cells, self.labels, strict=True):
            scores = segmentation_scores(confmat)
            shares = (cells.double() / cells.sum().clamp(min=1)).tolist()
            rows.append(
                {
                    "tau": tau,
                    "mIoU": scores["mIoU"],
                    "pixel_acc": scores["pixel_acc"],
                    "mean_acc": scores["mean_acc"],
                    **{f"share_level{level}": share for level, share in enumerate(shares, start=1)},
                    "labels": int(labels.sum()),
                    "labels_per_finest_cell": float(labels.sum() / cells.sum().clamp(min=1)),
                }
            )
        return rows
