"""`python -m sfseg.bench --training`: where a training run's time goes, measured on the objects
`sfseg.train` builds, and the run projected from its pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfseg.bench.__main__ import main
from sfseg.bench.training import STEP_PARTS, projected_run, training_markdown
from tests.conftest import TINY


def hand_made_result(keeps_scenes: bool) -> dict:
    return {
        "overrides": ["data.batch_size=8"],
        "batch_size": 8,
        "steps": 750,
        "steps_per_epoch": 250,
        "keeps_scenes": keeps_scenes,
        "validations": 4,
        "loader_per_batch_s": {"render": 0.02, "augment": 0.004},
        "step_s": {"targets": 0.001, "forward": 0.1, "loss": 0.01, "backward": 0.2, "optimizer": 0.005},
        "validation_s": 3.0,
        "picture_s": 1.5,
        "startup_s": 6.0,
    }


@pytest.mark.parametrize("keeps_scenes", [True, False])
def test_the_projection_adds_the_pieces_as_the_run_does_them(keeps_scenes: bool) -> None:
    pieces = projected_run(hand_made_result(keeps_scenes))
    assert pieces["step: backward"] == pytest.approx(750 * 0.2)
    assert pieces["step: forward"] == pytest.approx(750 * 0.1)
    # Kept scenes are rendered in the first epoch only; the augmentation runs on every batch.
    assert pieces["loader: render"] == pytest.approx((250 if keeps_scenes else 750) * 0.02)
    assert pieces["loader: augment"] == pytest.approx(750 * 0.004)
    assert pieces["validations"] == pytest.approx(4 * 3.0)
    assert (pieces["picture"], pieces["process start"]) == (1.5, 6.0)
    total = sum(pieces.values())
    markdown = "\n".join(training_markdown([hand_made_result(keeps_scenes)]))
    assert "`python -m sfseg.train data.batch_size=8`" in markdown
    assert f"| **sum** | | **{total:.0f}** | |" in markdown
    assert "| step: backward | 0.200 | 150 |" in markdown


@pytest.mark.slow
def test_a_training_config_is_taken_apart_on_the_real_objects(tmp_path: Path) -> None:
    """The tiny config of the tests: every piece measured, the validations counted from the config."""
    main(["--training", "--training-config", " ".join(TINY), "--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    (measured,) = results["training"]
    assert measured["overrides"] == TINY
    assert set(measured["step_s"]) == set(STEP_PARTS)
    assert all(seconds > 0 for seconds in measured["step_s"].values())
    # 16 training scenes of batch 4 and 2 steps: no validation inside the run, the final one after it.
    assert (measured["steps"], measured["steps_per_epoch"], measured["validations"]) == (2, 4, 1)
    assert measured["keeps_scenes"] and set(measured["loader_per_batch_s"]) == {"render", "augment"}
    assert measured["validation_s"] > 0 and measured["picture_s"] > 0 and measured["startup_s"] > 0
    markdown = (tmp_path / "results.md").read_text()
    for piece in (
        *(f"step: {part}" for part in STEP_PARTS),
        "loader: render",
        "validations",
        "process start",
    ):
        assert f"| {piece} |" in markdown
