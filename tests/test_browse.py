"""The dataset browser (`python -m sfseg.data.browse`) on each dataset's fixture tree and the synthetic
default: sample pictures, class frequencies and unity-cell shares against direct counts."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfseg.data.browse import browse
from sfseg.data.datasets import LayoutError
from sfseg.pyramid import IGNORE_INDEX, build_targets, level_strides
from sfseg.visualize import IGNORED_GREYS, hatch_ignored, target_panels
from tests import fixtures
from tests.conftest import compose_config

SMALL_DATA = ["data.crop_size=64", "data.num_workers=0", "data.batch_size=2"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def direct_counts(labels: list[np.ndarray], num_classes: int, num_levels: int):
    """Class pixels, images per class, and per unity level (cells with a valid pixel, unity cells),
    counted with numpy on each label map padded bottom/right with the ignore index."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    images = np.zeros(num_classes, dtype=np.int64)
    strides = level_strides(num_levels)
    cells = np.zeros((num_levels - 1, 2), dtype=np.int64)
    for label in labels:
        counts = np.bincount(label[label != IGNORE_INDEX], minlength=num_classes)
        pixels += counts
        images += counts > 0
        height, width = (-(-side // strides[0]) * strides[0] for side in label.shape)
        padded = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
        padded[: label.shape[0], : label.shape[1]] = label
        for level, stride in enumerate(strides[:-1]):
            blocks = padded.reshape(height // stride, stride, width // stride, stride).transpose(0, 2, 1, 3)
            blocks = blocks.reshape(-1, stride * stride)
            for block in blocks:
                values = set(block[block != IGNORE_INDEX].tolist())
                cells[level] += [bool(values), len(values) == 1]
    return pixels, images, cells


@pytest.mark.parametrize("name", sorted(fixtures.BUILDERS))
def test_browser_on_each_dataset_fixture(name: str, tmp_path: Path, run_dir: Path) -> None:
    root = fixtures.build(name, tmp_path)
    out = tmp_path / "browse"
    cfg = compose_config(
        [f"data={name}", f"data.root={root}", *SMALL_DATA, "n=3", f"out={out}"], run_dir, "browse"
    )
    browse(cfg)

    samples = sorted((out / "samples").glob("*.png"))
    assert [path.name for path in samples] == ["sample_00.png", "sample_01.png", "sample_02.png"]
    assert all(Image.open(path).size[0] > 1000 for path in samples)  # image + labels + 3 U + 3 Y panels
    assert (out / "statistics.png").stat().st_size > 10_000

    # The whole training split, read straight from the files through the dataset's label table.
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    dataset = datamodule.train_set
    labels = [
        dataset.lut[np.asarray(Image.open(sample.label))].astype(np.int64) for sample in dataset.samples
    ]
    pixels, images, cells = direct_counts(labels, datamodule.num_classes, 4)

    classes = read_csv(out / "class_frequency.csv")
    assert [row["class"] for row in classes] == list(datamodule.classes)
    assert [int(row["pixels"]) for row in classes] == pixels.tolist()
    assert [int(row["images"]) for row in classes] == images.tolist()
    assert sum(float(row["pixel_share"]) for row in classes) == pytest.approx(1.0)
    unity = read_csv(out / "unity_cells.csv")
    assert [(int(row["level"]), int(row["stride"])) for row in unity] == [(1, 32), (2, 16), (3, 8)]
    assert [[int(row["cells"]), int(row["unity_cells"])] for row in unity] == cells.tolist()
    for row in unity:
        assert float(row["unity_share"]) == pytest.approx(int(row["unity_cells"]) / int(row["cells"]))


def test_browser_on_the_synthetic_default_counts_the_val_split_at_two_levels(
    tmp_path: Path, run_dir: Path
) -> None:
    out = tmp_path / "browse"
    overrides = ["data.size=64", "data.train_samples=5", "data.val_samples=3", "model.levels=2", "split=val"]
    cfg = compose_config([*overrides, "n=2", f"out={out}"], run_dir, "browse")
    browse(cfg)
    assert len(list((out / "samples").glob("*.png"))) == 2
    classes = read_csv(out / "class_frequency.csv")
    assert sum(int(row["pixels"]) for row in classes) == 3 * 64 * 64  # synthetic scenes ignore nothing
    assert max(int(row["images"]) for row in classes) <= 3
    assert [row["stride"] for row in read_csv(out / "unity_cells.csv")] == ["8"]


def test_ignored_cells_are_painted_in_grey_stripes() -> None:
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :8, 8:] = 1
    labels[0, :4, 12:] = 2  # the top-right 8x8 cell holds classes 1 and 2: a mix cell
    labels[0, 8:, :8] = IGNORE_INDEX  # a cell without a valid pixel
    targets = build_targets(labels, num_levels=2)  # level 1: 2x2 cells of 8x8
    panels = dict(target_panels(labels[0], targets, palette=[(10, 20, 30), (200, 0, 0), (0, 200, 0)]))
    unity = panels["U1 (stride 8): 67% unity"]
    assert (unity[:8, :8] == 255).all() and (unity[8:, 8:] == 255).all()  # unity cells: white
    assert (unity[:8, 8:] == 0).all()  # the mix cell: black
    assert set(np.unique(unity[8:, :8])) == set(IGNORED_GREYS)  # the empty cell: grey stripes
    semantic = panels["Y1 (stride 8)"]
    assert (semantic[:8, :8] == (10, 20, 30)).all()
    assert set(np.unique(semantic[:8, 8:])) == set(IGNORED_GREYS)  # a mix cell has no semantic target
    assert set(np.unique(panels["labels = Y2 (per pixel)"][8:, :8])) == set(IGNORED_GREYS)


def test_hatching_changes_only_the_ignored_pixels() -> None:
    rgb = np.full((8, 8, 3), 7, dtype=np.uint8)
    ignored = np.zeros((8, 8), dtype=bool)
    ignored[2:5, 3:7] = True
    hatched = hatch_ignored(rgb, ignored)
    assert (hatched[~ignored] == 7).all()
    assert set(np.unique(hatched[ignored])) == set(IGNORED_GREYS)


def test_a_missing_root_shows_the_expected_tree(tmp_path: Path, run_dir: Path) -> None:
    cfg = compose_config(
        ["data=ade20k", f"data.root={tmp_path / 'nowhere'}", f"out={tmp_path}"], run_dir, "browse"
    )
    with pytest.raises(LayoutError, match=r"(?s)data.root not found: .*nowhere.*Expected layout"):
        browse(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [("split=test", "split='test' is not one of train, val"), ("n=-1", "n=-1 must be")],
)
def test_bad_options_name_the_key(override: str, message: str, tmp_path: Path, run_dir: Path) -> None:
    cfg = compose_config([override, f"out={tmp_path}"], run_dir, "browse")
    with pytest.raises(ValueError, match=message):
        browse(cfg)


@pytest.mark.slow
def test_the_command_line_writes_into_out_with_a_progress_bar(tmp_path: Path) -> None:
    root = fixtures.build("ade20k", tmp_path)
    out = tmp_path / "pictures"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sfseg.data.browse",
            "data=ade20k",
            f"data.root={root}",
            "n=2",
            f"out={out}",
            *SMALL_DATA,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "counting the train split: 100%" in result.stderr  # tqdm's bar
    assert "4 images; most frequent classes" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == [
        "class_frequency.csv",
        "samples",
        "statistics.png",
        "unity_cells.csv",
    ]
