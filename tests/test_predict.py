"""`python -m sfseg.predict`: masks (palette PNGs of class ids or the dataset's raw ids), overlays and
level maps for any image, and clear errors for files that are not images."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sfseg.data.classes import ADE20K_CLASSES, ADE20K_PALETTE, SYNTHETIC_PALETTE, palette_for
from sfseg.data.datasets import NotAnImageError, decode_rgb
from sfseg.inference import load
from sfseg.module import SpecializeAndFuseModule
from sfseg.predict import run
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


def predict_config(checkpoint: Path, input_path: Path, output: Path, ids: str = "class"):
    return OmegaConf.create(
        {
            "ckpt_path": str(checkpoint),
            "input": str(input_path),
            "output": str(output),
            "fuse": True,
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
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sfseg.predict",
            f"ckpt_path={checkpoint}",
            f"input={tmp_path / 'in'}",
            f"output={output}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
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
