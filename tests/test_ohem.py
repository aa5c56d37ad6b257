"""OHEM cross-entropy (model/loss=ohem) against HRNet-OCR's OhemCrossEntropy, written out literally."""

from __future__ import annotations

import math
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sfseg.builder import build
from sfseg.module import LossSettings, SpecializeAndFuseModule
from sfseg.pyramid import IGNORE_INDEX, Ohem, build_targets, ohem_keep, pyramid_loss, semantic_ce
from tests.conftest import TINY, compose_config


def hrnet_ocr_ohem(score: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int):
    """HRNet-OCR's OhemCrossEntropy._ohem_forward (lib/core/criterion.py, branch HRNet-OCR), step by
    step, for a score already at the target's size. Returns the kept mask and the loss (the original
    returns the mean of nothing, NaN, when nothing is kept)."""
    pred = F.softmax(score, dim=1)
    pixel_losses = F.cross_entropy(score, target, ignore_index=IGNORE_INDEX, reduction="none").view(-1)
    mask = target.view(-1) != IGNORE_INDEX
    tmp_target = target.clone()
    tmp_target[tmp_target == IGNORE_INDEX] = 0
    pred = pred.gather(1, tmp_target.unsqueeze(1))
    pred, ind = pred.view(-1)[mask].sort()
    min_value = pred[min(max(1, min_kept), pred.numel() - 1)]
    threshold = max(min_value, thresh)
    pixel_losses = pixel_losses[mask][ind]
    pixel_losses = pixel_losses[pred < threshold]
    kept = torch.zeros(target.numel(), dtype=torch.bool)
    kept[mask.nonzero().squeeze(1)[ind[pred < threshold]]] = True
    return kept.view(target.shape), pixel_losses.mean()


def two_class_logits(true_class_probability: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 2, 1, N] logits whose true class (0) has exactly the given softmax probabilities."""
    p = torch.tensor(true_class_probability, dtype=torch.float64)
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)]).view(1, 2, 1, -1)
    return logits, torch.zeros(1, 1, len(true_class_probability), dtype=torch.long)


@pytest.mark.parametrize(
    ("min_kept", "expected"),
    [
        (1, [0.2, 0.5, 0.3]),  # threshold max(0.7, 2nd smallest 0.3) = 0.7: the pixels below 0.7
        (4, [0.2, 0.95, 0.5, 0.3]),  # threshold = 5th smallest (0.99): the 4 hardest
        (10, [0.2, 0.95, 0.5, 0.3]),  # fewer valid pixels than min_kept: all below the largest, as HRNet-OCR
    ],
)
def test_ohem_keeps_the_hard_pixels_on_a_hand_example(min_kept: int, expected: list[float]) -> None:
    probabilities = [0.2, 0.95, 0.5, 0.99, 0.3]
    logits, target = two_class_logits(probabilities)
    p = torch.softmax(logits, dim=1)[:, 0]
    kept = ohem_keep(p, target != IGNORE_INDEX, thresh=0.7, min_kept=min_kept)
    assert [q for q, keep in zip(probabilities, kept.flatten().tolist(), strict=True) if keep] == expected
    loss = semantic_ce(logits, target, ohem=Ohem(thresh=0.7, min_kept=min_kept))
    assert loss.item() == pytest.approx(-sum(math.log(q) for q in expected) / len(expected))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("thresh", "min_kept"), [(0.7, 1), (0.9, 20), (0.3, 50), (1.0, 5), (0.05, 500)])
def test_ohem_matches_hrnet_ocr_literally(seed: int, thresh: float, min_kept: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    score = 3 * torch.randn(2, 5, 6, 7, generator=gen)
    target = torch.randint(0, 5, (2, 6, 7), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.3] = IGNORE_INDEX  # 84 pixels, about 59 valid
    expected_kept, expected_loss = hrnet_ocr_ohem(score, target, thresh, min_kept)
    kept = ohem_keep(
        torch.softmax(score, 1).gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1),
        target != IGNORE_INDEX,
        thresh,
        min_kept,
    )
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(semantic_ce(score, target, ohem=Ohem(thresh, min_kept)), expected_loss)


def test_pyramid_loss_applies_ohem_to_every_semantic_level() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 4, 4), generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[0, :8, :] = IGNORE_INDEX
    targets = build_targets(labels, num_levels=3)  # 16x16 cells: levels of 8, 32 and 2048 elements
    semantic = [torch.randn(2, 3, *t.shape[-2:], generator=gen) for t in targets.semantic[:-1]]
    semantic.append(torch.randn(2, 3, 8, 8, generator=gen))
    unity = [torch.randn(u.shape, generator=gen) for u in targets.unity]
    ohem = Ohem(thresh=0.6, min_kept=100)  # more than the coarse levels' valid cells, fewer than the pixels
    loss = pyramid_loss(semantic, unity, targets, ohem=ohem)
    plain = pyramid_loss(semantic, unity, targets)
    for level, (logits, target) in enumerate(zip(semantic, targets.semantic, strict=True)):
        if level == 2:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        _, expected = hrnet_ocr_ohem(logits, target, ohem.thresh, ohem.min_kept)
        torch.testing.assert_close(loss.ce[level], expected)
    assert loss.ce[2] > plain.ce[2]  # the finest level kept only its hard pixels
    assert loss.bce == plain.bce  # OHEM is a matter of the semantic CE terms only


def test_ohem_level_without_valid_element_adds_exactly_zero() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE_INDEX)
    loss = semantic_ce(logits, target, ohem=Ohem(thresh=0.9, min_kept=5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # One valid pixel that is already certain: HRNet-OCR keeps nothing (its mean would be NaN); 0 here.
    target[0, 0, 0] = 1
    certain = torch.zeros(1, 3, 4, 4)
    certain[0, 1] = 50.0
    assert semantic_ce(certain, target, ohem=Ohem(thresh=0.9, min_kept=5)).item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresh": 0.0}, r"model\.loss\.thresh must be in \(0, 1\], got 0\.0"),
        ({"thresh": 1.5}, r"model\.loss\.thresh must be in \(0, 1\]"),
        ({"thresh": "high"}, r"model\.loss\.thresh must be a number"),
        ({"min_kept": 0}, r"model\.loss\.min_kept must be an integer >= 1, got 0"),
        ({"min_kept": 2.5}, r"model\.loss\.min_kept must be an integer >= 1, got 2\.5"),
    ],
)
def test_bad_ohem_settings_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ohem(**kwargs)


PAPER_EXPERIMENTS = [
    "ade20k_hrnet48",
    "ade20k_resnet101",
    "coco_stuff10k_hrnet48",
    "coco_stuff10k_resnet101",
    "pascal_context59_hrnet48",
    "pascal_context59_resnet101",
    "ablation_hrnet32",
]


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_experiments_train_eq1_ce_and_have_an_ohem_variant(experiment: str, run_dir: Path) -> None:
    plain = OmegaConf.to_container(compose_config([f"experiment={experiment}"], run_dir), resolve=False)
    ohem = OmegaConf.to_container(compose_config([f"experiment={experiment}_ohem"], run_dir), resolve=False)
    unweighted = {"class_weights": None, "level_weights": None}
    assert plain["model"]["loss"] == {"name": "ce", **unweighted}
    assert ohem["model"]["loss"] == {"name": "ohem", "thresh": 0.9, "min_kept": 131072, **unweighted}
    assert ohem["task_name"] == f"{experiment}_ohem"
    for config in (plain, ohem):
        del config["model"]["loss"], config["task_name"], config["hydra"]
    assert ohem == plain  # nothing else changes


def test_ohem_trains_through_the_real_config(run_dir: Path) -> None:
    cfg = compose_config([*TINY, "model/loss=ohem", "model.loss.min_kept=1000"], run_dir)
    datamodule, model, trainer = build(cfg)
    assert model.loss_settings.ohem == Ohem(thresh=0.9, min_kept=1000)
    assert model.hparams.loss == {
        "name": "ohem",
        "thresh": 0.9,
        "min_kept": 1000,
        "class_weights": None,
        "level_weights": None,
    }
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())


def test_checkpoints_without_a_loss_setting_load_with_plain_ce(run_dir: Path, tmp_path: Path) -> None:
    _, model, _ = build(compose_config(TINY, run_dir))
    hyper_parameters = dict(model.hparams)
    del hyper_parameters["loss"]  # as saved before model/loss existed
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hyper_parameters,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    loaded = SpecializeAndFuseModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.loss_settings == LossSettings() and loaded.aux_weight == 0.0
