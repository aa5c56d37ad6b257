"""Benchmark submissions in one command, scored by the official evaluators. On the Cityscapes and ADE20K
fixtures (tests/fixtures.py: the releases' layouts), `sfseg.predict write=[mask] ids=raw` (the commands of
docs/evaluation.md, "Submitting to a benchmark server") writes what each benchmark reads, and its
official evaluator scores those masks as `sfseg.eval` scores the same checkpoint, to 1e-6:

- Cityscapes: cityscapesScripts' pixel-level evaluator (`evalPixelLevelSemanticLabeling`), which finds
  each prediction by `<city>_<seq>_<frame>` and reads labelIds, ignores the void labels, and averages IoU
  over the 19 classes whose IoU is defined (not NaN): sfseg's definition too, so mIoU and per-class IoU
  are compared as they are.
- ADE20K: the CSAIL scene-parsing toolkit's `intersectionAndUnion` and `accuracy` (the mit-semseg package,
  called as the toolkit's eval.py calls them: 0-based ids, "other" as -1). Per-class IoU and pixel accuracy
  have one definition; the mean differs by definition: the toolkit averages all 150 classes, counting a
  class absent from both prediction and ground truth as IoU 0, sfseg averages the classes present in
  either. sfseg's mIoU is compared with the toolkit's IoU averaged over those classes, and the toolkit's
  own mean is checked to be that sum over 150.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cityscapes_evaluator
from hydra.core.global_hydra import GlobalHydra
from mit_semseg.utils import accuracy, intersectionAndUnion
from PIL import Image

from sfseg.data.classes import ADE20K_CLASSES, CITYSCAPES_CLASSES
from sfseg.data.datasets import CITYSCAPES_LABEL_IDS
from sfseg.eval import run as evaluate
from sfseg.predict import run as predict
from sfseg.train import train
from tests.conftest import compose_config
from tests.fixtures import build
from tests.test_eval import fixture_run_overrides

pytestmark = pytest.mark.slow

ADE20K_CLASS_COUNT = 150


def train_on_fixture(dataset: str, base: Path) -> Path:
    """A tiny training run (in process) on the fixture tree of `dataset`; returns its checkpoint."""
    run_dir = base / "run"
    train(compose_config(fixture_run_overrides(dataset, build(dataset, base / "data")), run_dir))
    GlobalHydra.instance().clear()
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def cityscapes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_on_fixture("cityscapes", tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="module")
def ade20k_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_on_fixture("ade20k", tmp_path_factory.mktemp("ade20k"))


def data_root(checkpoint: Path) -> Path:
    return checkpoint.parents[2] / "data"


def submit(checkpoint: Path, images: Path, output: Path) -> None:
    """`python -m sfseg.predict ckpt_path=... input=<split> output=... write=[mask] ids=raw`, in process."""
    overrides = [f"ckpt_path={checkpoint}", f"input={images}", f"output={output}", "write=[mask]", "ids=raw"]
    assert predict(compose_config([*overrides, "device=cpu"], output, "predict")) == 0


def sfseg_scores(checkpoint: Path, out: Path) -> dict:
    """`python -m sfseg.eval ckpt_path=...` (the checkpoint's own validation split), in process."""
    return evaluate(compose_config([f"ckpt_path={checkpoint}", "eval.device=cpu"], out, "eval"))


def cityscapes_scores(root: Path, predictions: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """cityscapesScripts' evaluation of `predictions` against gtFine/val, each prediction found by its
    own matching (`getPrediction`: one `<city>_<seq>_<frame>*.png` anywhere under the folder)."""
    args = cityscapes_evaluator.args
    settings = {
        "predictionPath": str(predictions),
        "predictionWalk": None,
        "JSONOutput": False,
        "quiet": True,
    }
    for key, value in settings.items():
        monkeypatch.setattr(args, key, value)
    # cityscapesScripts 2.3.0 calls np.in1d, which NumPy 2.4 removed; np.isin is its replacement.
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    ground_truth = sorted(str(path) for path in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    found = [cityscapes_evaluator.getPrediction(args, path) for path in ground_truth]
    return cityscapes_evaluator.evaluateImgLists(found, ground_truth, args)


def test_cityscapes_submission_scores_with_cityscapesscripts_as_with_sfseg_eval(
    cityscapes_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    root = data_root(cityscapes_checkpoint) / "cityscapes"
    submission = tmp_path / "submission"
    submit(cityscapes_checkpoint, root / "leftImg8bit" / "val", submission)
    # The city folders mirrored, one labelIds PNG per image, named like it.
    images = sorted(
        path.relative_to(root / "leftImg8bit" / "val") for path in root.glob("leftImg8bit/val/*/*")
    )
    assert sorted(path.relative_to(submission) for path in submission.rglob("*.png")) == images
    assert len(images) == 2
    for path in submission.rglob("*.png"):
        assert set(np.unique(np.asarray(Image.open(path)))) <= set(CITYSCAPES_LABEL_IDS)

    official = cityscapes_scores(root, submission, monkeypatch)
    ours = sfseg_scores(cityscapes_checkpoint, tmp_path / "eval")
    for name in CITYSCAPES_CLASSES:  # NaN: no pixel of the class in the ground truth or the prediction
        official_iou, our_iou = official["classScores"][name], ours["per_class_iou"][name]
        assert (math.isnan(official_iou) and math.isnan(our_iou)) or official_iou == pytest.approx(
            our_iou, abs=1e-6
        ), name
    assert official["averageScoreClasses"] == pytest.approx(ours["mIoU"], abs=1e-6)
    assert sum(not math.isnan(iou) for iou in ours["per_class_iou"].values()) > 3  # not a trivial match


def csail_scores(annotations: Path, predictions: Path) -> tuple[np.ndarray, float]:
    """Per-class IoU (over the whole split) and pixel accuracy as the CSAIL toolkit's eval.py computes
    them from the submission's masks (named like the images) and the raw annotations."""
    intersection = union = np.zeros(ADE20K_CLASS_COUNT)
    correct = valid = 0
    for label_path in sorted(annotations.glob("*.png")):
        # eval.py's inputs: predicted class 0..149 and label 0..149 with -1 for "other" (raw id - 1).
        prediction = np.asarray(Image.open(predictions / label_path.name), dtype=np.int64) - 1
        label = np.asarray(Image.open(label_path), dtype=np.int64) - 1
        image_accuracy, pixels = accuracy(prediction, label)
        image_intersection, image_union = intersectionAndUnion(prediction, label, ADE20K_CLASS_COUNT)
        intersection, union = intersection + image_intersection, union + image_union
        correct, valid = correct + image_accuracy * pixels, valid + pixels
    return intersection / (union + 1e-10), correct / valid  # eval.py's iou and acc_meter.average()


def test_ade20k_submission_scores_with_the_csail_toolkit_as_with_sfseg_eval(
    ade20k_checkpoint: Path, tmp_path: Path
):
    root = data_root(ade20k_checkpoint) / "ADEChallengeData2016"
    submission = tmp_path / "submission"
    submit(ade20k_checkpoint, root / "images" / "validation", submission)
    annotations = root / "annotations" / "validation"
    # One PNG per image, named like it (ADE_val_<n>.png), holding ADE20K's ids 1..150.
    assert sorted(path.name for path in submission.iterdir()) == sorted(p.name for p in annotations.iterdir())
    for path in submission.iterdir():
        ids = np.asarray(Image.open(path))
        assert ids.min() >= 1 and ids.max() <= ADE20K_CLASS_COUNT

    iou, pixel_accuracy = csail_scores(annotations, submission)
    ours = sfseg_scores(ade20k_checkpoint, tmp_path / "eval")
    ours_iou = np.array([ours["per_class_iou"][name] for name in ADE20K_CLASSES], dtype=float)
    present = ~np.isnan(ours_iou)  # in the ground truth or the prediction
    assert present.sum() > 10  # not a trivial match
    np.testing.assert_allclose(iou[present], ours_iou[present], rtol=0, atol=1e-6)
    assert np.all(iou[~present] == 0)  # the toolkit's IoU of an absent class
    assert iou[present].mean() == pytest.approx(ours["mIoU"], abs=1e-6)
    assert iou.mean() == pytest.approx(ours["mIoU"] * present.sum() / ADE20K_CLASS_COUNT, abs=1e-6)
    assert pixel_accuracy == pytest.approx(ours["pixel_acc"], abs=1e-6)
