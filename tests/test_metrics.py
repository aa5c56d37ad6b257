"""Dataset-level metrics (DESIGN 5) against independent computations: torchmetrics' own classes,
an absent class, the ignore index, Table 9 by explicit masking, a split over two DDP ranks, the tau
sweep against plain metrics at each tau, and the unity calibration on hand-made logits."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex, MulticlassRecall
from torchmetrics.utilities.data import dim_zero_sum

from sfseg.analysis import pixel_levels, reliability
from sfseg.metrics import (
    PyramidMetrics,
    SegmentationMetrics,
    TauSweepMetrics,
    UnityCalibration,
    confusion_matrix,
    segmentation_scores,
)
from sfseg.pyramid import IGNORE_INDEX, build_targets, fuse, repeat_cells

NUM_CLASSES = 5
ABSENT = 3  # never in the ground truth nor in any prediction
ONLY_PREDICTED = 4  # predicted sometimes, never in the ground truth
LEVELS = 3  # strides 16, 8, 4
RULES = ("hard", "soft")  # fuse rules scored on the same pyramids


def random_split(seed: int, batches: int = 3, size: int = 32):
    """Batches of labels with ignored pixels, and pyramids of random logits (so fuse mixes levels)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        labels = repeat_cells(torch.randint(0, 3, (2, size // 8, size // 8), generator=gen), 8)
        labels = labels.masked_fill(torch.rand(labels.shape, generator=gen) < 0.1, IGNORE_INDEX)
        semantic = []
        for level in range(LEVELS):
            cells = size // (16 // 2**level)
            logits = torch.randn(2, NUM_CLASSES, cells, cells, generator=gen)
            logits[:, ABSENT] = -100.0
            logits[:, ONLY_PREDICTED] -= 1.5
            semantic.append(logits)
        unity = [torch.randn(2, size // s, size // s, generator=gen) * 3 for s in (16, 8)]
        yield labels, semantic, unity


def update(metrics: PyramidMetrics, labels, semantic, unity) -> None:
    fused, level_map = fuse(semantic, unity, metrics.tau)
    metrics.update(
        fused_pred=to_label_size(fused, labels),
        level_preds=[to_label_size(logits, labels) for logits in semantic],
        target=labels,
        unity_logits=unity,
        unity_targets=build_targets(labels, LEVELS).unity,
        level_map=level_map,
        rule_preds=[
            to_label_size(fuse(semantic, unity, metrics.tau, rule)[0], labels) for rule in metrics.rules
        ],
    )


def to_label_size(logits, labels):
    return torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear").argmax(1)


def test_scores_agree_with_torchmetrics_with_an_absent_class_and_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 16, 16), generator=gen)
    target[:, :2] = IGNORE_INDEX
    pred = torch.randint(0, 3, target.shape, generator=gen)
    pred[0, 5] = ONLY_PREDICTED
    pred[target == IGNORE_INDEX] = ABSENT  # predictions on ignored pixels must not count

    confmat = confusion_matrix(pred, target, NUM_CLASSES)
    scores = segmentation_scores(confmat)
    reference_iou = MulticlassJaccardIndex(NUM_CLASSES, average=None, ignore_index=IGNORE_INDEX)(pred, target)
    reference_acc = MulticlassRecall(NUM_CLASSES, average=None, ignore_index=IGNORE_INDEX)(pred, target)

    assert confmat.sum() == (target != IGNORE_INDEX).sum()
    present = [0, 1, 2, ONLY_PREDICTED]
    assert torch.tensor(scores["iou"])[present].tolist() == pytest.approx(reference_iou[present].tolist())
    assert scores["iou"][ONLY_PREDICTED] == 0.0  # predicted but never true: counts, as 0
    assert math.isnan(scores["iou"][ABSENT])  # in neither: left out of the mean, not counted as 0
    assert scores["mIoU"] == pytest.approx(float(reference_iou[present].mean()))
    assert torch.tensor(scores["acc"])[:3].tolist() == pytest.approx(reference_acc[:3].tolist())
    assert math.isnan(scores["acc"][ONLY_PREDICTED]) and math.isnan(scores["acc"][ABSENT])
    assert scores["mean_acc"] == pytest.approx(float(reference_acc[:3].mean()))
    valid = target != IGNORE_INDEX
    assert scores["pixel_acc"] == pytest.approx(float((pred[valid] == target[valid]).double().mean()))


def test_one_confusion_matrix_per_split_not_a_mean_over_images():
    metrics = SegmentationMetrics(2)
    small = torch.zeros(1, 2, 2, dtype=torch.long)  # 4 pixels of class 0, all right: IoU 1, 1 class
    large_target = torch.ones(1, 8, 8, dtype=torch.long)
    large_pred = large_target.clone()
    large_pred[0, 0, :4] = 0  # 4 of 64 class-1 pixels called class 0
    metrics.update(small, small)
    metrics.update(large_pred, large_target)
    # Split level: class 0 IoU 4/8, class 1 IoU 60/64; a per-image mean would give (1 + (0 + 60/64) / 2) / 2.
    assert metrics.compute()["mIoU"] == pytest.approx((4 / 8 + 60 / 64) / 2)


def test_confusion_matrix_names_a_label_outside_the_classes():
    with pytest.raises(ValueError, match=r"label value 7 is outside 0\.\.4"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7), NUM_CLASSES)


def test_pyramid_metrics_match_independent_per_level_and_table9_computations():
    metrics = PyramidMetrics(NUM_CLASSES, LEVELS)
    all_labels, all_levels, all_assigned = [], [[] for _ in range(LEVELS)], []
    for labels, semantic, unity in random_split(seed=1):
        update(metrics, labels, semantic, unity)
        _, level_map = fuse(semantic, unity, 0.9)
        all_labels.append(labels)
        all_assigned.append(pixel_levels(level_map, labels.shape[-2:]))
        for level, logits in enumerate(semantic):
            all_levels[level].append(to_label_size(logits, labels))
    labels, assigned = torch.cat(all_labels), torch.cat(all_assigned)
    preds = [torch.cat(level) for level in all_levels]
    assert assigned.unique().numel() == LEVELS  # the random unity logits spread pixels over all levels

    report = metrics.specialization_report()
    reference = MulticlassConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE_INDEX)
    for level, pred in enumerate(preds):
        reference_iou = MulticlassJaccardIndex(NUM_CLASSES, average=None, ignore_index=IGNORE_INDEX)(
            pred, labels
        )
        assert report["level_iou"][level, :3].tolist() == pytest.approx(reference_iou[:3].tolist())
        for group in range(LEVELS):
            in_group = assigned == group
            expected = reference(pred[in_group], labels[in_group])
            assert torch.equal(metrics.specialization[group, level], expected)
    # Table 9 rows are the predicting level, columns the group; each entry is that group's mIoU.
    group, level = 1, 0
    expected = segmentation_scores(metrics.specialization[group, level])["mIoU"]
    assert float(report["table9"][level, group]) == pytest.approx(expected)
    assert report["group_pixels"].tolist() == [
        int(((assigned == g) & (labels != IGNORE_INDEX)).sum()) for g in range(LEVELS)
    ]
    # Fig. 3 is each level's IoU minus the fused IoU, on classes in the ground truth.
    assert report["iou_minus_fused"][:, :3] == pytest.approx(
        report["level_iou"][:, :3] - report["fused_iou"][:3]
    )
    assert report["iou_minus_fused"][:, 3:].isnan().all()
    # Parsimony: every finest cell counted once; fewer labels than finest cells once coarse levels take some.
    assert metrics.cells.sum() == labels.numel() // 16
    assert (metrics.labels <= metrics.cells).all() and metrics.labels.sum() < metrics.cells.sum()
    assert metrics.compute()["labels_per_finest_cell"] == pytest.approx(
        float(metrics.labels.sum() / metrics.cells.sum())
    )


def test_every_state_is_summed_over_ranks():
    metrics = PyramidMetrics(NUM_CLASSES, LEVELS)
    assert set(metrics._reductions) == {
        "confmat",
        "specialization",
        "unity",
        "cells",
        "labels",
        "oracle",
        "missed",
        "rule_confmat",
    }
    assert all(reduction is dim_zero_sum for reduction in metrics._reductions.values())
    assert SegmentationMetrics(NUM_CLASSES)._reductions == {"confmat": dim_zero_sum}


def assert_same_per_class(left: dict[str, list[float]], right: dict[str, list[float]]) -> None:
    assert left.keys() == right.keys()
    for key in right:
        assert left[key] == pytest.approx(right[key], nan_ok=True), key


def assert_same_results(left: PyramidMetrics, right: PyramidMetrics) -> None:
    assert left.compute() == pytest.approx(right.compute(), nan_ok=True)
    assert_same_per_class(left.per_class(), right.per_class())
    for key, value in right.specialization_report().items():
        assert torch.allclose(left.specialization_report()[key], value, equal_nan=True), key


def test_split_over_two_ranks_gives_the_same_metrics_as_one_process():
    batches = list(random_split(seed=2, batches=4))
    whole = PyramidMetrics(NUM_CLASSES, LEVELS, rules=RULES)
    for batch in batches:
        update(whole, *batch)

    rank0, rank1 = (
        PyramidMetrics(NUM_CLASSES, LEVELS, rules=RULES),
        PyramidMetrics(NUM_CLASSES, LEVELS, rules=RULES),
    )
    for index, batch in enumerate(batches):
        update(rank0 if index % 2 == 0 else rank1, *batch)
    one_rank_alone = segmentation_scores(rank0.confmat[0])["mIoU"]
    assert one_rank_alone != pytest.approx(whole.compute()["mIoU"])
    rank0.merge_state(rank1)
    assert_same_results(rank0, whole)


def test_every_read_out_syncs_through_the_ddp_gather_path():
    batches = list(random_split(seed=3, batches=4))
    whole = PyramidMetrics(NUM_CLASSES, LEVELS, rules=RULES)
    for batch in batches:
        update(whole, *batch)

    other_rank = PyramidMetrics(NUM_CLASSES, LEVELS, rules=RULES)
    partner: dict[int, torch.Tensor] = {}

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        # What torch.distributed's all_gather returns on rank 0: [rank 0's state, rank 1's state].
        return [tensor, partner[id(tensor)]]

    this_rank = PyramidMetrics(
        NUM_CLASSES, LEVELS, rules=RULES, dist_sync_fn=gather, distributed_available_fn=lambda: True
    )
    for index, batch in enumerate(batches):
        update(this_rank if index % 2 == 0 else other_rank, *batch)
    local_confmat = this_rank.confmat.clone()

    def pair_states() -> None:  # the sync reads the current state tensors; map each to its partner
        partner.clear()
        partner.update(
            {id(getattr(this_rank, name)): getattr(other_rank, name) for name in this_rank._reductions}
        )

    pair_states()
    assert this_rank.compute() == pytest.approx(whole.compute(), nan_ok=True)
    pair_states()
    assert_same_per_class(this_rank.per_class(), whole.per_class())
    pair_states()
    assert this_rank.headroom() == pytest.approx(whole.headroom(), nan_ok=True)
    pair_states()
    report = this_rank.specialization_report()
    for key, value in whole.specialization_report().items():
        assert torch.allclose(report[key], value, equal_nan=True), key
    # After each read-out the rank keeps accumulating its own share.
    assert torch.equal(this_rank.confmat, local_confmat)


def logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def test_unity_calibration_of_hand_made_logits():
    # Unity level 1 (5 cells + 1 without a valid pixel): two mix cells at p=0.05, two unity cells at
    # p=0.95 and one at p=1 (the closed last bin). Level 2: four cells at p=0.25, one of them unity.
    level1 = torch.tensor([[[logit(0.05), logit(0.05), logit(0.95), logit(0.95), 50.0, logit(0.95)]]])
    level2 = torch.full((1, 1, 4), logit(0.25))
    targets = [torch.tensor([[[0, 0, 1, 1, 1, IGNORE_INDEX]]]), torch.tensor([[[1, 0, 0, 0]]])]
    metric = UnityCalibration(num_levels=3, num_bins=10)
    metric.update([level1, level2], targets)
    report = metric.compute()

    assert report["edges"].tolist() == pytest.approx([index / 10 for index in range(11)])
    assert report["cells"].tolist() == [[2, 0, 0, 0, 0, 0, 0, 0, 0, 3], [0, 0, 4, 0, 0, 0, 0, 0, 0, 0]]
    assert report["unity_cells"].tolist() == [[0, 0, 0, 0, 0, 0, 0, 0, 0, 3], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert report["mean_predicted"][0, 0] == pytest.approx(0.05)
    assert report["mean_predicted"][0, 9] == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    assert report["observed"][0, [0, 9]].tolist() == [0.0, 1.0]
    assert report["observed"][1, 2] == pytest.approx(0.25)
    assert report["observed"][0, 1:9].isnan().all()  # empty bins have no observed share
    # ECE = sum over bins of (cells in the bin / cells) * |observed - mean predicted|.
    assert report["ece"][0] == pytest.approx((2 * 0.05 + 3 * (1 - 2.9 / 3)) / 5)
    assert report["ece"][1] == pytest.approx(0.0, abs=1e-6)  # a quarter predicted, a quarter observed
    empty = torch.zeros(2, 10, dtype=torch.long)
    assert reliability(empty, empty, empty.double())["ece"].isnan().all()  # no cells: no ECE
    with pytest.raises(ValueError, match=r"eval\.calibration_bins must be >= 1, got 0"):
        UnityCalibration(num_levels=3, num_bins=0)


def update_sweep(sweep: TauSweepMetrics, labels, semantic, unity) -> None:
    for index, tau in enumerate(sweep.taus):
        fused, level_map = fuse(semantic, unity, tau)
        sweep.update(index, to_label_size(fused, labels), labels, level_map)


def test_tau_sweep_equals_the_pyramid_metrics_at_each_tau():
    taus = [0.3, 0.6, 0.9]
    sweep = TauSweepMetrics(NUM_CLASSES, LEVELS, taus)
    plain = {tau: PyramidMetrics(NUM_CLASSES, LEVELS, tau) for tau in taus}
    for batch in random_split(seed=4):
        update_sweep(sweep, *batch)
        for metrics in plain.values():
            update(metrics, *batch)
    rows = sweep.compute()
    assert [row["tau"] for row in rows] == taus
    for index, (tau, metrics) in enumerate(plain.items()):
        assert torch.equal(sweep.confmat[index], metrics.confmat[0])
        assert torch.equal(sweep.cells[index], metrics.cells)
        assert torch.equal(sweep.labels[index], metrics.labels)
        scores = metrics.compute()
        for key in ("mIoU", "pixel_acc", "labels_per_finest_cell", "share_level1", "share_level3"):
            assert rows[index][key] == pytest.approx(scores[key]), (tau, key)
    # A lower tau lets coarse levels take more cells: fewer labels.
    assert rows[0]["labels"] < rows[1]["labels"] < rows[2]["labels"]
    with pytest.raises(ValueError, match=r"eval.tau_sweep must be in the open interval \(0, 1\), got 1.0"):
        TauSweepMetrics(NUM_CLASSES, LEVELS, [0.5, 1.0])


def test_sweep_and_calibration_states_are_sums_that_add_up_over_ranks():
    batches = list(random_split(seed=5, batches=4))

    def metrics():
        return TauSweepMetrics(NUM_CLASSES, LEVELS, [0.4, 0.9]), UnityCalibration(LEVELS, num_bins=5)

    def feed(sweep, calibration, labels, semantic, unity) -> None:
        update_sweep(sweep, labels, semantic, unity)
        calibration.update(unity, build_targets(labels, LEVELS).unity)

    whole, ranks = metrics(), [metrics(), metrics()]
    for index, batch in enumerate(batches):
        feed(*whole, *batch)
        feed(*ranks[index % 2], *batch)
    for merged, other, alone in zip(ranks[0], ranks[1], whole, strict=True):
        assert all(reduction is dim_zero_sum for reduction in merged._reductions.values())
        merged.merge_state(other)
        for name in merged._reductions:
            assert torch.equal(getattr(merged, name), getattr(alone, name)), name


def test_pyramid_metrics_of_a_hand_made_level_map():
    """L=3 on 16 x 16 pixels (4 x 4 finest cells of 4 x 4 pixels): the fused map takes the top half (two
    level-2 cells of 2 x 2 finest cells) from level 2 and the bottom half (8 finest cells) from level 3.
    Ground truth all class 0; the fused output is right, the finest level calls the left half 1."""
    level_map = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]])
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    finest = target.clone()
    finest[..., :8] = 1
    metrics = PyramidMetrics(num_classes=2, num_levels=3)
    metrics.update(target, [target, target, finest], target, [], [], level_map)
    scores = metrics.compute()
    assert scores["mIoU"] == 1.0
    assert scores["mIoU_finest"] == pytest.approx(0.25)  # class 0: 128 / 256, class 1: 0 / 128
    # 8 of 16 finest cells from level 2, 8 from level 3
    assert [scores[f"share_level{level}"] for level in (1, 2, 3)] == [0.0, 0.5, 0.5]
    # labels: 2 level-2 cells + 8 finest cells = 10 for 16 finest cells
    assert scores["labels_per_finest_cell"] == pytest.approx(10 / 16)
