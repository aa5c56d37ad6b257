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
from omegaconf import OmegaConf
from PIL import Image

from sfseg.ablation import CAMVID_STEPS
from sfseg.builder import build
from sfseg.data.classes import CAMVID_CLASSES
from sfseg.data.datasets import CAMVID, CAMVID_VOID, SegmentationFiles
from sfseg.data.real import CamVidDataModule
from sfseg.eval import run as evaluate
from sfseg.inference import InputView, fused_logits
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


# The recipes at CamVid's own 360 x 480: (experiment, test scale, training crop, network input of a val image)
RECIPES = {"camvid_cpu": (0.625, (224, 224), (256, 320)), "camvid": (1.0, (352, 480), (384, 480))}


@pytest.mark.parametrize("experiment", RECIPES)
def test_camvid_recipes_compose_and_fit_the_network_at_camvids_size(
    experiment: str, tmp_path: Path, run_dir: Path
):
    test_scale, crop, network_input = RECIPES[experiment]
    root = make_camvid(tmp_path, counts={"train": 2, "val": 1}, size=(360, 480))
    overrides = [f"experiment={experiment}", f"data.root={root}", "model.backbone.pretrained=false"]
    cfg = compose_config([*overrides, "trainer.accelerator=cpu", "data.num_workers=0"], run_dir)
    datamodule, model, _ = build(cfg)
    datamodule.setup("fit")  # checks the crop against the network's size divisor
    assert datamodule.train_set[0]["image"].shape[-2:] == crop
    batch = next(iter(datamodule.val_dataloader()))
    # with a test scale the images stay 360 x 480 (the model resizes, then pads); without, padded to 32
    assert tuple(batch["label"].shape[-2:]) == ((360, 480) if test_scale != 1.0 else (384, 480))
    view = InputView.of(batch["label"].shape[-2:], model.test_scale, model.net.size_divisor)
    assert (model.test_scale, view.padded) == (test_scale, network_input)
    with torch.no_grad():
        out = model.eval().net(view.images(batch["image"][:1]))
    logits, level_map = fused_logits(out, view, model.tau)
    assert logits.shape == (1, NUM_CLASSES, *batch["label"].shape[-2:])
    finest = (network_input[0] // 4, network_input[1] // 4)
    assert tuple(out.semantic[-1].shape[-2:]) == tuple(level_map.shape[-2:]) == finest


def test_the_cpu_recipe_is_the_presets_with_lighter_coarse_levels_and_the_gpu_recipe_follows_pp_liteseg(
    run_dir: Path,
):
    cpu = compose_config(["experiment=camvid_cpu", "data.root=/data"], run_dir)
    assert (
        cpu.trainer.max_steps == CAMVID_STEPS and cpu.trainer.max_steps % cpu.trainer.val_check_interval == 0
    )
    assert (cpu.model.levels, cpu.model.backbone.name, cpu.model.backbone.pretrained) == (
        4,
        "hrnet_w18_small",
        False,
    )
    # the coarse levels' CE x 0.25 for any L (L=1: Eq. 1), the factor study's L4_coarse_quarter cell exactly
    assert list(cpu.model.loss.level_weights) == [0.25, 0.25, 0.25, 1.0]
    for levels, weights in ((1, [1.0]), (2, [0.25, 1.0])):
        other = compose_config(
            ["experiment=camvid_cpu", "data.root=/data", f"model.levels={levels}"], run_dir
        )
        assert list(other.model.loss.level_weights) == weights
    cell = compose_config(["experiment=camvid_factors", "data.root=/data", "cell=L4_coarse_quarter"], run_dir)
    for key in ("model", "data", "trainer"):
        assert OmegaConf.to_container(cell[key], resolve=True) == OmegaConf.to_container(
            cpu[key], resolve=True
        )
    gpu = compose_config(["experiment=camvid", "data.root=/data"], run_dir)
    assert gpu.model.loss.level_weights is None  # the GPU recipe keeps Eq. 1
    optimizer = gpu.model.optimizer
    # PP-LiteSeg's CamVid schedule: 10k iterations of 24 images, SGD 0.01 poly 0.9, wd 5e-4, 200 warmup iterations from 1e-5
    assert (gpu.trainer.max_steps, gpu.global_batch_size, gpu.data.batch_size) == (10000, 24, 24)
    assert (optimizer.name, optimizer.lr, optimizer.weight_decay, optimizer.poly_power) == (
        "sgd",
        0.01,
        5e-4,
        0.9,
    )
    assert optimizer.warmup_steps == 200 and optimizer.lr * optimizer.warmup_ratio == pytest.approx(1e-5)
    assert list(gpu.data.scale_range) == [0.5, 2.5] and gpu.model.backbone.pretrained


def test_pictures_take_scenes_spread_over_the_split_not_consecutive_frames(tmp_path: Path):
    # CamVid's files sorted by name are runs of consecutive frames of one drive: the pictures of pyramid.png,
    # the notebook and W&B take the first and the last image and others evenly between them.
    root = make_camvid(tmp_path, counts={"train": 1, "val": 9})
    module = CamVidDataModule(root=str(root), crop_size=64, batch_size=1, num_workers=0)
    module.setup("validate")
    images, labels = module.val_examples(3)
    expected = [module.val_set[index] for index in (0, 4, 8)]
    assert torch.equal(images, torch.stack([sample["image"] for sample in expected]))
    assert torch.equal(labels, torch.stack([sample["label"] for sample in expected]))
    assert module.val_examples(20)[0].shape[0] == 9  # never more than the split


def test_the_studies_compose_with_the_optuna_sweeper_and_equal_time_trials(run_dir: Path):
    overrides = ["experiment=camvid_cpu", "data.root=/data", "data.crop_size=224", "data.test_scale=0.5"]
    shared = compose_config([*overrides, "hparams_search=camvid_cpu", "search.scale_ratio=2.0"], run_dir)
    assert shared.hydra.sweeper._target_.endswith("OptunaSweeper") and shared.hydra.mode.name == "MULTIRUN"
    assert shared.model.levels == 1 and shared.hydra.sweeper.n_trials >= 8
    assert shared.trainer.max_steps == round(
        800 * 160**2 / 224**2
    )  # equal time: fewer steps for a larger crop
    assert list(shared.data.scale_range) == [0.25, 1.0]  # test scale / ratio .. test scale x ratio
    sf = compose_config([*overrides, "hparams_search=camvid_cpu_sf", "search.coarse_weight=0.5"], run_dir)
    assert (
        sf.model.levels == 4 and sf.hydra.sweeper.n_trials == shared.hydra.sweeper.n_trials
    )  # equal budgets
    assert list(sf.model.loss.level_weights) == [0.5, 0.5, 0.5, 1.0]
    assert set(sf.hydra.sweeper.params) == {"model.tau", "model.relabel.policy", "search.coarse_weight"}
