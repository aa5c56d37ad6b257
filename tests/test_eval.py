"""Evaluation: inference helpers on a stand-in model, then `python -m sfseg.eval` end to end on a
checkpoint trained here (whole image, sliding window, multi-scale + flip, finest level only, the tau
override and the tau sweep, the unity calibration)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sfseg.data.classes import ADE20K_CLASSES, SYNTHETIC_CLASSES
from sfseg.eval import default_eval_folder, run
from sfseg.inference import (
    InferenceSettings,
    InputView,
    pad_images,
    slide_logits,
    tta_probabilities,
    whole_logits,
    window_starts,
)
from sfseg.models import PyramidOutput
from sfseg.visualize import DECIDED_ABOVE_RGB, denormalize, unity_decisions
from tests.conftest import TINY, compose_config
from tests.fixtures import make_ade20k
from tests.processes import run_module
from tests.test_reproducibility import run_train

# The tiny run with the learned fuse (tests/test_export.py exports the same run).
# The learned fuse's gate reads the pyramids whatever made them: the small `local` backbone keeps its
# checkpoint's training and ONNX export (tests/test_export.py) cheap.
LEARNED = ("model/fuse=learned", "model/backbone=local")
# The data part of the tiny training run: eval must see the same validation images.
TINY_DATA = [override for override in TINY if override.startswith("data.")]
EVAL_FILES = (
    "metrics.json",
    "per_class.csv",
    "specialization.json",
    "table9.png",
    "fig3.png",
    "unity_calibration.json",
    "unity_calibration.png",
)


def train_tiny_checkpoint(base: Path, *overrides: str, name: str = "tiny_run") -> Path:
    """A training run folder of the tiny synthetic run with `overrides`, trained once per test session
    and reused: `base` is tmp_path_factory.getbasetemp(); pytest-xdist's workers share its parent."""
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run_dir = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker trains, the other waits and reuses it
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            result = run_module("sfseg.train", *TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=shared)
            assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------------------------------------
# Inference helpers on a stand-in whose prediction depends on each pixel alone


class PixelwiseNet(torch.nn.Module):
    """A one-level "pyramid" at the image resolution that maps each pixel's colour to logits: any
    tiling, padding or flip must give the same answer as one pass over the image. Records the input
    sizes it was asked for."""

    size_divisor = 32

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.weight = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(0))
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> PyramidOutput:
        self.sizes.append(tuple(images.shape[-2:]))
        return PyramidOutput(semantic=[torch.einsum("cd,bdhw->bchw", self.weight, images)], unity=[])


def direct_logits(net: PixelwiseNet, images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("cd,bdhw->bchw", net.weight, images)


def test_window_starts_cover_the_side_and_end_flush():
    assert window_starts(100, 32, 20) == [0, 20, 40, 60, 68]
    assert window_starts(64, 32, 32) == [0, 32]
    assert window_starts(32, 32, 16) == [0]


def test_padding_is_black_like_the_validation_pipeline():
    images = torch.randn(2, 3, 5, 7)
    padded = pad_images(images, 32, 32)
    assert padded.shape == (2, 3, 32, 32) and torch.equal(padded[..., :5, :7], images)
    assert (denormalize(padded)[:, 5:] == 0).all() and (denormalize(padded)[:, :, 7:] == 0).all()


def test_whole_image_pads_to_the_size_divisor_and_crops_back():
    net = PixelwiseNet()
    images = torch.randn(1, 3, 50, 70)
    logits = whole_logits(net, images, tau=0.9)
    assert net.sizes == [(64, 96)]
    assert torch.allclose(logits, direct_logits(net, images), atol=1e-6)


def test_a_test_scale_resizes_the_input_and_brings_the_logits_back():
    # mmsegmentation's test pipeline: the image resized by the scale, padded, its logits cropped and resized
    # back to the image's own pixels (a pixelwise model: the bilinear resizes of the input and the logits
    # of a smooth image agree up to interpolation).
    net = PixelwiseNet()
    coarse = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    images = F.interpolate(coarse, size=(50, 70), mode="bilinear", align_corners=False)
    logits = whole_logits(net, images, tau=0.9, scale=0.5)
    assert net.sizes == [(32, 64)]  # 25 x 35, padded to the divisor 32
    assert logits.shape == (1, 4, 50, 70)
    # interpolation error only (resizing the padded logits without cropping them is off by 1.65 on average)
    assert (logits - direct_logits(net, images)).abs().mean() < 0.05
    view = InputView.of((50, 70), 0.5, 32)
    assert (view.scaled, view.padded) == ((25, 35), (32, 64))
    labels = torch.arange(50 * 70).view(1, 50, 70) % 7
    assert view.labels(labels, 255).shape == (1, 32, 64) and (view.labels(labels, 255)[:, 25:] == 255).all()
    # the pictures draw the image's own cells only: the input's 25 x 35 pixels, 4 x 5 cells of 8 pixels
    assert view.cells(torch.zeros(1, 3, 32, 64)).shape == (1, 3, 25, 35)
    assert view.cells(torch.zeros(1, 4, 8)).shape == (1, 4, 5)
    # multi-scale ratios are relative to the test scale: 0.5 x 0.5 of 50 x 70 is 12 x 18, padded to 32 x 32
    net.sizes.clear()
    tta_probabilities(net, images, InferenceSettings(scales=(0.5, 1.0)), tau=0.9, test_scale=0.5)
    assert net.sizes == [(32, 32), (32, 64)]
    identity = InputView.of((64, 96), 1.0, 32)
    assert identity.scaled == identity.padded == identity.size


def test_the_unity_pictures_of_a_test_scaled_input_keep_the_coarse_decisions_on_its_own_cells():
    # 80 x 80 seen at 40 x 40, padded to 64 x 64: 3 x 3 cells of 16 pixels, 5 x 5 of 8 (not twice 3)
    view = InputView.of((80, 80), 0.5, 32)
    coarse, fine = torch.full((1, 4, 4), -10.0), torch.full((1, 8, 8), 10.0)
    coarse[0, 0, 2] = 10.0  # decided there: fine columns 4 and 5, only 4 within the image
    decisions = unity_decisions([view.cells(coarse), view.cells(fine)], tau=0.9)
    assert decisions[0].shape == (1, 3, 3, 3) and decisions[1].shape == (1, 5, 5, 3)
    decided_above = torch.from_numpy(decisions[1][0]).eq(torch.tensor(DECIDED_ABOVE_RGB)).all(-1)
    assert decided_above[:2, 4].all() and decided_above.sum() == 2


def test_sliding_window_averages_overlapping_windows_back_to_the_image():
    net = PixelwiseNet()
    images = torch.randn(2, 3, 50, 70)
    logits = slide_logits(net, images, crop_size=(32, 32), stride=(16, 24), tau=0.9)
    assert logits.shape == (2, 4, 50, 70)
    assert set(net.sizes) == {(32, 32)} and len(net.sizes) == 3 * 3
    assert torch.allclose(logits, direct_logits(net, images), atol=1e-5)
    small = torch.randn(1, 3, 20, 20)  # smaller than a window: padded to one window
    assert torch.allclose(
        slide_logits(net, small, (32, 32), (16, 16), 0.9), direct_logits(net, small), atol=1e-5
    )
    with pytest.raises(
        ValueError, match=r"eval.crop_size=\[48, 48\] must be a multiple of the model's size divisor 32"
    ):
        slide_logits(net, images, crop_size=(48, 48), stride=(16, 16), tau=0.9)


def test_flip_and_scales_average_softmax_at_the_original_resolution():
    net = PixelwiseNet()
    images = torch.randn(1, 3, 40, 56)
    expected = direct_logits(net, images).softmax(1)
    flipped = tta_probabilities(net, images, InferenceSettings(flip=True), tau=0.9)
    assert torch.allclose(flipped, expected, atol=1e-5)  # a pixelwise model is flip-invariant
    multi = tta_probabilities(net, images, InferenceSettings(scales=(0.5, 1.0, 1.5), flip=True), tau=0.9)
    assert multi.shape == expected.shape
    assert torch.allclose(multi.sum(1), torch.ones(1, 40, 56), atol=1e-5)  # an average of distributions
    assert sorted(set(net.sizes)) == [(32, 32), (64, 64), (64, 96)]  # 20x28, 40x56, 60x84, padded


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"mode": "tiles"}, "eval.mode='tiles' is not one of whole, slide"),
        ({"scales": ()}, "eval.scales must be a non-empty list"),
        ({"stride": (600, 600)}, r"eval.stride=\[600, 600\] must not exceed eval.crop_size=\[512, 512\]"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        InferenceSettings(**override)


def test_default_eval_folder_is_in_the_training_run_and_says_the_variant(tmp_path: Path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    assert default_eval_folder(str(ckpt), "whole", [1.0], False, True) == str(tmp_path / "run" / "eval")
    assert default_eval_folder(str(ckpt), "whole", [1.0], False, False) == str(
        tmp_path / "run" / "eval_finest"
    )
    assert default_eval_folder(str(ckpt), "slide", [0.5, 1.0], True, True).endswith("eval_slide_ms_flip")
    assert default_eval_folder(str(ckpt), "whole", [1.0], False, True, 0.5).endswith("eval_tau0.5")
    elsewhere = tmp_path / "model.ckpt"
    elsewhere.touch()
    assert default_eval_folder(str(elsewhere), "whole", [1.0], False, True) == str(tmp_path / "eval")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*typo\.ckpt: no such checkpoint file"):
        default_eval_folder(str(tmp_path / "typo.ckpt"), "whole", [1.0], False, True)


# ---------------------------------------------------------------------------------------------
# End to end on a trained checkpoint


def read_outputs(folder: Path) -> tuple[dict, dict, list[dict]]:
    for name in EVAL_FILES:
        assert (folder / name).is_file(), name
    assert (folder / "table9.png").stat().st_size > 5_000 and (folder / "fig3.png").stat().st_size > 5_000
    with (folder / "per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return (
        json.loads((folder / "metrics.json").read_text()),
        json.loads((folder / "specialization.json").read_text()),
        rows,
    )


@pytest.mark.slow
def test_eval_cli_whole_image_reproduces_the_validation_of_training(trained_run: Path):
    trained = json.loads((trained_run / "metrics.json").read_text())
    result = run_module(  # a new interpreter, as a user starts it (the other eval runs are forked)
        "sfseg.eval",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        *TINY_DATA,
        cwd=trained_run.parent,
        fresh=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, specialization, rows = read_outputs(trained_run / "eval")  # <run folder>/eval by default

    # Same checkpoint, same images: the same dataset-level scores as the training run's validation.
    for key in ("mIoU", "pixel_acc", "mean_acc"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    assert list(metrics["per_class_iou"]) == list(SYNTHETIC_CLASSES)
    for name, iou in trained["per_class_iou"].items():
        assert metrics["per_class_iou"][name] == pytest.approx(iou, abs=1e-6, nan_ok=True)
    assert metrics["num_images"] == 4 and metrics["inference"]["mode"] == "whole"
    assert [row["class"] for row in rows] == list(SYNTHETIC_CLASSES)
    for row in rows:
        iou = metrics["per_class_iou"][row["class"]]
        assert (row["iou"] == "") if iou is None else float(row["iou"]) == pytest.approx(iou, abs=1e-6)

    # The fuse's headroom of the same pass, as the training run's validation measured it (docs/fuse.md).
    headroom = metrics["headroom"]
    assert headroom["fuse_rule"] == metrics["inference"]["fuse_rule"] == "hard"
    for key in (
        "mIoU",
        "mIoU_level1",
        "mIoU_best_level",
        "mIoU_oracle",
        "missed_share_mixed",
        "mIoU_fuse_soft",
    ):
        assert headroom[key] == pytest.approx(trained[key], abs=1e-6), key
    assert (
        headroom["mIoU_fuse_hard"] == pytest.approx(headroom["mIoU"]) and "mIoU_fuse_learned" not in headroom
    )
    assert headroom["mIoU_oracle"] >= max(headroom["mIoU"], headroom["mIoU_best_level"])
    best = headroom["best_level"]
    assert headroom["mIoU_best_level"] == max(headroom[f"mIoU_level{level}"] for level in range(1, 5))
    assert list(rows[0]) == [
        "class",
        "iou",
        "acc",
        *(f"iou_level{level}" for level in range(1, 5)),
        "iou_best_level",
        "iou_oracle",
    ]
    assert all(row["iou_best_level"] == row[f"iou_level{best}"] for row in rows)
    assert "single-scale mIoU (%): fused" in result.stdout and "oracle" in result.stdout

    # The analysis is of the same pyramid the training run validated.
    for level in range(1, 5):
        assert specialization["pyramid_scores"][f"mIoU_level{level}"] == pytest.approx(
            trained[f"mIoU_level{level}"]
        )
        assert specialization["parsimony"]["share_per_level"][f"level{level}"] == pytest.approx(
            trained[f"share_level{level}"]
        )
    assert len(specialization["table9"]["miou"]) == 4 and all(
        len(row) == 4 for row in specialization["table9"]["miou"]
    )
    # Every pixel is in one column (synthetic labels have no ignored pixel).
    assert sum(specialization["table9"]["pixels_per_column"]) == 4 * 64 * 64
    parsimony = specialization["parsimony"]
    assert parsimony["finest_cells"] == 4 * 16 * 16
    assert parsimony["labels"] == sum(parsimony["labels_per_level"].values()) <= parsimony["finest_cells"]
    assert set(specialization["unity"]["precision"]) == {"level1", "level2", "level3"}
    assert set(specialization["fig3"]["iou_minus_fused"]) == {f"level{level}" for level in range(1, 5)}

    # The reliability diagrams count every cell of every unity level once (no ignored pixels here).
    calibration = json.loads((trained_run / "eval" / "unity_calibration.json").read_text())
    assert calibration["tau"] == 0.9 and len(calibration["bin_edges"]) == 11
    for name, stride in (("level1", 32), ("level2", 16), ("level3", 8)):
        level = calibration["levels"][name]
        assert level["stride"] == stride and sum(level["cells"]) == 4 * (64 // stride) ** 2
        assert 0 <= level["ece"] <= 1

    # The per-class table and a progress bar are shown.
    assert "mIoU" in result.stdout and "sky" in result.stdout and "pole" in result.stdout
    assert str(trained_run / "eval" / "metrics.json") in result.stdout
    assert "eval: 100%" in result.stderr


def evaluate_in_process(trained_run: Path, out: Path, *overrides: str) -> tuple[dict, dict, list[dict]]:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        [f"ckpt_path={ckpt}", *TINY_DATA, "eval.device=cpu", *overrides], out, config_name="eval"
    )
    run(cfg)
    return read_outputs(out)


@pytest.mark.slow
def test_eval_variants_slide_tta_and_finest_only(trained_run: Path, tmp_path: Path):
    trained = json.loads((trained_run / "metrics.json").read_text())
    whole, whole_specialization, _ = evaluate_in_process(trained_run, tmp_path / "whole")

    # One window as large as the image is the whole-image prediction (several windows: see the
    # stand-in tests above).
    slide, slide_specialization, _ = evaluate_in_process(
        trained_run, tmp_path / "slide", "eval.mode=slide", "eval.crop_size=64", "eval.stride=32"
    )
    assert slide["inference"]["mode"] == "slide" and slide["inference"]["crop_size"] == [64, 64]
    assert slide["per_class_iou"] == whole["per_class_iou"]
    # The specialization analysis is of the model's own fused pyramid, whatever the inference mode.
    assert slide_specialization == whole_specialization

    tta, _, _ = evaluate_in_process(
        trained_run, tmp_path / "tta", "eval.scales=[0.5,1.0]", "eval.flip=true", "eval.autocast=bfloat16"
    )
    assert tta["inference"]["scales"] == [0.5, 1.0] and tta["inference"]["flip"] is True
    assert 0 <= tta["mIoU"] <= 1 and tta["pixel_acc"] > 0

    # Table 8's "auxiliary supervision": the finest level alone, as the training run measured it.
    finest, _, _ = evaluate_in_process(trained_run, tmp_path / "finest", "eval.fuse=false")
    assert finest["mIoU"] == pytest.approx(trained["mIoU_finest"], abs=1e-6)
    assert finest["inference"]["fuse"] is False


def read_sweep(folder: Path) -> list[dict]:
    with (folder / "tau_sweep.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_tau_sweep_scores_each_tau_as_a_plain_evaluation_at_that_tau(trained_run: Path, tmp_path: Path):
    swept = [0.3, 0.5, 0.7]
    metrics, specialization, _ = evaluate_in_process(
        trained_run, tmp_path / "sweep", f"eval.tau_sweep=[{','.join(map(str, swept))}]"
    )
    rows = read_sweep(tmp_path / "sweep")
    # The checkpoint's own tau joins the sweep, marked; its row is the sweep run's own evaluation.
    assert [float(row["tau"]) for row in rows] == [*swept, 0.9]
    assert [row["checkpoint_tau"] for row in rows] == ["False", "False", "False", "True"]
    assert float(rows[-1]["mIoU"]) == pytest.approx(metrics["mIoU"], rel=1e-5)
    assert float(rows[-1]["labels_per_image"]) == pytest.approx(specialization["parsimony"]["labels"] / 4)
    for row in rows[:-1]:
        tau = float(row["tau"])
        plain, plain_specialization, _ = evaluate_in_process(
            trained_run, tmp_path / row["tau"], f"eval.tau={tau}"
        )
        assert plain["inference"]["tau"] == tau and plain["inference"]["checkpoint_tau"] == 0.9
        assert float(row["mIoU"]) == pytest.approx(plain["mIoU"], rel=1e-5)
        assert float(row["pixel_acc"]) == pytest.approx(plain["pixel_acc"], rel=1e-5)
        parsimony = plain_specialization["parsimony"]
        assert float(row["labels_per_image"]) == pytest.approx(parsimony["labels"] / 4)
        for level in range(1, 5):
            assert float(row[f"share_level{level}"]) == pytest.approx(
                parsimony["share_per_level"][f"level{level}"], abs=1e-6
            )
    # The taus trade labels for accuracy: the sweep is not one point repeated.
    assert len({row["labels_per_image"] for row in rows}) > 1
    table = (tmp_path / "sweep" / "tau_sweep.md").read_text()
    assert "| **0.9** (checkpoint) |" in table and "Cost: the network ran once per image batch" in table
    assert (tmp_path / "sweep" / "tau_sweep.png").stat().st_size > 5_000


@pytest.mark.slow
def test_a_learned_fuse_checkpoint_evaluates_dense_with_its_own_rule(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys
):
    run_dir = train_tiny_checkpoint(tmp_path_factory.getbasetemp(), *LEARNED, name="learned_run")
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert trained["mIoU"] == pytest.approx(trained["mIoU_fuse_learned"])  # validation used the net's rule
    metrics, _, _ = evaluate_in_process(run_dir, tmp_path / "eval", "eval.tau_sweep=[0.5]")
    printed = capsys.readouterr().out
    assert metrics["inference"]["fuse_rule"] == "learned" and metrics["inference"]["sparse"] is False
    assert "note: the learned fuse reads every level at every cell" in printed
    assert "note: the learned fuse does not read tau" in printed
    headroom = metrics["headroom"]
    assert metrics["mIoU"] == pytest.approx(headroom["mIoU"]) == pytest.approx(headroom["mIoU_fuse_learned"])
    assert headroom["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    assert {"mIoU_fuse_hard", "mIoU_fuse_soft"} <= set(headroom)
    rows = read_sweep(tmp_path / "eval")
    assert len({row["mIoU"] for row in rows}) == 1  # tau does not change this rule
    assert "The learned fuse does not read τ" in (tmp_path / "eval" / "tau_sweep.md").read_text()


@pytest.mark.slow
def test_eval_refuses_a_model_or_data_that_does_not_match_the_checkpoint(trained_run: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"model\.levels=2 but the checkpoint was trained with 4"):
        evaluate_in_process(trained_run, tmp_path / "a", "model.levels=2")
    with pytest.raises(ValueError, match=r"data\.num_levels=2 but the checkpoint has L=4"):
        evaluate_in_process(trained_run, tmp_path / "b", "data.num_levels=2")
    with pytest.raises(ValueError, match=r"eval\.tau must be in the open interval \(0, 1\), got 1\.5"):
        evaluate_in_process(trained_run, tmp_path / "c", "eval.tau=1.5")
    with pytest.raises(ValueError, match=r"eval\.tau_sweep must be in the open interval \(0, 1\), got 0"):
        evaluate_in_process(trained_run, tmp_path / "d", "eval.tau_sweep=[0.5,0]")
    with pytest.raises(
        ValueError, match=r"eval\.tau_sweep must be a list of taus, e\.g\. \[0\.5,0\.7,0\.9\]"
    ):
        evaluate_in_process(trained_run, tmp_path / "e", "eval.tau_sweep=0.5")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing\.ckpt: no such checkpoint file"):
        run(compose_config([f"ckpt_path={tmp_path / 'missing.ckpt'}", "eval.device=cpu"], tmp_path, "eval"))


# ---------------------------------------------------------------------------------------------
# The data of the checkpoint's own training run


def run_eval(ckpt: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_module("sfseg.eval", f"ckpt_path={ckpt}", "eval.device=cpu", *overrides, cwd=cwd)


def fixture_run_overrides(dataset: str, root: Path) -> list[str]:
    """Two tiny training steps on a dataset fixture of tests/fixtures.py (64-px crops, no pretrained
    weights, no pictures)."""
    overrides = [f"data={dataset}", f"data.root={root}", "data.crop_size=64", "data.batch_size=2"]
    overrides += ["data.num_workers=0", "model.backbone.pretrained=false", "num_pyramid_images=0"]
    return overrides + [override for override in TINY if override.startswith(("model.", "trainer."))]


@pytest.fixture(scope="module")
def ade20k_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training steps on the ADE20K fixture (150 classes, files on disk): another dataset than
    eval's former default, the synthetic scenes."""
    base = tmp_path_factory.mktemp("ade20k_run")
    root, run_dir = make_ade20k(base / "data"), base / "run"
    result = run_train(*fixture_run_overrides("ade20k", root), f"hydra.run.dir={run_dir}", cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_eval_scores_the_dataset_the_checkpoint_was_trained_on_without_data(ade20k_run: Path):
    trained = json.loads((ade20k_run / "metrics.json").read_text())
    result = run_eval(ade20k_run / "checkpoints" / "last.ckpt", cwd=ade20k_run.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, _, rows = read_outputs(ade20k_run / "eval")
    assert metrics["data"] == "sfseg.data.real.ADE20KDataModule" and metrics["num_images"] == 2
    assert [row["class"] for row in rows] == list(ADE20K_CLASSES)
    assert metrics["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)  # the run's own val split
    assert "skyscraper" in result.stdout  # the per-class table names ADE20K's classes


@pytest.mark.slow
def test_a_dataset_elsewhere_on_this_machine_needs_only_data_root(ade20k_run: Path, tmp_path: Path):
    # The run folder on another machine: its recorded data.root does not exist there.
    moved = tmp_path / "run"
    shutil.copytree(ade20k_run, moved, ignore=shutil.ignore_patterns("eval*"))
    recorded = moved / "config.yaml"
    config = yaml.safe_load(recorded.read_text())
    root, config["data"]["root"] = config["data"]["root"], str(tmp_path / "not_here")
    recorded.write_text(yaml.safe_dump(config))
    ckpt = moved / "checkpoints" / "last.ckpt"

    def evaluate_moved(*overrides: str) -> dict:
        return run(
            compose_config([f"ckpt_path={ckpt}", "eval.device=cpu", *overrides], tmp_path / "eval", "eval")
        )

    with pytest.raises(FileNotFoundError, match=f"data.root not found: {tmp_path / 'not_here'}"):
        evaluate_moved()
    metrics = evaluate_moved(f"data.root={root}")
    trained = json.loads((ade20k_run / "metrics.json").read_text())
    assert list(metrics["per_class_iou"]) == list(ADE20K_CLASSES)
    assert metrics["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    with pytest.raises(
        ValueError, match=r"data\.rooot: the training run's data \(.*ADE20KDataModule\) has no"
    ):
        evaluate_moved(f"data.rooot={root}")


@pytest.mark.slow
def test_data_on_the_command_line_still_picks_the_dataset(ade20k_run: Path, tmp_path: Path):
    ckpt = ade20k_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"data=.*SyntheticDataModule has 12 classes but the checkpoint"):
        run(compose_config([f"ckpt_path={ckpt}", "data=synthetic", *TINY_DATA], tmp_path, "eval"))
