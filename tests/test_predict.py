"""`python -m sfseg.predict`: masks (palette PNGs of class ids or the dataset's raw ids), overlays and
level maps for any image and for folder trees (mirrored), masks only for a submission, the datasets'
palettes, and clear errors for files that are not images and outputs inside the input."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sfseg.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    PASCAL_CONTEXT59_CLASSES,
    PASCAL_CONTEXT59_PALETTE,
    SYNTHETIC_PALETTE,
    generated_palette,
    palette_for,
)
from sfseg.data.datasets import NotAnImageError, decode_rgb
from sfseg.inference import load
from sfseg.module import SpecializeAndFuseModule
from sfseg.predict import run
from tests.processes import run_module
from tests.test_eval import train_tiny_checkpoint

OUTPUT_KINDS = ("mask", "overlay", "levels")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp()) / "checkpoints" / "last.ckpt"


def write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """A grey, an RGBA and an odd-sized RGB image, and a text file; returns image stem -> (W, H)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8), mode="L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (70, 45, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (99, 131, 3), dtype=np.uint8)).save(folder / "odd.jpg")
    (folder / "notes.txt").write_text("not an image")
    return {"grey": (53, 37), "rgba": (45, 70), "odd": (131, 99)}


def predict_config(
    checkpoint: Path,
    input_path: Path,
    output: Path | None,
    ids: str = "class",
    fuse: bool = True,
    write: Sequence[str] = OUTPUT_KINDS,
):
    return OmegaConf.create(
        {
            "write": list(write),
            "ckpt_path": str(checkpoint),
            "input": str(input_path),
            "output": None if output is None else str(output),
            "fuse": fuse,
            "sparse_inference": True,
            "alpha": 0.5,
            "device": "cpu",
            "autocast": None,
            "ids": ids,
        }
    )


@pytest.mark.slow
def test_predict_folder_writes_pictures_for_every_image_and_reports_the_rest(
    checkpoint: Path, tmp_path: Path
):
    sizes = write_images(tmp_path / "in")
    output = tmp_path / "out"
    result = run_module(
        "sfseg.predict",
        f"ckpt_path={checkpoint}",
        f"input={tmp_path / 'in'}",
        f"output={output}",
        cwd=tmp_path,
    )
    assert result.returncode != 0  # a bad file in the folder fails the command, after the others
    assert "not an image" in result.stderr and str(tmp_path / "in" / "notes.txt") in result.stderr
    assert "grey.png is L, converted to RGB" in result.stdout
    assert "rgba.png is RGBA, converted to RGB" in result.stdout
    palette = {tuple(colour) for colour in SYNTHETIC_PALETTE}
    for stem, size in sizes.items():
        for kind in OUTPUT_KINDS:
            with Image.open(output / f"{stem}_{kind}.png") as picture:
                # The mask is a palette image of class ids; the overlay and the level map are pictures.
                assert picture.size == size and picture.mode == ("P" if kind == "mask" else "RGB"), (
                    stem,
                    kind,
                )
        # Shown through its palette, the mask has the dataset's colours.
        mask = np.asarray(Image.open(output / f"{stem}_mask.png").convert("RGB")).reshape(-1, 3)
        assert {tuple(colour) for colour in np.unique(mask, axis=0)} <= palette
    assert sorted(path.name for path in output.iterdir()) == sorted(
        f"{stem}_{kind}.png" for stem in sizes for kind in OUTPUT_KINDS
    )


@pytest.mark.slow
def test_predict_single_file(checkpoint: Path, tmp_path: Path):
    write_images(tmp_path / "in")
    assert run(predict_config(checkpoint, tmp_path / "in" / "odd.jpg", tmp_path / "out")) == 0
    assert (tmp_path / "out" / "odd_levels.png").is_file()
    with pytest.raises(NotAnImageError, match=f"not an image: {tmp_path / 'in' / 'notes.txt'}"):
        run(predict_config(checkpoint, tmp_path / "in" / "notes.txt", tmp_path / "out"))


@pytest.mark.slow
def test_without_output_the_pictures_go_into_the_checkpoints_run_folder(checkpoint: Path, tmp_path: Path):
    # A copy of the run folder: what predict writes stays in this test.
    run_folder = tmp_path / "run"
    (run_folder / "checkpoints").mkdir(parents=True)
    ckpt = shutil.copy(checkpoint, run_folder / "checkpoints" / "last.ckpt")
    write_images(tmp_path / "photos")
    assert run(predict_config(ckpt, tmp_path / "photos", None)) == 1  # notes.txt is no image
    assert (run_folder / "predict" / "photos" / "odd_mask.png").is_file()
    assert run(predict_config(ckpt, tmp_path / "photos" / "grey.png", None)) == 0
    assert (run_folder / "predict" / "grey_levels.png").is_file()
    assert run(predict_config(ckpt, tmp_path / "photos" / "grey.png", None, fuse=False)) == 0
    assert (run_folder / "predict_finest" / "grey_mask.png").is_file()
    # Nothing among the input images.
    assert sorted(path.name for path in (tmp_path / "photos").iterdir()) == [
        "grey.png", "notes.txt", "odd.jpg", "rgba.png"
    ]  # fmt: skip


@pytest.mark.slow
def test_mask_png_reads_back_as_the_class_ids_with_the_datasets_palette(checkpoint: Path, tmp_path: Path):
    write_images(tmp_path / "in")
    assert run(predict_config(checkpoint, tmp_path / "in", tmp_path / "out")) == 1  # notes.txt is no image
    predictor = load(checkpoint, device="cpu")
    for stem in ("grey", "rgba", "odd"):
        source = next((tmp_path / "in").glob(f"{stem}.*"))
        with Image.open(tmp_path / "out" / f"{stem}_mask.png") as mask:
            ids, palette = np.asarray(mask), mask.getpalette()
        np.testing.assert_array_equal(ids, predictor.predict(decode_rgb(source)[0]).mask)
        assert palette[: 3 * len(SYNTHETIC_PALETTE)] == [
            value for colour in SYNTHETIC_PALETTE for value in colour
        ]
    with pytest.raises(
        ValueError, match=r"ids=raw: the checkpoint was not trained on a dataset with its own label ids"
    ):
        run(predict_config(checkpoint, tmp_path / "in", tmp_path / "raw", ids="raw"))
    with pytest.raises(ValueError, match="ids='names' is not one of class, raw"):
        run(predict_config(checkpoint, tmp_path / "in", tmp_path / "raw", ids="names"))


def untrained_checkpoint(path: Path, class_names: Sequence[str], **data: Any) -> Path:
    """A checkpoint as Lightning writes it (hyper_parameters and state_dict of the module), untrained,
    small, for a dataset whose ids differ from the class ids, outside any training run folder; `data`:
    what training records of its data (palette, label_values)."""
    module = SpecializeAndFuseModule(
        num_classes=len(class_names),
        backbone={"name": "hrnet_w18_small", "pretrained": False},
        context={"name": "none"},
        relabel={"policy": "true_positive"},
        levels=2,
        unity_channels=8,
        semantic_channels=16,
        class_names=class_names,
        **data,
    )
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_ids_raw_writes_ade20ks_own_ids_1_to_150(tmp_path: Path):
    checkpoint = untrained_checkpoint(tmp_path / "ade20k.ckpt", ADE20K_CLASSES)
    write_images(tmp_path / "in")
    image = tmp_path / "in" / "odd.jpg"
    assert run(predict_config(checkpoint, image, tmp_path / "out", ids="raw")) == 0
    with Image.open(tmp_path / "out" / "odd_mask.png") as mask:
        raw, palette = np.asarray(mask), np.asarray(mask.getpalette()).reshape(-1, 3)
    classes = load(checkpoint, device="cpu").predict(decode_rgb(image)[0]).mask
    np.testing.assert_array_equal(raw, classes + 1)  # ADE20K's benchmark ids: class k is k + 1, 0 = other
    assert raw.min() >= 1
    assert palette[0].tolist() == [0, 0, 0] and palette[1:151].tolist() == [list(c) for c in ADE20K_PALETTE]


def test_predict_input_errors_name_the_path(tmp_path: Path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=f"input={missing}: no such file or folder"):
        run(predict_config(tmp_path / "any.ckpt", missing, tmp_path / "out"))
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "a.png").write_bytes(b"")
    (clash / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"share a name up to the extension \(a\)"):
        run(predict_config(tmp_path / "any.ckpt", clash, tmp_path / "out"))


def test_palette_is_the_datasets_or_distinct_colours():
    assert palette_for(ADE20K_CLASSES) == list(ADE20K_PALETTE)
    unknown = palette_for([f"class{index}" for index in range(30)])
    assert len(set(unknown)) == 30


def test_checkpoints_written_before_the_datasets_palettes_draw_in_them(tmp_path: Path):
    # Pascal-Context-59's checkpoints recorded the VOC colour map, the palette sfseg gave it before.
    voc = [list(colour) for colour in generated_palette(len(PASCAL_CONTEXT59_CLASSES))]
    former = untrained_checkpoint(tmp_path / "pascal.ckpt", PASCAL_CONTEXT59_CLASSES, palette=voc)
    assert load(former, device="cpu").palette == list(PASCAL_CONTEXT59_PALETTE)
    unrecorded = untrained_checkpoint(tmp_path / "ade20k.ckpt", ADE20K_CLASSES)  # no palette at all
    assert load(unrecorded, device="cpu").palette == list(ADE20K_PALETTE)


def test_a_folder_tree_is_mirrored_and_its_bad_files_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    checkpoint = untrained_checkpoint(tmp_path / "ade20k.ckpt", ADE20K_CLASSES)
    tree = tmp_path / "val"
    sizes = write_images(tree / "aachen")
    write_images(tree / "bochum" / "night")
    hidden = tree / ".thumbnails" / "odd.jpg"  # hidden folders are left out
    hidden.parent.mkdir()
    shutil.copy(tree / "aachen" / "odd.jpg", hidden)
    output = tmp_path / "submission"
    assert run(predict_config(checkpoint, tree, output, ids="raw", write=["mask"])) == 2  # the two notes.txt
    folders = (Path("aachen"), Path("bochum") / "night")
    assert sorted(path.relative_to(output) for path in output.rglob("*.png")) == sorted(
        folder / f"{stem}.png" for folder in folders for stem in sizes
    )  # masks only, named like their images, in the same subfolders
    for folder in folders:
        with Image.open(output / folder / "odd.png") as mask:
            assert mask.size == sizes["odd"] and np.asarray(mask).min() >= 1  # ADE20K's ids 1..150
    reported = capsys.readouterr().err
    assert f"not an image: {tree / 'bochum' / 'night' / 'notes.txt'}" in reported
    assert f"not an image: {tree / 'aachen' / 'notes.txt'}" in reported


def test_an_output_inside_the_input_or_over_an_image_is_refused_before_anything_runs(tmp_path: Path):
    write_images(tmp_path / "in")
    inside = tmp_path / "in" / "predictions"
    with pytest.raises(
        ValueError, match=r"output=.*predictions lies inside input=.*in: a recursive walk would read"
    ):
        run(predict_config(tmp_path / "any.ckpt", tmp_path / "in", inside))
    assert not inside.exists()
    grey = tmp_path / "in" / "grey.png"  # its mask alone would be named like it, in its own folder
    with pytest.raises(ValueError, match=r"would write .*grey\.png over an input image"):
        run(predict_config(tmp_path / "any.ckpt", grey, tmp_path / "in", write=["mask"]))
    with pytest.raises(ValueError, match=r"write=\['mask', 'mask'\] must name each picture once, from mask"):
        run(predict_config(tmp_path / "any.ckpt", grey, tmp_path / "out", write=["mask", "mask"]))
