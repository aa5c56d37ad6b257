"""The fuse rules (model/fuse=hard|soft|learned) and the fuse's headroom (docs/fuse.md): the rules' math
on hand-made pyramids and against their formulas written literally, the learned gate leaving the pyramids
untouched, the headroom counts with known answers, sparse inference falling back to dense, and old
checkpoints loading as Eq. 2."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import types
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings

from sfseg.analysis import missed_counts, oracle_prediction
from sfseg.inference import Predictor, image_logits, load
from sfseg.metrics import PyramidMetrics
from sfseg.models import FuseGate, PyramidSegmenter
from sfseg.models.segmenter import fuse_config
from sfseg.module import SpecializeAndFuseModule, training_loss
from sfseg.pyramid import (
    IGNORE_INDEX,
    FuseRule,
    build_targets,
    fuse,
    fuse_features,
    level_strides,
    mixed_cells,
    pyramid_loss,
    relabel,
    repeat_cells,
    soft_level_log_weights,
    upsample_levels,
)
from sfseg.sweeps import fuse_goals, write_fuse_report
from tests.test_pyramid import BIG, brute_force_cell, label_batches

MODEL = {
    "num_classes": 3,
    "backbone": {"name": "local"},
    "context": {"name": "none"},
    "relabel": {"policy": "true_positive"},
    "unity_channels": 8,
    "semantic_channels": 8,
}


def random_pyramid(levels: int, classes: int, seed: int, batch: int = 2, finest: int = 8):
    """Semantic logits [B, C, h_l, w_l] and unity logits [B, h_l, w_l], coarse to fine."""
    gen = torch.Generator().manual_seed(seed)
    sides = [finest >> (levels - 1 - level) for level in range(levels)]
    semantic = [torch.randn(batch, classes, side, side, generator=gen) * 2 for side in sides]
    unity = [torch.randn(batch, side, side, generator=gen) * 3 for side in sides[:-1]]
    return semantic, unity


def up(x: torch.Tensor, finest: int) -> torch.Tensor:
    return repeat_cells(x, finest // x.shape[-1])


# --- the rules ---------------------------------------------------------------------------------------------


def test_soft_fuse_mixes_the_levels_probabilities_on_a_hand_example():
    # L=2, 2 classes: level 1 (one cell) says [0.8, 0.2], level 2 (2x2 cells) says [0.1, 0.9]; u = 0.75.
    semantic = [
        torch.tensor([0.8, 0.2]).log().view(1, 2, 1, 1),
        torch.tensor([0.1, 0.9]).log().view(1, 2, 1, 1).expand(1, 2, 2, 2),
    ]
    unity = [torch.logit(torch.tensor(0.75)).view(1, 1, 1)]
    fused, level_map = fuse(semantic, unity, rule="soft")
    # 0.75 * [0.8, 0.2] + 0.25 * [0.1, 0.9] = [0.625, 0.375] in every finest cell.
    torch.testing.assert_close(fused.exp(), torch.tensor([0.625, 0.375]).view(1, 2, 1, 1).expand(1, 2, 2, 2))
    assert fused.dtype == torch.float32 and torch.all(level_map == 0)  # level 1 weighs 0.75
    # With u = 0.25 the finest level weighs most: [0.275, 0.725], level map 1.
    fused, level_map = fuse(semantic, [torch.logit(torch.tensor(0.25)).view(1, 1, 1)], rule="soft")
    torch.testing.assert_close(fused.exp()[0, :, 0, 0], torch.tensor([0.275, 0.725]))
    assert torch.all(level_map == 1)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_soft_fuse_equals_its_formula_written_literally(levels: int, classes: int, seed: int):
    """w_l = u_l prod_{k<l} (1 - u_k), w_L = prod_{k<L} (1 - u_k); fused = log sum_l w_l Up(softmax Y_l)."""
    semantic, unity = random_pyramid(levels, classes, seed)
    finest = semantic[-1].shape[-1]
    probabilities = [up(torch.sigmoid(logits), finest) for logits in unity]
    weights, rest = [], torch.ones_like(probabilities[0])
    for u in probabilities:
        weights.append(u * rest)
        rest = rest * (1 - u)
    weights.append(rest)
    expected = sum(w.unsqueeze(1) * up(y.softmax(1), finest) for w, y in zip(weights, semantic, strict=True))
    log_weights = soft_level_log_weights(unity, levels)
    torch.testing.assert_close(log_weights.exp(), torch.stack(weights, 1))
    torch.testing.assert_close(log_weights.exp().sum(1), torch.ones_like(rest))
    fused, level_map = fuse(semantic, unity, rule="soft")
    torch.testing.assert_close(fused.exp(), expected)
    assert torch.equal(level_map, torch.stack(weights, 1).argmax(1))


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_soft_fuse_with_certain_unity_takes_the_cells_eq2_takes(levels: int, seed: int):
    semantic, unity = random_pyramid(levels, 3, seed)
    certain = [torch.where(logits > 0, BIG, -BIG) for logits in unity]
    hard, hard_levels = fuse(semantic, certain, tau=0.9)
    soft, soft_levels = fuse(semantic, certain, rule="soft")
    assert torch.equal(soft_levels, hard_levels)
    torch.testing.assert_close(soft.exp(), hard.softmax(1), atol=1e-4, rtol=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**31 - 1), st.sampled_from(["hard", "soft"]))
def test_bilinear_up_interpolates_each_levels_logits_as_level_l_alone_is_upsampled(levels, seed, name):
    semantic, unity = random_pyramid(levels, 3, seed, finest=16)
    size = semantic[-1].shape[-2:]
    upsampled = [F.interpolate(y, size=size, mode="bilinear", align_corners=False) for y in semantic]
    _, level_map = fuse(semantic, unity, rule=name)
    fused, bilinear_map = fuse(semantic, unity, rule=FuseRule(name, "bilinear"))
    assert torch.equal(bilinear_map, level_map)  # the weights (hard: the levels) do not depend on Up()
    if name == "hard":  # Eq. 2's choice of level, that level's interpolated logits
        for level, logits in enumerate(upsampled):
            taken = (level_map == level).unsqueeze(1).expand_as(fused)
            assert torch.equal(fused[taken], logits[taken])
    else:
        weights = soft_level_log_weights(unity, levels).exp()
        expected = sum(
            w.unsqueeze(1) * y.softmax(1) for w, y in zip(weights.unbind(1), upsampled, strict=True)
        )
        torch.testing.assert_close(fused.exp(), expected)


def test_fuse_rules_name_their_up_and_say_what_they_allow():
    assert [rule.label for rule in (FuseRule("hard"), FuseRule("soft"), FuseRule("learned"))] == [
        "hard",
        "soft",
        "learned",
    ]
    assert FuseRule("learned").upsample == "bilinear" and FuseRule("hard").upsample == "nearest"
    assert (
        FuseRule("hard", "bilinear").label == "hard_bilinear"
        and FuseRule("learned", "nearest").label == "learned_nearest"
    )
    assert [rule.sparse for rule in (FuseRule("hard"), FuseRule("hard", "bilinear"), FuseRule("soft"))] == [
        True,
        False,
        False,
    ]
    assert FuseRule("hard", "bilinear").reads_tau and not FuseRule("soft").reads_tau
    with pytest.raises(ValueError, match=r"model\.fuse\.upsample='area' is not one of nearest, bilinear"):
        FuseRule("soft", "area")


def test_learned_fuse_follows_the_gate_and_needs_it():
    semantic, unity = random_pyramid(3, 4, seed=0)
    finest = semantic[-1].shape[-1]
    chosen = torch.randint(0, 3, (2, finest, finest), generator=torch.Generator().manual_seed(1))
    gate = torch.nn.functional.one_hot(chosen, 3).permute(0, 3, 1, 2).float() * 40  # certain gate
    fused, level_map = fuse(semantic, unity, rule=FuseRule("learned", "nearest"), gate_logits=gate)
    assert torch.equal(level_map, chosen)
    expected = torch.stack([up(y.log_softmax(1), finest) for y in semantic], 1)  # [B, L, C, h, w]
    expected = expected.gather(1, chosen[:, None, None].expand(-1, 1, 4, -1, -1))[:, 0]
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="learned fuse needs the fuse gate's level logits"):
        fuse(semantic, unity, rule="learned")
    with pytest.raises(ValueError, match=r"model\.fuse\.name='vote' is not one of hard, soft, learned"):
        fuse(semantic, unity, rule="vote")


@pytest.mark.parametrize("rule", ["hard", "soft", "learned"])
def test_every_rule_takes_the_only_level_of_a_single_output(rule: str):
    logits = torch.randn(2, 3, 4, 4)
    fused, level_map = fuse([logits], [], rule=rule, gate_logits=torch.zeros(2, 1, 4, 4))
    assert torch.equal(fused, logits) and torch.all(level_map == 0)


@pytest.mark.parametrize("rule", ["soft", "learned"])
def test_mixing_rules_under_bfloat16_autocast_give_float32_and_the_same_decisions(rule: str):
    semantic, unity = random_pyramid(4, 5, seed=3, finest=16)
    gate = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    fused, level_map = fuse(semantic, unity, rule=rule, gate_logits=gate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_map = fuse(
            [y.bfloat16() for y in semantic],
            [u.bfloat16() for u in unity],
            rule=rule,
            gate_logits=gate.bfloat16(),
        )
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, fused, atol=0.05, rtol=0)
    assert (low_map == level_map).float().mean() > 0.95  # bfloat16 inputs round near-equal weights


def test_fuse_features_are_bounded_and_say_what_they_mean():
    # L=2, 2 classes. Level 1 certain of class 0; the finest level certain of class 0 on the left
    # column of cells, undecided on the right; unity of level 1 = 0.5.
    semantic = [torch.tensor([40.0, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 2, 2)]
    semantic[1][0, 0, :, 0] = 40.0
    probabilities = [logits.softmax(1) for logits in upsample_levels(semantic, "nearest")]
    features = fuse_features(probabilities, [torch.zeros(1, 1, 1)])
    assert features.shape == (1, 6, 2, 2) and features.min() >= 0 and features.max() <= 1
    top, entropy, agreement, unity = features[0, :2], features[0, 2:4], features[0, 4], features[0, 5]
    assert torch.allclose(top[0], torch.ones(2, 2)) and torch.allclose(top[1, :, 1], torch.full((2,), 0.5))
    assert torch.allclose(entropy[1, :, 1], torch.ones(2)) and torch.allclose(
        entropy[1, :, 0], torch.zeros(2), atol=1e-6
    )
    assert torch.allclose(agreement[:, 0], torch.ones(2)) and torch.allclose(
        agreement[:, 1], torch.full((2,), 0.5)
    )
    assert torch.allclose(unity, torch.full((2, 2), 0.5))


# --- the learned gate --------------------------------------------------------------------------------------


def test_an_untrained_gate_is_the_soft_fuse():
    semantic, unity = random_pyramid(4, 3, seed=5, finest=16)
    for upsample in ("nearest", "bilinear"):
        rule = FuseRule("learned", upsample)
        gate = FuseGate(4, upsample=upsample)
        fused, _ = fuse(semantic, unity, rule=rule, gate_logits=gate(semantic, unity))
        torch.testing.assert_close(fused, fuse(semantic, unity, rule=FuseRule("soft", upsample))[0])


def test_the_fuse_loss_trains_the_gate_and_leaves_the_pyramids_as_eq1_trains_them():
    torch.manual_seed(0)
    module = SpecializeAndFuseModule(**MODEL, fuse={"name": "learned", "hidden_channels": 4, "lr_mult": 100})
    labels = repeat_cells(torch.randint(0, 3, (2, 2, 2)), 32)
    out = module.net(torch.randn(2, 3, 64, 64))
    targets = build_targets(labels, 4)
    total, terms = training_loss(out, targets, "true_positive", 0.9)
    assert set(terms) >= {"train/fuse_ce", "train/ce_level4", "train/bce_level3"}
    eq1 = pyramid_loss(out.semantic, out.unity, relabel(targets, out.unity, "true_positive", 0.9)).total
    torch.testing.assert_close(total, eq1 + terms["train/fuse_ce"])  # logged apart, added to Eq. 1
    terms["train/fuse_ce"].backward(retain_graph=True)
    gate = {name for name, _ in module.net.fuse_gate.named_parameters(prefix="fuse_gate")}
    for name, parameter in module.net.named_parameters():
        if name in gate:
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name  # no gradient from the fuse loss reaches the pyramids
    assert module.net.fuse_gate.mlp[-1].weight.grad.abs().sum() > 0  # (the hidden layer's follow once it is)
    # The gate learns at model.fuse.lr_mult times the heads' lr, in a parameter group of its own.
    module.trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [group["lr"] for group in groups] == [0.01, 0.01, 0.01 * 100]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in module.net.fuse_gate.parameters()}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"name": "vote"}, "model.fuse.name='vote' is not one of hard, soft, learned"),
        (
            {"name": "soft", "hidden_channels": 8},
            "model.fuse has unknown keys ['hidden_channels'] for model.fuse.name=soft",
        ),
        ({"name": "learned", "width": 8}, "model.fuse has unknown keys ['width']"),
    ],
)
def test_bad_fuse_configs_name_the_key(config: dict, fragment: str):
    with pytest.raises(ValueError) as error:
        fuse_config(config)
    assert fragment in str(error.value)


def test_the_gate_needs_levels_to_choose_from():
    with pytest.raises(ValueError, match=r"model/fuse=learned needs model.levels >= 2"):
        PyramidSegmenter("local", 3, 1, "none", 8, 8, fuse="learned")
    with pytest.raises(ValueError, match=r"model\.fuse\.hidden_channels must be >= 1, got 0"):
        FuseGate(4, 0)


def test_a_checkpoint_from_before_the_rule_was_a_setting_loads_as_eq2(tmp_path: Path):
    module = SpecializeAndFuseModule(**MODEL)
    hparams = dict(module.hparams)
    del hparams["fuse"]  # what a checkpoint of an earlier version holds
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    predictor = load(path, device="cpu")
    assert predictor.fuse_rule == FuseRule("hard", "nearest") and predictor.sparse_inference
    assert predictor.net.fuse_gate is None
    assert fuse_config(None) == {"name": "hard"}


# --- sparse inference ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [FuseRule("soft"), FuseRule("learned"), FuseRule("hard", "bilinear")])
def test_sparse_inference_falls_back_to_dense_for_rules_that_read_every_level(rule: FuseRule):
    torch.manual_seed(0)
    net = PyramidSegmenter("local", 3, 4, "none", 8, 8, fuse=rule).eval()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        predictor = Predictor(net=net, class_names=["a", "b", "c"], tau=0.9)
    assert f"note: the {rule.label} fuse reads every level at every cell" in printed.getvalue()
    assert predictor.sparse_inference is False
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        dense = image_logits(net, images, 0.9, sparse=False)
        asked_sparse = image_logits(net, images, 0.9, sparse=True)
        out = net(images)
        _, level_map = fuse(out.semantic, out.unity, rule=rule, gate_logits=out.gate_logits)
    assert torch.equal(dense[0], asked_sparse[0]) and torch.equal(dense[1], asked_sparse[1])
    assert torch.equal(dense[1], level_map)  # the net's own rule
    with pytest.raises(
        ValueError, match=f"the {rule.label} fuse reads every level at every cell: use the dense forward"
    ):
        net.sparse_forward(images, 0.9)


# --- the headroom ------------------------------------------------------------------------------------------

# L=2 (strides 8, 4) on one 16x16 image: columns 0-7 class 0, 8-11 class 1, 12-15 class 0. The level-1
# cells on the left (columns 0-7) hold one class, those on the right (8-15) two.
TARGET = torch.zeros(1, 16, 16, dtype=torch.long)
TARGET[0, :, 8:12] = 1
LEVEL1 = torch.zeros_like(TARGET)  # all class 0: wrong on columns 8-11
FINEST = torch.zeros_like(TARGET)
FINEST[0, :, 8:] = 1  # right on 0-11, wrong on 12-15
FUSED = FINEST.clone()  # the fuse took the finest level on the right: wrong on 12-15, where level 1 is right


def test_oracle_is_right_wherever_a_level_is():
    target = TARGET.clone()
    target[0, 0, 0] = IGNORE_INDEX
    wrong_everywhere = torch.full_like(TARGET, 2)
    oracle = oracle_prediction(wrong_everywhere, [LEVEL1, FINEST], target)
    assert torch.equal(oracle[target != IGNORE_INDEX], target[target != IGNORE_INDEX])
    neither = torch.ones_like(TARGET)  # no level right where the truth is 0: the fused prediction stays
    oracle = oracle_prediction(wrong_everywhere, [neither, neither], TARGET)
    assert torch.equal(oracle, torch.where(TARGET == 1, 1, 2))


def test_missed_counts_split_by_the_level1_cells_purity():
    counts = missed_counts(FUSED, [LEVEL1, FINEST], TARGET, cell_stride=8)
    # rows pure / mixed; columns valid pixels, fused wrong, fused wrong while a level is right
    assert counts.tolist() == [[128, 0, 0], [128, 64, 64]]
    target = TARGET.clone()
    target[0, :, 12:] = IGNORE_INDEX  # ignored pixels count nowhere: the right cells now hold class 1 only
    assert missed_counts(FUSED, [LEVEL1, FINEST], target, 8).tolist() == [[192, 0, 0], [0, 0, 0]]
    # A label size that is not a multiple of the cell: the last cells are partial.
    cropped = missed_counts(FUSED[..., :14], [LEVEL1[..., :14], FINEST[..., :14]], TARGET[..., :14], 8)
    assert cropped.tolist() == [[128, 0, 0], [96, 32, 32]]


@settings(max_examples=30, deadline=None)
@given(label_batches())
def test_mixed_cells_are_the_mix_cells_of_the_unity_pyramid(case):
    labels, levels, _ = case
    for stride in level_strides(levels):
        unity, _ = brute_force_cell(labels, stride)
        assert torch.equal(mixed_cells(labels, stride), unity == 0)


def test_pyramid_metrics_report_the_headroom_with_known_answers():
    metrics = PyramidMetrics(num_classes=3, num_levels=2, rules=("hard", "soft"))
    soft = torch.zeros_like(TARGET)  # a rule that predicts class 0 everywhere
    metrics.update(
        fused_pred=FUSED,
        level_preds=[LEVEL1, FINEST],
        target=TARGET,
        unity_logits=[torch.full((1, 2, 2), -BIG)],
        unity_targets=build_targets(TARGET, 2).unity,
        level_map=torch.ones(1, 4, 4, dtype=torch.long),
        rule_preds=[FUSED, soft],
    )
    scores = metrics.compute()
    # Level 1: IoU class 0 = 192/256, class 1 = 0 -> 0.375. Finest (= fused): class 0 128/192, class 1 64/128.
    assert scores["mIoU_level1"] == pytest.approx(0.375)
    assert scores["mIoU"] == scores["mIoU_level2"] == pytest.approx((128 / 192 + 0.5) / 2)
    assert scores["best_level"] == 2 and scores["mIoU_best_level"] == scores["mIoU_level2"]
    assert scores["mIoU_oracle"] == 1.0
    assert scores["missed_share"] == scores["missed_share_mixed"] == 0.25 and scores["missed_share_pure"] == 0
    assert scores["mixed_pixel_share"] == 0.5
    assert scores["mIoU_fuse_hard"] == scores["mIoU"] and scores["mIoU_fuse_soft"] == pytest.approx(0.375)
    per_class = metrics.per_class()
    assert per_class["iou_oracle"][:2] == [1.0, 1.0] and math.isnan(per_class["iou_oracle"][2])
    assert per_class["iou_level1"][:2] == [0.75, 0.0]
    assert metrics.headroom() == {key: scores[key] for key in metrics.headroom()}
    with pytest.raises(ValueError, match=r"one prediction per rule \['hard', 'soft'\], got 1"):
        metrics.update(
            FUSED, [LEVEL1, FINEST], TARGET, [], [], torch.ones(1, 4, 4, dtype=torch.long), [FUSED]
        )


# --- the report --------------------------------------------------------------------------------------------


def fake_job(folder: Path, seed: int, metrics: dict[str, float], counts: PyramidMetrics) -> None:
    """A finished L=2 job of the learned fuse: resolved config, metrics.json and val_counts.pt."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "model": {"levels": 2, "fuse": {"name": "learned"}}, "data": {"_target_": "x"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    per_class = dict(zip(["a", "b", "c"], counts.per_class()["iou"], strict=True))
    (folder / "metrics.json").write_text(json.dumps({**metrics, "per_class_iou": per_class}))
    torch.save({name: state for name, state in counts.metric_state.items()}, folder / "val_counts.pt")


def test_fuse_report_compares_each_rule_with_level1_and_hard_over_seeds(tmp_path: Path):
    counts = PyramidMetrics(num_classes=3, num_levels=2, rules=("hard", "soft", "learned"))
    counts.update(
        FUSED,
        [LEVEL1, FINEST],
        TARGET,
        [],
        [],
        torch.ones(1, 4, 4, dtype=torch.long),
        [FINEST, LEVEL1, TARGET],
    )
    base = counts.compute()
    # Seed 1 shifts the rules' scores; everything else as measured by the counts above.
    for seed, shift in ((0, 0.0), (1, 0.02)):
        scores = {key: value for key, value in base.items() if isinstance(value, int | float)}
        scores.update({"mIoU_fuse_learned": 0.9 + shift, "mIoU_fuse_soft": 0.4 + shift, "mIoU": 0.9 + shift})
        fake_job(tmp_path / f"{seed}_job", seed, scores, counts)
    _, csv_path, markdown = write_fuse_report(tmp_path, {"pair": ["a", "b"]})
    assert "### The fuse's headroom, all classes: mIoU (%) on the same pyramids" in markdown
    assert (
        "| L | fuse | seeds | fused | hard | soft | learned | level 1 alone | best single level | oracle |"
        in markdown
    )
    hard, level1, oracle = (100 * base[key] for key in ("mIoU_fuse_hard", "mIoU_level1", "mIoU_oracle"))
    assert (
        f"| 2 | learned | 2 | 91.00 ± 1.41 | {hard:.2f} ± 0.00 | 41.00 ± 1.41 | 91.00 ± 1.41 | {level1:.2f} ± 0.00 |"
        in markdown
    )
    assert f"{oracle:.2f} ± 0.00 | 25.00 ± 0.00 | 0.00 ± 0.00 |" in markdown  # oracle, missed mixed / pure
    # Over the focus classes, from the counts: the learned rule predicted the truth (IoU 1 on a and b).
    assert "### The fuse's headroom, pair classes" in markdown
    pair_table = markdown.split("### The fuse's headroom, pair classes")[1].split("Mean ±")[0]
    (pair_row,) = [line for line in pair_table.splitlines() if line.startswith("| 2 | learned")]
    cells = [cell.strip() for cell in pair_row.strip("|").split("|")]
    assert cells[6] == "100.00 ± 0.00" and cells[7] == "37.50 ± 0.00"  # learned; level 1 on a, b: 0.75, 0
    # Best single level: each job's best (level 2, the finest), scored on a, b: 128/192 and 64/128.
    assert cells[8] == "58.33 ± 0.00"
    assert "(per job: L=2 learned: 2,2)" in markdown  # each job's best single level
    goals = markdown.split("### Each rule against level 1 alone and against hard")[1]
    assert (
        f"- learned - level 1 alone: {91 - level1:+.2f} mIoU" in goals
        and "**learned beats level 1 alone**" in goals
    )
    assert "**soft loses to hard**" in goals and "**hard beats level 1 alone**" in goals
    assert "larger seed spread 1.41, 2 job(s)" in goals
    with csv_path.open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert (
        row["model.fuse.name"] == "learned"
        and row["seeds"] == "2"
        and float(row["mIoU_oracle_mean"]) == pytest.approx(oracle)
    )


def test_fuse_goals_call_a_difference_within_the_seed_spread_a_match():
    """Two L=4 jobs, scores in %: soft - level 1 = 70.85 - 71.00 = -0.15, inside the larger spread
    (level 1's: |70 - 72| / sqrt(2) = 1.41): a match; learned - level 1 = +10.00 beats it, hard - level 1 =
    -8.00 loses to it. An L=1 job is no pyramid and is left out."""
    jobs = [(0.70, 0.60, 0.705, 0.80), (0.72, 0.64, 0.712, 0.82)]
    runs = [
        {
            "config": {"model": {"levels": 4}},
            "metrics": {
                "mIoU_level1": level1,
                "mIoU_fuse_hard": hard,
                "mIoU_fuse_soft": soft,
                "mIoU_fuse_learned": learned,
            },
        }
        for level1, hard, soft, learned in jobs
    ]
    runs.append({"config": {"model": {"levels": 1}}, "metrics": {"mIoU_level1": 0.1}})
    lines = fuse_goals(runs)
    (soft,) = [line for line in lines if line.startswith("- soft - level 1 alone:")]
    assert soft.startswith(
        "- soft - level 1 alone: -0.15 mIoU (per job: +0.50, -0.80; larger seed spread 1.41, 2 job(s))"
    )
    assert soft.endswith("**soft matches level 1 alone**")
    assert any(line.endswith("**learned beats level 1 alone**") for line in lines)
    assert any(line.endswith("**hard loses to level 1 alone**") for line in lines)
