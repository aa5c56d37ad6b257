"""Weights of Eq. 1's CE terms: by class (model.loss.class_weights: SegNet's median frequency balancing,
counted on the train split, or a list) and by level (model.loss.level_weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfseg.builder import build
from sfseg.data.statistics import SplitStatistics, median_frequency_weights
from sfseg.module import LossSettings, loss_settings
from sfseg.pyramid import build_targets, pyramid_loss, semantic_ce
from tests.conftest import compose_config
from tests.fixtures import make_camvid
from tests.test_eval import fixture_run_overrides


def test_median_frequency_balancing_known_answer():
    # Image A (16 px): class 0 on 4 px, class 1 on 12; image B (16 px): class 1 on 8, class 2 on 8.
    # Frequencies: 0: 4/16 = 0.25, 1: 20/32 = 0.625, 2: 8/16 = 0.5; median 0.5; class 3 never occurs.
    a = torch.tensor([[0] * 4 + [1] * 12]).view(1, 4, 4)
    b = torch.tensor([[1] * 8 + [2] * 8]).view(1, 4, 4)
    stats = SplitStatistics(["a", "b", "c", "d"], num_levels=1)
    for label in (a, b):
        stats.add(label, build_targets(label, 1))
    np.testing.assert_allclose(stats.median_frequency_weights(), [2.0, 0.8, 1.0, 0.0])
    # Ignored pixels count neither as the class's pixels nor as the image's.
    np.testing.assert_allclose(median_frequency_weights([10, 30, 60], [100, 100, 100]), [3.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="at least one labelled pixel"):
        median_frequency_weights([0, 0], [0, 0])


def test_class_weighted_ce_is_torchs_weighted_mean():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=generator)
    target = torch.randint(0, 4, (2, 6, 6), generator=generator)
    target[0, :2] = 255
    weights = [0.5, 2.0, 1.0, 4.0]
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    torch.testing.assert_close(semantic_ce(logits, target, class_weights=weights), expected)
    assert semantic_ce(logits, torch.full_like(target, 255), class_weights=weights).item() == 0.0


def test_level_weights_take_a_weighted_mean_of_the_levels_ce():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 64, 64), generator=generator)
    targets = build_targets(labels, 2)
    semantic = [torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 16, 16, generator=generator)]
    unity = [torch.randn(2, 8, 8, generator=generator)]
    plain = pyramid_loss(semantic, unity, targets)
    same = pyramid_loss(semantic, unity, targets, level_weights=[1.0, 1.0])
    torch.testing.assert_close(same.total, plain.total)  # equal weights: Eq. 1's mean
    weighted = pyramid_loss(semantic, unity, targets, level_weights=[1.0, 3.0])
    expected = (plain.ce[0] + 3 * plain.ce[1]) / 4 + torch.stack(plain.bce).mean()
    torch.testing.assert_close(weighted.total, expected)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"class_weights": "inverse"},
            "model.loss.class_weights='inverse' is not one of null, median_frequency",
        ),
        ({"class_weights": [1.0, 2.0]}, r"model.loss.class_weights must be null or 3 numbers >= 0"),
        ({"class_weights": [1.0, -1.0, 1.0]}, r"model.loss.class_weights must be null or 3 numbers >= 0"),
        (
            {"level_weights": [1, 1]},
            r"model.loss.level_weights must be null or 4 numbers >= 0 \(one per levels",
        ),
        ({"level_weights": [0, 0, 0, 0]}, r"model.loss.level_weights must be null or 4 numbers"),
        ({"class_weights": "median_frequency"}, "is computed from the train split when a run starts"),
        ({"weights": [1, 2, 3]}, r"model.loss has unknown keys \['weights'\]"),
    ],
)
def test_bad_weights_name_the_key(config: dict, message: str):
    with pytest.raises(ValueError, match=message):
        loss_settings({"name": "ce", **config}, num_classes=3, levels=4)


def test_weights_are_kept_as_plain_floats():
    settings = loss_settings({"name": "ce", "class_weights": [1, 2, 0], "level_weights": None}, 3, 1)
    assert settings == LossSettings(class_weights=(1.0, 2.0, 0.0))


@pytest.mark.parametrize(("method", "power"), [("median_frequency", 1.0), ("sqrt_median_frequency", 0.5)])
def test_median_frequency_is_counted_on_the_train_split_and_kept_in_the_run(
    method: str, power: float, tmp_path: Path, run_dir: Path
):
    root = make_camvid(tmp_path / "data")
    overrides = [*fixture_run_overrides("camvid", root), f"model.loss.class_weights={method}"]
    _, model, _ = build(compose_config(overrides, run_dir), run_dir)
    # An independent count over the train labels (void 11 left out).
    pixels, image_pixels = np.zeros(11), np.zeros(11)
    for path in sorted((root / "trainannot").glob("*.png")):
        counts = np.bincount(np.asarray(Image.open(path)).ravel(), minlength=12)[:11]
        pixels += counts
        image_pixels += (counts > 0) * counts.sum()
    present = image_pixels > 0
    frequency = np.where(present, pixels / np.maximum(image_pixels, 1), 0)
    expected = np.where(present, np.median(frequency[present]) / np.where(present, frequency, 1), 0) ** power
    assert present.sum() >= 9  # a real median over the classes
    np.testing.assert_allclose(model.loss_settings.class_weights, expected, rtol=1e-9)
    assert model.hparams.loss["class_weights"] == pytest.approx(expected.tolist())  # in the checkpoint
    record = json.loads((run_dir / "class_weights.json").read_text())
    assert record["method"] == method and record["images"] == 4
    np.testing.assert_allclose(record["weights"], expected)
    assert record["classes"]["sky"]["pixels"] == pixels[0]
    # A resumed run reads the recorded weights instead of counting again.
    record["weights"][0] = 123.0
    (run_dir / "class_weights.json").write_text(json.dumps(record))
    _, resumed, _ = build(compose_config(overrides, run_dir), run_dir)
    assert resumed.loss_settings.class_weights[0] == 123.0


def test_a_list_of_class_weights_reaches_the_module(tmp_path: Path, run_dir: Path):
    weights = [float(c + 1) for c in range(11)]
    overrides = [
        *fixture_run_overrides("camvid", make_camvid(tmp_path / "data")),
        f"model.loss.class_weights={weights}",
    ]
    _, model, _ = build(compose_config(overrides, run_dir), run_dir)
    assert model.loss_settings.class_weights == tuple(weights)
    assert not (run_dir / "class_weights.json").exists()  # nothing counted
