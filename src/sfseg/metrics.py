"""Dataset-level segmentation metrics (DESIGN 5): one confusion matrix per split, summed over DDP ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from sfseg.pyramid import IGNORE_INDEX, level_counts, unity_counts


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
    confmat = confmat.double()
    true_positive = confmat.diag()
    gt = confmat.sum(1)
    predicted = confmat.sum(0)
    union = gt + predicted - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)
    accuracy = torch.where(gt > 0, true_positive / gt.clamp(min=1), torch.nan)
    total = confmat.sum()
    return {
        "mIoU": _nanmean(iou),
        "pixel_acc": float(true_positive.sum() / total) if total > 0 else float("nan"),
        "mean_acc": _nanmean(accuracy),
        "iou": iou.tolist(),
        "acc": accuracy.tolist(),
    }


def _nanmean(values: Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if present.numel() else float("nan")


class PyramidMetrics(Metric):
    """Accumulates, over a split, the confusion matrices of the fused output and of each level's own
    prediction, the unity pyramid's hits at tau, and how many finest cells each level resolves."""

    full_state_update = False

    def __init__(self, num_classes: int, num_levels: int, tau: float = 0.9, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.tau = tau
        self.ignore_index = ignore_index
        # Row 0 is the fused output, rows 1..L are levels 1..L.
        self.add_state(
            "confmat", torch.zeros(num_levels + 1, num_classes, num_classes, dtype=torch.long), "sum"
        )
        self.add_state("unity", torch.zeros(max(num_levels - 1, 0), 3, dtype=torch.long), "sum")
        self.add_state("cells", torch.zeros(num_levels, dtype=torch.long), "sum")

    def update(
        self,
        fused_pred: Tensor,
        level_preds: list[Tensor],
        target: Tensor,
        unity_logits: list[Tensor],
        unity_targets: list[Tensor],
        level_map: Tensor,
    ) -> None:
        preds = [fused_pred, *level_preds]
        for row, pred in enumerate(preds):
            self.confmat[row] += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if unity_logits:
            self.unity += unity_counts(unity_logits, unity_targets, self.tau, self.ignore_index).to(
                self.unity
            )
        self.cells += level_counts(level_map, self.num_levels).to(self.cells)

    def compute(self) -> dict[str, float]:
        fused = segmentation_scores(self.confmat[0])
        result = {"mIoU": fused["mIoU"], "pixel_acc": fused["pixel_acc"], "mean_acc": fused["mean_acc"]}
        for level in range(1, self.num_levels + 1):
            result[f"mIoU_level{level}"] = segmentation_scores(self.confmat[level])["mIoU"]
        result["mIoU_finest"] = result[f"mIoU_level{self.num_levels}"]
        for level, (tp, fp, fn) in enumerate(self.unity.double(), start=1):
            result[f"unity_precision_level{level}"] = float(tp / (tp + fp)) if tp + fp > 0 else float("nan")
            result[f"unity_recall_level{level}"] = float(tp / (tp + fn)) if tp + fn > 0 else float("nan")
        shares = self.cells.double() / self.cells.sum().clamp(min=1)
        for level, share in enumerate(shares.tolist(), start=1):
            result[f"share_level{level}"] = share
        return result

    def per_class(self) -> dict[str, list[float]]:
        """Per-class IoU and accuracy of the fused output."""
        scores = segmentation_scores(self.confmat[0])
        return {"iou": scores["iou"], "acc": scores["acc"]}
