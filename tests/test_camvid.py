"""CamVid (data=camvid) in the literature's protocol, on a fixture in SegNet's layout (tests/fixtures.py).

A model trained at a reduced scale (data.test_scale=0.5) sees every image resized by it and its
predictions resized back: validation during training, `sfseg.eval ... data.val_split=test` and
`sfseg.predict` all score or write the full-resolution masks, and the CSAIL toolkit's
`intersectionAndUnion` (mit-semseg, as its eval.py calls it: void as -1) on the masks sfseg.predict wrote
gives the IoU sfseg.eval reports: one confusion matrix over the split, void dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from mit_semseg.utils import intersectionAndUnion
from PIL import Image

from sfseg.data.classes import CAMVID_CLASSES
from sfseg.data.datasets import CAMVID, CAMVID_VOID, SegmentationFiles
from sfseg.eval import run as evaluate
from sfseg.predict import run as predict
from sfseg.train import train
from tests.conftest import compose_config
from tests.fixtures import CAMVID_COUNTS, HEIGHT, WIDTH, make_camvid, write_label
from tests.test_eval import fixture_run_overrides

NUM_CLASSES = len(CAMVID_CLASSES)


@pytest.fixture(scope="module")
def camvid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training steps on the CamVid fixture at test scale 0.5 (64 x 80 images seen at 32 x 40)."""
    base = tmp_path_factory.mktemp("camvid")
    root, run_dir = make_camvid(base / "data"), base / "run"
    overrides = [*fixture_run_overrides("camvid", root), "data.test_scale=0.5", "data.val_batch_size=2"]
    train(compose_config(overrides, run_dir))
    GlobalHydra.instance().clear()
    return run_dir


def checkpoint_of(run_dir: Path) -> Path:
    """The checkpoint the run's final validation scored (metrics.json names it)."""
    return Path(json.loads((run_dir / "metrics.json").read_text())["checkpoint"])


def csail_scores(labels: Path, predictions: Path) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union per class over the split, as the CSAIL toolkit's eval.py sums them: its
    intersectionAndUnion per image on 0-based ids, the label's void (11) as -1 (not scored)."""
    intersection = union = np.zeros(NUM_CLASSES)
    for label_path in sorted(labels.glob("*.png")):
        label = np.asarray(Image.open(label_path), dtype=np.int64)
        label = np.where(label == CAMVID_VOID, -1, label)
        prediction = np.asarray(Image.open(predictions / label_path.name), dtype=np.int64)
        assert prediction.shape == label.shape  # the masks are at the labels' full resolution
        image_intersection, image_union = intersectionAndUnion(prediction, label, NUM_CLASSES)
        intersection, union = intersection + image_intersection, union + image_union
    return intersection, union


@pytest.mark.slow
def test_test_split_scores_full_resolution_masks_as_the_csail_toolkit(camvid_run: Path, tmp_path: Path):
    root = camvid_run.parent / "data" / "camvid"
    checkpoint = checkpoint_of(camvid_run)
    ours = evaluate(
        compose_config(
            [f"ckpt_path={checkpoint}", "eval.device=cpu", "data.val_split=test"], tmp_path / "eval", "eval"
        )
    )
    assert ours["num_images"] == CAMVID_COUNTS["test"]
    masks = tmp_path / "masks"
    overrides = [f"ckpt_path={checkpoint}", f"input={root / 'test'}", f"output={masks}", "write=[mask]"]
    assert predict(compose_config([*overrides, "ids=raw", "device=cpu"], masks, "predict")) == 0

    intersection, union = csail_scores(root / "testannot", masks)
    present = union > 0  # in the ground truth or the prediction: sfseg's classes of the mean
    assert present.sum() > 3  # not a trivial match
    iou = intersection / np.maximum(union, 1)
    ours_iou = np.array([ours["per_class_iou"][name] for name in CAMVID_CLASSES], dtype=float)
    np.testing.assert_allclose(ours_iou[present], iou[present], rtol=0, atol=1e-6)
    assert np.isnan(ours_iou[~present]).all()
    assert ours["mIoU"] == pytest.approx(iou[present].mean(), abs=1e-6)


@pytest.mark.slow
def test_validation_scores_as_eval_does_on_full_resolution_labels(camvid_run: Path, tmp_path: Path):
    trained = json.loads((camvid_run / "metrics.json").read_text())
    ours = evaluate(
        compose_config([f"ckpt_path={checkpoint_of(camvid_run)}", "eval.device=cpu"], tmp_path, "eval")
    )
    assert ours["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    for name in CAMVID_CLASSES:
        theirs, mine = trained["per_class_iou"][name], ours["per_class_iou"][name]
        assert (theirs is None and math.isnan(mine)) or mine == pytest.approx(theirs, abs=1e-6), name
    # The checkpoint keeps the scale, so sfseg.predict and sfseg.eval need no setting to apply it.
    hparams = torch.load(checkpoint_of(camvid_run), map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["test_scale"] == 0.5


def test_a_label_value_outside_the_classes_names_its_file(tmp_path: Path):
    root = make_camvid(tmp_path)
    bad = root / "valannot" / "0001TP_006720.png"
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    label[:2, :3] = 12  # neither a class (0..10) nor void (11)
    write_label(bad, label)
    files = SegmentationFiles(CAMVID.scan(root, "val").samples, CAMVID, transform=None)
    with pytest.raises(
        ValueError, match=r"label values 12 \(6 px\) in .*0001TP_006720.png stand for no class"
    ) as error:
        files[1]
    assert "0-11" in str(error.value)  # the allowed raw values: the classes and void
