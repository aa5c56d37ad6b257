"""Converters `python -m sfseg.data.prepare` on .mat fixtures written in the releases' format."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from sfseg.data.datasets import PASCAL_CONTEXT59_RAW_IDS, read_label
from sfseg.data.prepare import ConversionError, convert_coco_stuff10k, convert_pascal_context59, main
from sfseg.data.real import COCOStuff10kDataModule, PascalContext59DataModule
from tests.fixtures import HEIGHT, WIDTH, make_coco_stuff10k_release, make_pascal_context_release


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --- COCO-Stuff-10k ----------------------------------------------------------------------------------------


def test_coco_stuff10k_labels_are_field_s_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture):
    src = make_coco_stuff10k_release(tmp_path)
    dst = tmp_path / "converted"
    assert main(["coco_stuff10k", str(src), str(dst)]) == 0
    out, err = capsys.readouterr()
    assert "annotations: 6 written, 0 already there" in out and f"data.root={dst}" in out
    assert "coco_stuff10k labels: 100%" in err  # the tqdm progress bar

    for mat in sorted((src / "annotations").glob("*.mat")):
        png = dst / "annotations" / f"{mat.stem}.png"
        assert np.array_equal(read_label(png), loadmat(mat)["S"])
        assert (dst / "images" / f"{mat.stem}.jpg").read_bytes() == (
            src / "images" / f"{mat.stem}.jpg"
        ).read_bytes()
    for split in ("train", "test"):
        assert (dst / "imageLists" / f"{split}.txt").read_text() == (
            src / "imageLists" / f"{split}.txt"
        ).read_text()

    # The datamodule reads what the converter wrote: 1-based ids minus the unused ones -> 0..170.
    module = COCOStuff10kDataModule(root=str(dst), crop_size=64)
    module.setup("fit")
    assert (len(module.train_set), len(module.val_set)) == (4, 2)
    sample = module.val_set.samples[0]
    raw = loadmat(src / "annotations" / f"{sample.label.stem}.mat")["S"].astype(np.int64)
    label = module.val_set[0]["label"][:, : raw.shape[1]].numpy()
    offset = np.searchsorted([12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91], raw, side="right")
    assert np.array_equal(label, np.where(raw == 0, 255, raw - 1 - offset))


def test_rerun_skips_finished_files_and_resumes_a_killed_run(tmp_path: Path, capsys: pytest.CaptureFixture):
    src = make_coco_stuff10k_release(tmp_path)
    dst = tmp_path / "converted"
    counts = convert_coco_stuff10k(src, dst)
    assert counts["annotations"] == (6, 0)
    before = tree(dst)

    assert convert_coco_stuff10k(src, dst) == {"annotations": (0, 6), "images": (0, 6), "imageLists": (0, 2)}
    assert tree(dst) == before  # nothing rewritten

    # A run killed while writing one label leaves only a .partial file, never a half <id>.png.
    victim = dst / "annotations" / "COCO_train2014_000000000078.png"
    victim.unlink()
    victim.with_name(victim.name + ".partial").write_bytes(b"half a png")
    assert convert_coco_stuff10k(src, dst)["annotations"] == (1, 5)
    assert tree(dst).keys() == before.keys()
    assert np.array_equal(
        read_label(victim), loadmat(src / "annotations" / "COCO_train2014_000000000078.mat")["S"]
    )


def test_refuses_to_write_into_its_input(tmp_path: Path, capsys: pytest.CaptureFixture):
    src = make_coco_stuff10k_release(tmp_path)
    before = tree(src)
    for dst in (src, src / "converted", src / "annotations"):
        with pytest.raises(ConversionError, match="never writes into its input"):
            convert_coco_stuff10k(src, dst)
    assert main(["coco_stuff10k", str(src), str(src)]) == 1
    assert "is the same folder as src" in capsys.readouterr().err
    assert tree(src) == before


def test_bad_mat_files_are_named(tmp_path: Path):
    src = make_coco_stuff10k_release(tmp_path)
    mat = src / "annotations" / "COCO_train2014_000000000079.mat"
    savemat(mat, {"labels": np.zeros((4, 4))})
    with pytest.raises(
        ConversionError, match=r"COCO_train2014_000000000079.mat has no field 'S' \(fields: \['labels'\]\)"
    ):
        convert_coco_stuff10k(src, tmp_path / "a")
    savemat(mat, {"S": np.array([[0, 183], [300, 5]], dtype=np.uint16)})
    with pytest.raises(ConversionError, match=r"values 183, 300 outside the ids 0..182"):
        convert_coco_stuff10k(src, tmp_path / "b")
    mat.write_bytes(b"garbage")
    with pytest.raises(ConversionError, match=r"cannot read .*COCO_train2014_000000000079.mat"):
        convert_coco_stuff10k(src, tmp_path / "c")


def test_missing_release_folder_shows_the_expected_tree(tmp_path: Path):
    with pytest.raises(ConversionError, match=r"not found: .*imageLists") as error:
        convert_coco_stuff10k(tmp_path / "nothing", tmp_path / "dst")
    assert "annotations/COCO_train2014_000000000077.mat" in str(error.value)


# --- Pascal-Context ----------------------------------------------------------------------------------------


def test_pascal_context_maps_the_459_vocabulary_to_59_classes(tmp_path: Path):
    mats, devkit = make_pascal_context_release(tmp_path)
    label_map = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)  # the size of the fixture's images
    label_map[:2, :4] = [[0, 1, 2, 9], [458, 459, 457, 284]]
    savemat(mats / "2008_000002.mat", {"LabelMap": label_map})
    assert main(["pascal_context59", str(mats), str(devkit)]) == 0

    png = devkit / "VOC2010" / "SegmentationClassContext" / "2008_000002.png"
    # mmsegmentation's convention: 0 = background (any id outside the 59), k = k-th of the 59 raw ids.
    assert read_label(png)[:2, :4].tolist() == [
        [0, 0, 1, 2],
        [59, 0, 0, PASCAL_CONTEXT59_RAW_IDS.index(284) + 1],
    ]
    lists = devkit / "VOC2010" / "ImageSets" / "SegmentationContext"
    # Main's ids without a .mat file (2010_00000x) are left out.
    assert (lists / "train.txt").read_text().split() == [
        "2008_000002",
        "2008_000003",
        "2008_000007",
        "2008_000008",
    ]
    assert (lists / "val.txt").read_text().split() == ["2008_000009", "2008_000010"]

    module = PascalContext59DataModule(root=str(devkit), crop_size=64)
    module.setup("fit")
    assert (len(module.train_set), len(module.val_set)) == (4, 2)
    index = [s.label.name for s in module.train_set.samples].index("2008_000002.png")
    _, label = module.train_set.load(index)
    assert label[:2, :4].tolist() == [[255, 255, 0, 1], [58, 255, 255, PASCAL_CONTEXT59_RAW_IDS.index(284)]]


def test_pascal_context_needs_the_voc_lists(tmp_path: Path):
    mats, devkit = make_pascal_context_release(tmp_path)
    os.remove(devkit / "VOC2010" / "ImageSets" / "Main" / "val.txt")
    with pytest.raises(ConversionError, match=r"not found: .*ImageSets/Main/val.txt") as error:
        convert_pascal_context59(mats, devkit)
    assert "LabelMap" in str(error.value)
    with pytest.raises(ConversionError, match="inside src"):
        convert_pascal_context59(mats, mats / "VOCdevkit")


def test_pascal_context_label_out_of_vocabulary_is_named(tmp_path: Path):
    mats, devkit = make_pascal_context_release(tmp_path)
    savemat(mats / "2008_000003.mat", {"LabelMap": np.array([[460, 1]], dtype=np.uint16)})
    with pytest.raises(ConversionError, match=r"2008_000003.mat holds values 460 outside the ids 0..459"):
        convert_pascal_context59(mats, devkit)
