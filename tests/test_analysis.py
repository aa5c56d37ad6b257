"""Specialization analysis (Sec. 5.5): Table 9, Fig. 3, parsimony and unity scores on hand-made
tensors whose answers are worked out by hand."""

import math

import pytest
import torch

from sfseg.analysis import (
    class_accuracy,
    class_iou,
    iou_minus_fused,
    labels_per_level,
    mean_iou,
    pixel_levels,
    specialization_confusion,
    specialization_miou,
    unity_precision_recall,
)
from sfseg.pyramid import IGNORE_INDEX

nan = math.nan


def test_class_iou_accuracy_and_mean_skip_absent_classes():
    # Rows ground truth, columns prediction. Class 2 never occurs, class 1 is only predicted.
    confmat = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert class_iou(confmat).tolist()[:2] == [0.75, 0.0]
    assert math.isnan(class_iou(confmat)[2])
    assert class_accuracy(confmat)[0] == 1.0 * 3 / 4
    assert math.isnan(class_accuracy(confmat)[1])
    assert float(mean_iou(confmat)) == pytest.approx(0.375)  # (0.75 + 0) / 2, class 2 left out
    batched = torch.stack([confmat, torch.zeros_like(confmat)])
    assert math.isnan(mean_iou(batched)[1])  # an empty group has no mIoU, not 0


def test_pixel_levels_repeats_each_finest_cell_over_its_pixels():
    level_map = torch.tensor([[[0, 1], [2, 3]]])
    pixels = pixel_levels(level_map, (8, 8))
    assert pixels.shape == (1, 8, 8)
    assert (pixels[0, :4, :4] == 0).all() and (pixels[0, 4:, 4:] == 3).all()
    # Labels at a size that is not a multiple of the level map: nearest cell.
    assert pixel_levels(level_map, (3, 3))[0].tolist() == [[0, 0, 1], [0, 0, 1], [2, 2, 3]]


def test_table9_groups_pixels_by_fused_level_and_scores_every_level_on_each_group():
    # L=2, 2 classes, labels 8x4 pixels = 2x1 finest cells of 4x4 pixels.
    # Top cell fused from level 0 (coarse), bottom cell from level 1 (finest).
    level_map = torch.tensor([[[0], [1]]])
    target = torch.zeros(1, 8, 4, dtype=torch.long)
    target[0, 4:] = 1
    target[0, 0, 0] = IGNORE_INDEX  # left out everywhere
    coarse = torch.zeros_like(target)  # right on the top group, wrong on the bottom group
    fine = target.clone().clamp(max=1)
    fine[0, :2] = 1  # 8 pixels of the top group wrong, the bottom group right
    counts = specialization_confusion([coarse, fine], target, level_map, num_classes=2)

    assert counts.shape == (2, 2, 2, 2)
    assert counts.sum() == 2 * 31  # every valid pixel once per predicting level
    # Group 0 (top, 15 valid pixels of class 0) scored by level 0: all right.
    assert counts[0, 0].tolist() == [[15, 0], [0, 0]]
    # Group 0 scored by level 1: 7 valid pixels wrong (rows 0-1 minus the ignored one), 8 right.
    assert counts[0, 1].tolist() == [[8, 7], [0, 0]]
    # Group 1 (bottom, 16 pixels of class 1): level 0 says 0 everywhere, level 1 is right.
    assert counts[1, 0].tolist() == [[0, 0], [16, 0]]
    assert counts[1, 1].tolist() == [[0, 0], [0, 16]]

    table9 = specialization_miou(counts)  # rows: predicting level, columns: assigned level
    assert table9[0, 0] == 1.0  # only class 0 occurs, all right
    assert table9[1, 0] == pytest.approx((8 / 15 + 0.0) / 2)  # class 1 predicted but absent: IoU 0
    assert table9[0, 1] == pytest.approx(0.0)  # class 0 predicted (IoU 0), class 1 missed (IoU 0)
    assert table9[1, 1] == 1.0
    # The diagonal wins in every column: each level is best on the pixels the fuse gave it.
    off_diagonal = table9.clone().fill_diagonal_(-1)
    assert (table9.diagonal() > off_diagonal.amax(0)).all()


def test_table9_group_without_pixels_is_nan():
    level_map = torch.zeros(1, 1, 1, dtype=torch.long)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    counts = specialization_confusion([target, target], target, level_map, num_classes=2)
    table9 = specialization_miou(counts)
    assert table9[:, 0].tolist() == [1.0, 1.0]
    assert table9[:, 1].isnan().all()


def test_fig3_is_level_iou_minus_fused_iou_on_classes_in_the_ground_truth():
    fused = torch.tensor([[4, 0, 0], [1, 3, 0], [0, 0, 0]])  # IoU 0.8, 0.75; class 2 absent
    coarse = torch.tensor([[4, 0, 0], [4, 0, 0], [0, 0, 0]])  # IoU 0.5, 0
    fine = torch.tensor([[2, 1, 1], [0, 4, 0], [0, 0, 0]])  # IoU 0.5, 0.8; predicts absent class 2
    difference = iou_minus_fused(torch.stack([coarse, fine]), fused)
    assert difference[0, :2].tolist() == pytest.approx([0.5 - 0.8, 0.0 - 0.75])
    assert difference[1, :2].tolist() == pytest.approx([0.5 - 0.8, 0.8 - 0.75])
    assert difference[:, 2].isnan().all()  # absent from the ground truth: not scored


def test_labels_per_level_counts_a_level_l_cell_once():
    # L=3: a level-0 cell covers 4x4 finest cells, a level-1 cell 2x2. An 8x8 finest map:
    # top-left 4x4 block from level 0 (1 label), top-right from level 1 (4 cells = 4 labels),
    # bottom half from level 2 (32 finest cells = 32 labels).
    level_map = torch.full((1, 8, 8), 2)
    level_map[0, :4, :4] = 0
    level_map[0, :4, 4:] = 1
    labels = labels_per_level(level_map, num_levels=3)
    assert labels.tolist() == [1, 4, 32]
    assert labels.sum() < level_map.numel()  # 37 labels instead of one per finest cell (64)
    # Two images, one all-finest: labels add up over the batch.
    batch = torch.stack([level_map[0], torch.full((8, 8), 2)])
    assert labels_per_level(batch, 3).tolist() == [1, 4, 32 + 64]


def test_labels_per_level_counts_a_cell_cut_by_the_border_once():
    level_map = torch.zeros(1, 6, 6, dtype=torch.long)  # level-0 cells are 4x4: a 2x2 grid, cut
    assert labels_per_level(level_map, 3).tolist() == [4, 0, 0]


def test_unity_precision_recall():
    counts = torch.tensor([[3, 1, 2], [0, 0, 5], [0, 0, 0]])  # [TP, FP, FN] per unity level
    precision, recall = unity_precision_recall(counts)
    assert precision[0] == 0.75 and recall[0] == pytest.approx(0.6)
    assert math.isnan(precision[1]) and recall[1] == 0.0
    assert precision[2:].isnan().all() and recall[2:].isnan().all()
    empty = unity_precision_recall(torch.zeros(0, 3, dtype=torch.long))
    assert empty[0].shape == (0,)
