"""Specialization analysis (Sec. 5.5, DESIGN 5) as pure tensor functions.

The metrics accumulate the counts over a split (`sfseg.metrics.PyramidMetrics`); these functions turn
the counts into Table 9, Fig. 3, the parsimony of the fused map and the unity precision/recall.
Levels are ordered coarse to fine (index 0 is the paper's level 1), as in `sfseg.pyramid`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sfseg.pyramid import FINEST_STRIDE, IGNORE_INDEX, level_strides, mixed_cells, repeat_cells

# Rows of `missed_counts`: pixels in level-1 cells of one class / of several classes (ground truth).
MISSED_ROWS = ("pure", "mixed")
# Columns of `missed_counts`: valid pixels, pixels the fused output gets wrong, and of those the pixels
# that some level's own prediction gets right (the fuse took the wrong level there).
MISSED_COLUMNS = ("pixels", "fused_wrong", "missed")


def class_iou(confmat: Tensor) -> Tensor:
    """Per-class IoU of confusion matrices [..., C, C] (rows ground truth, columns prediction) as
    float64 [..., C]; NaN for a class absent from both the ground truth and the prediction."""
    confmat = confmat.double()
    true_positive = confmat.diagonal(dim1=-2, dim2=-1)
    union = confmat.sum(-1) + confmat.sum(-2) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)


def class_accuracy(confmat: Tensor) -> Tensor:
    """Per-class accuracy (recall) [..., C]; NaN for a class absent from the ground truth."""
    confmat = confmat.double()
    ground_truth = confmat.sum(-1)
    return torch.where(
        ground_truth > 0, confmat.diagonal(dim1=-2, dim2=-1) / ground_truth.clamp(min=1), torch.nan
    )


def mean_iou(confmat: Tensor) -> Tensor:
    """mIoU [...] over the classes present in the ground truth or the prediction; NaN if none is."""
    return torch.nanmean(class_iou(confmat), dim=-1)


def pixel_levels(level_map: Tensor, size: Sequence[int]) -> Tensor:
    """The level each pixel of a [B, H, W] label map was fused from: the level map [B, h_L, w_L] with
    each finest cell repeated over its pixels (nearest upsampling when `size` is not a whole multiple
    of the level map, e.g. labels kept at a size the images were not resized to)."""
    height, width = size
    cells_h, cells_w = level_map.shape[-2:]
    factor = height // cells_h
    if factor >= 1 and (cells_h * factor, cells_w * factor) == (height, width):
        return repeat_cells(level_map, factor)
    return F.interpolate(level_map.unsqueeze(1).float(), size=(height, width), mode="nearest")[:, 0].long()


def specialization_confusion(
    level_preds: Sequence[Tensor],
    target: Tensor,
    level_map: Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Table 9's counts: one confusion matrix per (level the fused map took the pixel from, level
    whose own prediction is scored), shape [L assigned, L predicting, C, C] (int64).

    level_preds: L class maps [B, H, W] (each level's argmax at label size); target [B, H, W];
    level_map [B, h_L, w_L] from `fuse` (0 = coarsest). Ignored pixels are left out.
    """
    num_levels = len(level_preds)
    preds = torch.stack(list(level_preds))  # [L, B, H, W]
    valid = target != ignore_index
    assigned = pixel_levels(level_map, target.shape[-2:])[valid]
    truth = target[valid]
    predicting = torch.arange(num_levels, device=target.device).view(num_levels, 1)
    # One bincount over (assigned, predicting, truth, prediction) for all levels at once.
    group = assigned.unsqueeze(0) * num_levels + predicting
    index = (group * num_classes + truth.unsqueeze(0)) * num_classes + preds[:, valid]
    counts = torch.bincount(index.flatten(), minlength=num_levels * num_levels * num_classes * num_classes)
    return counts.view(num_levels, num_levels, num_classes, num_classes)


def specialization_miou(confmats: Tensor) -> Tensor:
    """Table 9 [L predicting (rows, l'), L assigned (columns, l)] from `specialization_confusion`
    counts [L assigned, L predicting, C, C]; NaN for a group without pixels."""
    return mean_iou(confmats).transpose(0, 1)


def iou_minus_fused(level_confmats: Tensor, fused_confmat: Tensor) -> Tensor:
    """Fig. 3: per class, IoU of each level's own prediction minus the fused output's IoU, [L, C].

    Only classes present in the ground truth are scored (NaN elsewhere): for a class that never
    occurs, an IoU of 0 or 1 says nothing about which level is better at it.
    """
    present = fused_confmat.sum(-1) > 0
    difference = class_iou(level_confmats) - class_iou(fused_confmat)
    return torch.where(present, difference, torch.nan)


def labels_per_level(level_map: Tensor, num_levels: int) -> Tensor:
    """How many labels the fused map takes from each level, counted at that level's own cell
    resolution: a level-l cell counts once, not once per finest cell under it. Shape [L] (int64).

    The count is of the level-l cells that contain a finest cell taken from level l; a cell cut by
    the border of the map still counts once.
    """
    counts = []
    for level, stride in enumerate(level_strides(num_levels)):
        taken = (level_map == level).unsqueeze(1).float()
        factor = stride // FINEST_STRIDE
        cells = F.max_pool2d(taken, kernel_size=factor, stride=factor, ceil_mode=True)
        counts.append(cells.sum().long())
    return torch.stack(counts)


def oracle_prediction(fused_pred: Tensor, level_preds: Sequence[Tensor], target: Tensor) -> Tensor:
    """The oracle fuse [B, H, W]: the true class wherever some level's own prediction is right, else the
    fused prediction. Every pixel it gets right, the fused output or some level gets right, so its
    accuracy bounds any rule that picks one level per pixel; its confusion matrix (hence per-class IoU)
    keeps the fused output's errors where no level is right."""
    any_right = (torch.stack(list(level_preds)) == target).any(0)
    return torch.where(any_right, target, fused_pred)


def missed_counts(
    fused_pred: Tensor,
    level_preds: Sequence[Tensor],
    target: Tensor,
    cell_stride: int,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Where the fuse picks a wrong level: int64 [2, 3], rows MISSED_ROWS (the pixel's cell of side
    `cell_stride`, the coarsest level's, holds one class / several classes in the ground truth), columns
    MISSED_COLUMNS (valid pixels; fused output wrong; fused wrong while some level's prediction is right).
    All maps are [B, H, W]; H and W need not be multiples of cell_stride (the labels are padded with
    ignore)."""
    height, width = target.shape[-2:]
    padded = F.pad(target, (0, -width % cell_stride, 0, -height % cell_stride), value=ignore_index)
    mixed = repeat_cells(mixed_cells(padded, cell_stride, ignore_index), cell_stride)[..., :height, :width]
    valid = target != ignore_index
    wrong = valid & (fused_pred != target)
    missed = wrong & (torch.stack(list(level_preds)) == target).any(0)
    columns = torch.stack([valid, wrong, missed])  # [3, B, H, W]
    return torch.stack([(columns & ~mixed).sum((1, 2, 3)), (columns & mixed).sum((1, 2, 3))])


def unity_precision_recall(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall [L-1] of "predicted unity >= tau" from `unity_counts` rows
    [true positives, false positives, false negatives]; NaN where undefined."""
    true_positive, false_positive, false_negative = counts.double().unbind(-1)
    predicted = true_positive + false_positive
    actual = true_positive + false_negative
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.nan)
    recall = torch.where(actual > 0, true_positive / actual.clamp(min=1), torch.nan)
    return precision, recall


def reliability(cells: Tensor, unity_cells: Tensor, probability_sum: Tensor) -> dict[str, Tensor]:
    """A reliability diagram and the expected calibration error from `unity_calibration_counts`
    ([..., bins] each): per bin the mean predicted unity probability and the observed share of true
    unity cells (NaN for an empty bin), and ECE [...] = sum over bins of (cells in the bin / all cells)
    * |observed - mean predicted| (NaN without cells)."""
    cells = cells.double()
    occupied = cells > 0
    mean_predicted = torch.where(occupied, probability_sum / cells.clamp(min=1), torch.nan)
    observed = torch.where(occupied, unity_cells.double() / cells.clamp(min=1), torch.nan)
    total = cells.sum(-1)
    # n_b |o_b - p_b| = |unity cells_b - probability sum_b|: no division by an empty bin.
    gap = (unity_cells.double() - probability_sum).abs().sum(-1)
    ece = torch.where(total > 0, gap / total.clamp(min=1), torch.nan)
    return {"mean_predicted": mean_predicted, "observed": observed, "ece": ece}
