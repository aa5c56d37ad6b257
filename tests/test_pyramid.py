"""The pyramid math (Sec. 3, Eq. 1-2, DESIGN 1): unit tests and properties."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from sfseg.pyramid import (
    IGNORE_INDEX,
    build_targets,
    fuse,
    level_counts,
    level_strides,
    pyramid_loss,
    relabel,
    repeat_cells,
    unity_counts,
)

BIG = 12.0  # a logit far beyond any tau threshold


def blocky_labels(coarse: torch.Tensor, block: int) -> torch.Tensor:
    """Upsample a [B, h, w] grid so that every block x block patch shares one label."""
    return repeat_cells(coarse, block)


@st.composite
def label_batches(draw, max_levels: int = 4):
    """Labels built from a coarse grid (so large unity cells exist), then finer noise and ignores."""
    levels = draw(st.integers(1, max_levels))
    coarsest = level_strides(levels)[0]
    batch = draw(st.integers(1, 2))
    cells_h, cells_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_classes = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    labels = repeat_cells(torch.randint(0, num_classes, (batch, cells_h, cells_w), generator=gen), coarsest)
    # Finer structure at stride 4 (the finest cells) and single-pixel speckles, some ignored pixels.
    fine = repeat_cells(torch.randint(0, num_classes, labels[:, ::4, ::4].shape, generator=gen), 4)
    labels = torch.where(torch.rand(labels.shape, generator=gen) < draw(st.floats(0, 0.5)), fine, labels)
    speckle = torch.rand(labels.shape, generator=gen) < draw(st.floats(0, 0.05))
    labels = torch.where(speckle, torch.randint(0, num_classes, labels.shape, generator=gen), labels)
    ignored = torch.rand(labels.shape, generator=gen) < draw(st.sampled_from([0.0, 0.05, 1.0]))
    return labels.masked_fill(ignored, IGNORE_INDEX), levels, num_classes


def perfect_logits(labels: torch.Tensor, levels: int, num_classes: int):
    """Semantic and unity logits that agree with the ground truth wherever it is defined.

    The finest level's logits are at stride 4 and say the label of each unity 4x4 cell.
    """
    targets = build_targets(labels, levels)
    semantic = [one_hot_logits(t, num_classes) for t in targets.semantic[:-1]]
    semantic.append(one_hot_logits(brute_force_cell(labels, 4)[1], num_classes))
    unity = [torch.where(u == 1, BIG, -BIG) for u in targets.unity]
    return targets, semantic, unity


def one_hot_logits(cell_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """BIG for the cell's class, 0 everywhere for cells without one (ignore)."""
    valid = (cell_labels != IGNORE_INDEX).unsqueeze(1)
    return (
        F.one_hot(cell_labels.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
        * BIG
        * valid
    )


def brute_force_cell(labels: torch.Tensor, stride: int):
    """Reference unity/semantic targets from explicit per-cell sets (slow, test only)."""
    batch, height, width = labels.shape
    unity = torch.empty(batch, height // stride, width // stride, dtype=torch.long)
    semantic = torch.empty_like(unity)
    for b in range(batch):
        for i in range(height // stride):
            for j in range(width // stride):
                cell = labels[b, i * stride : (i + 1) * stride, j * stride : (j + 1) * stride]
                values = set(cell[cell != IGNORE_INDEX].tolist())
                unity[b, i, j] = IGNORE_INDEX if not values else int(len(values) == 1)
                semantic[b, i, j] = values.pop() if len(values) == 1 else IGNORE_INDEX
    return unity, semantic


def test_level_strides_follow_design():
    assert level_strides(4) == [32, 16, 8, 4]
    assert level_strides(2) == [8, 4]
    assert level_strides(1) == [4]
    with pytest.raises(ValueError, match=r"model\.levels"):
        level_strides(0)


@settings(max_examples=40, deadline=None)
@given(label_batches())
def test_build_targets_matches_brute_force(case):
    labels, levels, _ = case
    targets = build_targets(labels, levels)
    assert len(targets.semantic) == levels and len(targets.unity) == levels - 1
    assert torch.equal(targets.semantic[-1], labels)
    for level, stride in enumerate(level_strides(levels)[:-1]):
        unity, semantic = brute_force_cell(labels, stride)
        assert torch.equal(targets.unity[level], unity)
        assert torch.equal(targets.semantic[level], semantic)


@settings(max_examples=40, deadline=None)
@given(label_batches())
def test_children_of_unity_cells_are_unity(case):
    labels, levels, _ = case
    targets = build_targets(labels, levels)
    for coarse, fine in zip(targets.unity[:-1], targets.unity[1:], strict=True):
        children = repeat_cells(coarse, 2)
        assert torch.all(fine[children == 1] == 1)
        # ...and they carry the same label.
    for level in range(levels - 2):
        parent = repeat_cells(targets.semantic[level], 2)
        child = targets.semantic[level + 1]
        mask = parent != IGNORE_INDEX
        assert torch.equal(child[mask], parent[mask])


def test_build_targets_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="divisible by the coarsest stride 32"):
        build_targets(torch.zeros(1, 48, 64, dtype=torch.long), 4)


@settings(max_examples=40, deadline=None)
@given(label_batches(), st.integers(0, 2**31 - 1))
def test_relabel_policies_nest(case, seed):
    """naive relabels nothing; true_positive relabels a subset of what oracle relabels."""
    labels, levels, _ = case
    targets = build_targets(labels, levels)
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(u.shape, generator=gen) * 4 for u in targets.unity]
    naive = relabel(targets, logits, "naive")
    oracle = relabel(targets, logits, "oracle")
    true_positive = relabel(targets, logits, "true_positive", tau=0.7)
    for level in range(levels):
        original = targets.semantic[level]
        assert torch.equal(naive.semantic[level], original)
        by_oracle = (oracle.semantic[level] == IGNORE_INDEX) & (original != IGNORE_INDEX)
        by_tp = (true_positive.semantic[level] == IGNORE_INDEX) & (original != IGNORE_INDEX)
        assert torch.all(by_oracle[by_tp])
        # Relabelling only ever removes supervision: kept cells keep their label.
        kept = true_positive.semantic[level] != IGNORE_INDEX
        assert torch.equal(true_positive.semantic[level][kept], original[kept])
    for level in range(levels - 1):
        assert torch.equal(naive.unity[level], targets.unity[level])
        removed_tp = (true_positive.unity[level] == IGNORE_INDEX) & (targets.unity[level] != IGNORE_INDEX)
        removed_oracle = (oracle.unity[level] == IGNORE_INDEX) & (targets.unity[level] != IGNORE_INDEX)
        assert torch.all(removed_oracle[removed_tp])


def test_relabel_marks_descendants_of_true_positives_only():
    # One 32x32 image, L=2 (strides 8, 4): the left half is class 1, the right half mixed.
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, :8] = 1
    labels[:, :, 8:] = torch.arange(8) % 2
    targets = build_targets(labels, 2)
    assert targets.unity[0].tolist() == [[[1, 0], [1, 0]]]
    # Predicted unity: the top-left cell confidently, the bottom-left cell not.
    logits = [torch.tensor([[[BIG, BIG], [-BIG, BIG]]])]
    result = relabel(targets, logits, "true_positive", tau=0.9)
    finest = result.semantic[1][0]
    assert torch.all(finest[:8, :8] == IGNORE_INDEX)  # done by coarser
    assert torch.all(finest[8:, :8] == 1)  # false negative: the finer level must still learn it
    assert torch.equal(finest[:, 8:], labels[0, :, 8:])  # a mix cell is never done by coarser
    oracle = relabel(targets, logits, "oracle")
    assert torch.all(oracle.semantic[1][0][:, :8] == IGNORE_INDEX)


def test_relabel_rejects_unknown_policy():
    targets = build_targets(torch.zeros(1, 16, 16, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"model.relabel.policy='greedy' is not one of naive, oracle"):
        relabel(targets, [torch.zeros(1, 2, 2)], "greedy")


def test_relabel_leaves_input_untouched_and_has_no_gradient():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    targets = build_targets(labels, 3)
    before = [t.clone() for t in targets.semantic]
    logits = [torch.full(u.shape, BIG, requires_grad=True) for u in targets.unity]
    result = relabel(targets, logits, "true_positive")
    assert all(torch.equal(a, b) for a, b in zip(before, targets.semantic, strict=True))
    assert not any(t.requires_grad for t in result.semantic + result.unity)
    assert torch.all(result.semantic[2] == IGNORE_INDEX)  # everything done by level 1


@settings(max_examples=40, deadline=None)
@given(label_batches())
def test_fuse_with_perfect_logits_reproduces_every_cell(case):
    labels, levels, num_classes = case
    targets, semantic, unity = perfect_logits(labels, levels, num_classes)
    fused, level_map = fuse(semantic, unity)
    assert fused.shape == semantic[-1].shape
    assert level_map.shape == fused.shape[:1] + fused.shape[2:]
    assert level_map.min() >= 0 and level_map.max() <= levels - 1
    cell_unity, cell_label = brute_force_cell(labels, 4)
    resolved = cell_unity == 1
    assert torch.equal(fused.argmax(1)[resolved], cell_label[resolved])
    # Parsimony: each finest cell is taken from the coarsest level that is unity.
    for level in range(levels - 1):
        coarse_unity = repeat_cells(targets.unity[level], 2 ** (levels - 1 - level)) == 1
        assert torch.all(level_map[coarse_unity] <= level)


def eq2_reference(semantic: list[torch.Tensor], unity: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Eq. 2 written literally: sum_l 1[Up(U^l) >= tau] * Up(Y^l) * prod_{k<l} 1[Up(U^k) < tau]."""
    finest = semantic[-1].shape[-1]
    up = [repeat_cells(y, finest // y.shape[-1]) for y in semantic]
    accept = [repeat_cells(torch.sigmoid(u) >= tau, finest // u.shape[-1]).unsqueeze(1) for u in unity]
    accept.append(torch.ones_like(accept[0]) if accept else torch.ones_like(up[0][:, :1], dtype=torch.bool))
    fused = torch.zeros_like(up[-1])
    for level, logits in enumerate(up):
        coarser_rejected = torch.ones_like(accept[level])
        for k in range(level):
            coarser_rejected &= ~accept[k]
        fused += (accept[level] & coarser_rejected) * logits
    return fused


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_fuse_equals_eq2_written_literally(levels: int, num_classes: int, seed: int, tau: float):
    gen = torch.Generator().manual_seed(seed)
    finest = 2 ** (levels - 1) * 2
    semantic = [
        torch.randn(
            2, num_classes, finest >> (levels - 1 - level), finest >> (levels - 1 - level), generator=gen
        )
        for level in range(levels)
    ]
    unity = [torch.randn(2, *y.shape[-2:], generator=gen) * 3 for y in semantic[:-1]]
    fused, level_map = fuse(semantic, unity, tau)
    torch.testing.assert_close(fused, eq2_reference(semantic, unity, tau))
    for level, logits in enumerate(semantic):
        taken = (level_map == level).unsqueeze(1).expand_as(fused)
        up = repeat_cells(logits, finest // logits.shape[-1])
        assert torch.equal(fused[taken], up[taken])


def test_fuse_follows_eq2_on_a_hand_example():
    # L=3: level maps 1x1 (stride 16), 2x2 (stride 8), 4x4 (stride 4); 2 classes.
    semantic = [
        torch.tensor([[[[5.0]], [[0.0]]]]),  # level 1 says class 0
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 2, 4, 4),
    ]
    semantic[1][0, 1] = 5.0  # level 2 says class 1 everywhere
    unity = [torch.tensor([[[-BIG]]]), torch.tensor([[[BIG, -BIG], [-BIG, -BIG]]])]
    fused, level_map = fuse(semantic, unity)
    expected_levels = torch.full((1, 4, 4), 2)
    expected_levels[0, :2, :2] = 1
    assert torch.equal(level_map, expected_levels)
    assert torch.equal(fused[0, :, :2, :2], semantic[1][0, :, :1, :1].expand(2, 2, 2))
    # A unity level 1 overrides everything below it.
    fused, level_map = fuse(semantic, [torch.tensor([[[BIG]]]), unity[1]])
    assert torch.all(level_map == 0) and torch.all(fused.argmax(1) == 0)


def test_fuse_threshold_is_tau_on_the_probability():
    semantic = [torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 2, 2)]
    probability = torch.tensor(0.85)
    unity = [torch.logit(probability).reshape(1, 1, 1)]
    assert torch.all(fuse(semantic, unity, tau=0.8)[1] == 0)
    assert torch.all(fuse(semantic, unity, tau=0.9)[1] == 1)


def test_single_level_fuse_is_identity():
    logits = torch.randn(2, 3, 8, 8)
    fused, level_map = fuse([logits], [])
    assert torch.equal(fused, logits) and torch.all(level_map == 0)


@settings(max_examples=30, deadline=None)
@given(label_batches(), st.integers(0, 2**31 - 1))
def test_loss_is_finite_and_matches_reference(case, seed):
    labels, levels, num_classes = case
    gen = torch.Generator().manual_seed(seed)
    targets = build_targets(labels, levels)
    semantic = [
        torch.randn(labels.shape[0], num_classes, *t.shape[-2:], generator=gen) for t in targets.semantic
    ]
    semantic[-1] = torch.randn(
        labels.shape[0], num_classes, labels.shape[1] // 4, labels.shape[2] // 4, generator=gen
    )
    unity = [torch.randn(u.shape, generator=gen) for u in targets.unity]
    loss = pyramid_loss(semantic, unity, targets)
    assert torch.isfinite(loss.total)
    assert len(loss.ce) == levels and len(loss.bce) == levels - 1
    # Reference: torch's mean reductions where a level has targets, 0 where it has none.
    for level, (logits, target) in enumerate(zip(semantic, targets.semantic, strict=True)):
        if level == levels - 1:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        expected = (
            F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            if (target != IGNORE_INDEX).any()
            else torch.tensor(0.0)
        )
        torch.testing.assert_close(loss.ce[level], expected)
    for level, (logits, target) in enumerate(zip(unity, targets.unity, strict=True)):
        valid = target != IGNORE_INDEX
        expected = (
            F.binary_cross_entropy_with_logits(logits[valid], target[valid].float())
            if valid.any()
            else torch.tensor(0.0)
        )
        torch.testing.assert_close(loss.bce[level], expected)
    expected_total = torch.stack(loss.ce).mean() + (torch.stack(loss.bce).mean() if levels > 1 else 0)
    torch.testing.assert_close(loss.total, expected_total)


def test_loss_with_no_valid_target_is_zero_and_backpropagates():
    labels = torch.full((1, 32, 32), IGNORE_INDEX)
    targets = build_targets(labels, 4)
    semantic = [torch.randn(1, 3, *t.shape[-2:], requires_grad=True) for t in targets.semantic[:-1]]
    semantic.append(torch.randn(1, 3, 8, 8, requires_grad=True))
    unity = [torch.randn(u.shape, requires_grad=True) for u in targets.unity]
    loss = pyramid_loss(semantic, unity, targets)
    assert loss.total.item() == 0.0
    loss.total.backward()
    assert all(torch.all(x.grad == 0) for x in semantic + unity)


def test_analysis_counts():
    unity_target = [torch.tensor([[[1, 0], [IGNORE_INDEX, 1]]])]
    logits = [torch.tensor([[[BIG, BIG], [BIG, -BIG]]])]
    assert unity_counts(logits, unity_target).tolist() == [[1, 1, 1]]
    assert level_counts(torch.tensor([[0, 2], [2, 2]]), 4).tolist() == [1, 0, 3, 0]


@settings(max_examples=15, deadline=None)
@given(label_batches(), st.integers(0, 2**31 - 1))
def test_functions_agree_under_bfloat16_autocast(case, seed):
    """Under autocast the logits arrive in bfloat16; decisions and losses must not change."""
    labels, levels, num_classes = case
    gen = torch.Generator().manual_seed(seed)
    targets = build_targets(labels, levels)
    # Logits on a grid that bfloat16 represents exactly, and away from the tau threshold.
    semantic = [
        (torch.randint(-8, 8, (labels.shape[0], num_classes, *t.shape[-2:]), generator=gen) / 4)
        for t in targets.semantic[:-1]
    ]
    semantic.append(
        torch.randint(-8, 8, (labels.shape[0], num_classes, *labels[:, ::4, ::4].shape[-2:]), generator=gen)
        / 4
    )
    unity = [torch.randint(0, 2, u.shape, generator=gen) * 2 * BIG - BIG for u in targets.unity]
    low = [x.bfloat16() for x in semantic], [x.bfloat16() for x in unity]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_low, map_low = fuse(*low)
        relabeled_low = relabel(targets, low[1], "true_positive")
        loss_low = pyramid_loss(*low, relabeled_low)
    fused, level_map = fuse(semantic, unity)
    relabeled = relabel(targets, unity, "true_positive")
    loss = pyramid_loss(semantic, unity, relabeled)
    assert torch.equal(map_low, level_map)
    assert torch.equal(fused_low.float(), fused)
    assert all(torch.equal(a, b) for a, b in zip(relabeled_low.semantic, relabeled.semantic, strict=True))
    assert loss_low.total.dtype == torch.float32
    torch.testing.assert_close(loss_low.total, loss.total, rtol=1e-2, atol=1e-2)
