"""data=folder: a user's own image/label folder by configuration only, in two layouts (raw ids with
reduce_zero_label and list files; colour labels with a _gt.png suffix and a YAML palette), 16-bit ids,
the classes file, every bad input named, `validate` and `browse`, and train/eval/predict through the
command lines."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from PIL import Image

from sfseg.data.browse import browse
from sfseg.data.classes import generated_palette, read_classes
from sfseg.data.datasets import read_colour_label, read_label
from sfseg.data.folder import FolderDataModule
from sfseg.data.real import DatasetProblems
from sfseg.inference import load
from sfseg.pyramid import IGNORE_INDEX
from sfseg.visualize import mask_image
from tests.conftest import compose_config
from tests.fixtures import (
    FOLDER_COLOUR_CLASSES,
    FOLDER_COLOUR_OVERRIDES,
    FOLDER_IDS_CLASSES,
    FOLDER_IDS_OVERRIDES,
    FOLDER_IDS_SPLITS,
    HEIGHT,
    WIDTH,
    make_folder_colours,
    make_folder_ids,
    write_image,
    write_label,
)
from tests.processes import run_module
from tests.test_datasets import TWO_STEPS, run_validate, train_two_steps
from tests.test_predict import untrained_checkpoint
from tests.test_reproducibility import ENV

SMALL = ["data.crop_size=64", "data.batch_size=2", "data.num_workers=0"]
PALETTE = list(FOLDER_COLOUR_CLASSES.values())


def folder(overrides: list[str], root: Path, run_dir: Path, stage: str | None = "fit") -> FolderDataModule:
    """The datamodule `python -m sfseg.train` would build from these overrides (set up for `stage`)."""
    module = instantiate(compose_config([*overrides, f"data.root={root}", *SMALL], run_dir).data)
    if stage is not None:
        module.setup(stage)
    return module


def ids_module(tmp_path: Path, run_dir: Path, *extra: str, stage: str | None = "fit") -> FolderDataModule:
    return folder([*FOLDER_IDS_OVERRIDES, *extra], make_folder_ids(tmp_path), run_dir, stage)


def colour_module(tmp_path: Path, run_dir: Path, *extra: str, stage: str | None = "fit") -> FolderDataModule:
    return folder([*FOLDER_COLOUR_OVERRIDES, *extra], make_folder_colours(tmp_path), run_dir, stage)


# --- the two layouts ------------------------------------------------------------------------------------


def test_raw_ids_with_reduce_zero_label_and_list_files(tmp_path: Path, run_dir: Path):
    module = ids_module(tmp_path, run_dir)
    assert module.classes == FOLDER_IDS_CLASSES
    # Only the listed ids, not the image each split folder holds besides them.
    assert [s.image.stem for s in module.train_set.samples] == FOLDER_IDS_SPLITS["training"]
    assert [s.image.stem for s in module.val_set.samples] == FOLDER_IDS_SPLITS["validation"]
    # reduce_zero_label: raw 0 and 255 -> ignore, k -> k - 1 (the label is padded to 96 for validation).
    for index, sample in enumerate(module.val_set.samples):
        raw = read_label(sample.label)
        label = module.val_set[index]["label"][:, :WIDTH].numpy()
        np.testing.assert_array_equal(label, np.where((raw == 0) | (raw == 255), IGNORE_INDEX, raw - 1))
    assert module.label_values == [1, 2, 3, 4]
    # No palette given: distinct colours, none of them black (black draws ignored pixels).
    assert module.palette == generated_palette(4) and len(set(module.palette)) == 4
    assert (0, 0, 0) not in module.palette


def test_colour_labels_with_a_palette_and_an_ignored_colour(tmp_path: Path, run_dir: Path):
    module = colour_module(tmp_path, run_dir)
    assert module.classes == tuple(FOLDER_COLOUR_CLASSES) and list(module.palette) == PALETTE
    assert [s.label.name for s in module.train_set.samples] == [f"slide{i}_gt.png" for i in range(4)]
    for index, sample in enumerate(module.val_set.samples):
        rgb = read_colour_label(sample.label)
        label = module.val_set[index]["label"][:, :WIDTH].numpy()
        expected = np.full(label.shape, IGNORE_INDEX)  # black, the ignored colour
        for class_id, colour in enumerate(PALETTE):
            expected[(rgb == colour).all(-1)] = class_id
        np.testing.assert_array_equal(label, expected)
        assert (label == IGNORE_INDEX).any() and (label != IGNORE_INDEX).any()
    assert module.label_values == [list(colour) for colour in PALETTE]


def test_sixteen_bit_ids_are_read_whole(tmp_path: Path, run_dir: Path):
    root = tmp_path / "depth_classes"
    root.mkdir()
    (root / "classes.json").write_text(
        json.dumps({"classes": ["low", "mid", "high"], "ids": [0, 1000, 40000]})
    )
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_image(root / "images" / split / "x.jpg", rng)
        raw = np.full((HEIGHT, WIDTH), 40000, dtype=np.uint16)
        raw[:16], raw[16:32, :8] = 0, 1000
        raw[40:, 40:] = 65535  # the ignored value
        write_label(root / "annotations" / split / "x.png", raw)
    overrides = ["data=folder", "data.classes=classes.json", "data.ignore_values=[65535]"]
    module = folder(overrides, root, run_dir)
    assert read_label(module.val_set.samples[0].label).dtype == np.uint16
    expected = np.select([raw == 0, raw == 1000, raw == 40000], [0, 1, 2], IGNORE_INDEX)
    np.testing.assert_array_equal(module.val_set[0]["label"][:, :WIDTH].numpy(), expected)
    assert module.label_values == [0, 1000, 40000]

    bad = np.full((HEIGHT, WIDTH), 1000, dtype=np.uint16)
    bad[0, :3] = 1001
    write_label(root / "annotations" / "val" / "x.png", bad)
    with pytest.raises(ValueError, match=r"label values 1001 \(3 px\) in .*x.png stand for no class"):
        module.val_set[0]


# --- data.classes -----------------------------------------------------------------------------------------


def test_classes_from_yaml_json_text_or_inline(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("classes: [a, b]\npalette: [[1, 2, 3], [4, 5, 6]]\nids: [3, 7]\n")
    (tmp_path / "c.json").write_text('{"classes": ["a", "b"]}')
    (tmp_path / "c.txt").write_text("a\n\nb\n")
    yaml_table = read_classes(str(tmp_path / "c.yaml"))
    assert (yaml_table.names, yaml_table.palette, yaml_table.ids) == (
        ("a", "b"),
        ((1, 2, 3), (4, 5, 6)),
        (3, 7),
    )
    for value in (str(tmp_path / "c.json"), "c.txt", ["a", "b"], {"classes": ["a", "b"]}):
        table = read_classes(value, root=tmp_path)  # "c.txt" is found under data.root
        assert (table.names, table.palette, table.ids) == (("a", "b"), None, None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"data.classes=.*missing.yaml: no such file"),
        ("classes: [a, b\n", r"data.classes=.*c.yaml: cannot read the classes file"),
        ("classes: [a, b]\npallete: [[1, 2, 3], [4, 5, 6]]\n", r"unknown keys \['pallete'\]"),
        ("classes: [a, b]\npalette: [[1, 2, 3]]\n", r"c.yaml: the palette has 1 colours for 2 classes"),
        ("classes: [a, b]\npalette: [[1, 2, 3], [4, 5, 256]]\n", r"\[4, 5, 256\] is not a colour"),
        ("classes: [a, a]\n", r"class names must be distinct; repeated: \['a'\]"),
        ("classes: []\n", r"classes must be a non-empty list of class names"),
        ("classes: [a, b]\nids: [1]\n", r"ids has 1 values for 2 classes"),
        ("classes: [a, b]\nids: [1, 70000]\n", r"70000 is not a raw label value \(an integer 0..65535\)"),
    ],
)
def test_a_bad_classes_file_names_data_classes(content: str | None, message: str, tmp_path: Path):
    path = tmp_path / ("missing.yaml" if content is None else "c.yaml")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_classes(str(path))


@pytest.mark.parametrize(
    ("layout", "overrides", "message"),
    [
        ("ids", ["data.label_format=colours"], r"data.label_format='colours' is not one of ids, colors"),
        ("ids", ["data.label_format=colors"], r"data.label_format=colors needs each class's colour, and .*classes.txt has no palette"),
        ("colours", ["data.reduce_zero_label=true"], r"data.reduce_zero_label applies to data.label_format=ids"),
        ("colours", ["data.ignore_values=[[255,0,0]]"], r"data.ignore_values: \(255, 0, 0\) is the colour of class 'cell'"),
        ("colours", ["data.ignore_values=[0]"], r"data.ignore_values \(\[r, g, b\] colours, as data.label_format=colors\): 0 is not a colour"),
        ("ids", ["data.ignore_values=[[0,0,0]]"], r"data.ignore_values \(raw values, as data.label_format=ids\): \[0, 0, 0\] is not a raw label value"),
        ("ids", ["data.reduce_zero_label=false", "data.ignore_values=[3]"], r"data.ignore_values \[3\] are raw ids of classes"),
        ("ids", ["data.classes=[a,b,c,d]", "data.reduce_zero_label=false", "data.list_file=null", "data.image_dir=images", "data.label_dir=annotations"], r"would read the same files: put \{split\} into data.image_dir"),
        ("ids", ["data.image_dir='images/{part}'"], r"data.image_dir='images/\{part\}' is not a path template"),
        ("ids", ["data.label_suffix=''"], r"data.label_suffix must be the end of the file names"),
    ],
)  # fmt: skip
def test_inconsistent_keys_name_the_key(
    layout: str, overrides: list[str], message: str, tmp_path: Path, run_dir: Path
):
    make = ids_module if layout == "ids" else colour_module
    with pytest.raises(Exception, match=message):
        make(tmp_path, run_dir, *overrides, stage=None)


def test_reduce_zero_label_and_ids_exclude_each_other(tmp_path: Path, run_dir: Path):
    root = make_folder_ids(tmp_path)
    (root / "classes.yaml").write_text(
        yaml.safe_dump({"classes": list(FOLDER_IDS_CLASSES), "ids": [1, 2, 3, 4]})
    )
    with pytest.raises(Exception, match=r"data.reduce_zero_label=true and .*classes.yaml gives ids"):
        folder([*FOLDER_IDS_OVERRIDES, "data.classes=classes.yaml"], root, run_dir, stage=None)
    # Without reduce_zero_label the ids say the same: 1..4 are the classes, 0 and 255 must be ignored.
    module = folder(
        [
            *FOLDER_IDS_OVERRIDES,
            "data.classes=classes.yaml",
            "data.reduce_zero_label=false",
            "data.ignore_values=[0,255]",
        ],
        root,
        run_dir,
    )
    assert torch.equal(
        module.val_set[0]["label"], ids_module(tmp_path / "again", run_dir).val_set[0]["label"]
    )


# --- bad input ----------------------------------------------------------------------------------------------


def test_unpaired_files_name_both_paths(tmp_path: Path, run_dir: Path):
    root = make_folder_colours(tmp_path)
    (root / "gt" / "train" / "slide1_gt.png").unlink()
    (root / "img" / "val" / "slide0.png").unlink()
    with pytest.raises(DatasetProblems) as error:
        folder(FOLDER_COLOUR_OVERRIDES, root, run_dir)
    message = str(error.value)
    assert (
        f"image without label: {root / 'img/train/slide1.png'} (expected {root / 'gt/train/slide1_gt.png'})"
        in message
    )
    assert (
        f"label without image: {root / 'gt/val/slide0_gt.png'} (expected {root / 'img/val/slide0.png'})"
        in message
    )


def test_a_listed_id_without_label_names_both_paths(tmp_path: Path, run_dir: Path):
    root = make_folder_ids(tmp_path)
    (root / "annotations" / "training" / "a2.png").unlink()
    with pytest.raises(DatasetProblems) as error:
        folder(FOLDER_IDS_OVERRIDES, root, run_dir)
    assert (
        f"image without label: {root / 'images/training/a2.jpg'} (expected {root / 'annotations/training/a2.png'}, "
        f"listed in {root / 'lists/training.txt'})"
    ) in str(error.value)


def test_size_mismatch_names_the_file_and_both_sizes(tmp_path: Path, run_dir: Path):
    module = colour_module(tmp_path, run_dir)
    label = module.train_set.samples[2].label
    write_label(label, np.zeros((HEIGHT, WIDTH + 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"sizes differ: .*slide2.png is 80x64, {label} is 96x64"):
        module.train_set[2]


def test_a_colour_of_no_class_names_the_file_the_colour_and_its_pixels(tmp_path: Path, run_dir: Path):
    module = colour_module(tmp_path, run_dir)
    label = module.train_set.samples[1].label
    rgb = read_colour_label(label).copy()
    rgb[0, :5], rgb[1, :2] = (9, 9, 9), (254, 0, 0)  # a stray colour, and an anti-aliased red
    write_label(label, rgb)
    message = (
        rf"label colours \(9, 9, 9\) \(5 px\), \(254, 0, 0\) \(2 px\) in {label} stand for no class and are not "
        r"ignored; allowed colours: the 3 class colours of the palette; ignored: \(0, 0, 0\) "
        r"\(classes: data.classes=.*classes.yaml; ignored: data.ignore_values\)"
    )
    with pytest.raises(ValueError, match=message):
        module.train_set[1]


def test_a_raw_value_of_no_class_names_the_file_the_value_and_its_pixels(tmp_path: Path, run_dir: Path):
    module = ids_module(tmp_path, run_dir)
    label = module.val_set.samples[0].label
    raw = read_label(label).copy()
    raw[5:7, 5:9] = 9
    write_label(label, raw)
    with pytest.raises(
        ValueError, match=rf"label values 9 \(8 px\) in {label} stand for no class .*0-4, 255"
    ):
        module.val_set[0]


def test_an_empty_split_names_the_keys(tmp_path: Path, run_dir: Path):
    with pytest.raises(DatasetProblems) as error:
        colour_module(tmp_path, run_dir, "data.image_suffix=.jpg", "data.label_suffix=.jpg")
    message = str(error.value)
    assert "the train split (data.train_split=train)" in message and "has no image/label pair" in message
    assert "img/{split}/<id>.jpg  <- data.image_dir, data.image_suffix" in message


def test_a_missing_folder_names_its_key(tmp_path: Path, run_dir: Path):
    with pytest.raises(FileNotFoundError) as error:
        colour_module(tmp_path, run_dir, "data.image_dir='images/{split}'")
    assert "image folder of split 'train' not found" in str(error.value)
    assert "images/{split}/<id>.png  <- data.image_dir" in str(error.value)


def test_validate_lists_every_bad_file_of_a_split(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = make_folder_colours(tmp_path)
    args = [*FOLDER_COLOUR_OVERRIDES, f"data.root={root}", "--workers", "2"]
    assert run_validate(args, capsys)[:2] == (0, f"ok: folder at {root}: train 4 pairs, val 2 pairs\n")
    for index in (0, 3):
        path = root / "gt" / "train" / f"slide{index}_gt.png"
        rgb = read_colour_label(path).copy()
        rgb[: index + 1, 0] = (9, 9, 9)
        write_label(path, rgb)
    (root / "img" / "train" / "slide2.png").unlink()
    code, _, err = run_validate(args, capsys)
    assert code == 1 and "3 problem(s) in folder" in err
    assert f"(9, 9, 9) (1 px) in {root / 'gt/train/slide0_gt.png'}" in err
    assert f"(9, 9, 9) (4 px) in {root / 'gt/train/slide3_gt.png'}" in err
    assert f"label without image: {root / 'gt/train/slide2_gt.png'}" in err


def test_validate_reports_an_empty_split_and_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = make_folder_colours(tmp_path)
    for path in (root / "img" / "val").iterdir():
        path.unlink()
    for path in (root / "gt" / "val").iterdir():
        path.unlink()
    code, _, err = run_validate([*FOLDER_COLOUR_OVERRIDES, f"data.root={root}"], capsys)
    assert code == 1 and "the val split (data.val_split=val)" in err
    code, _, err = run_validate(
        [*FOLDER_COLOUR_OVERRIDES, f"data.root={root}", "data.classes=[a,b,c]"], capsys
    )
    assert code == 1 and "error: data.label_format=colors needs each class's colour" in err


def test_validate_and_browse_read_the_folder(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture):
    root = make_folder_ids(tmp_path)
    data = [*FOLDER_IDS_OVERRIDES, f"data.root={root}", *SMALL]
    assert run_validate(data, capsys)[:2] == (0, f"ok: folder at {root}: train 4 pairs, val 2 pairs\n")
    out = tmp_path / "browse"
    browse(compose_config([*data, "n=1", f"out={out}"], run_dir, "browse"))
    assert "4 images; most frequent classes" in capsys.readouterr().out
    with (out / "class_frequency.csv").open() as handle:
        assert [row["class"] for row in csv.DictReader(handle)] == list(FOLDER_IDS_CLASSES)
    assert (out / "samples" / "sample_00.png").is_file()


# --- checkpoints and masks in the dataset's own values -----------------------------------------------------


@pytest.mark.parametrize(
    ("label_values", "mode"),
    [([1, 2, 3], "P"), ([0, 1000, 40000], "I;16"), ([[255, 0, 0], [0, 255, 0], [0, 0, 255]], "RGB")],
)
def test_a_checkpoint_keeps_names_palette_and_label_values(label_values: list, mode: str, tmp_path: Path):
    names = list(FOLDER_COLOUR_CLASSES)
    path = untrained_checkpoint(tmp_path / "model.ckpt", names, palette=PALETTE, label_values=label_values)
    predictor = load(path, device="cpu")
    assert predictor.class_names == names and predictor.palette == [tuple(colour) for colour in PALETTE]
    # ids=raw masks hold the dataset's own values: 8-bit ids, 16-bit ids, or the label colours.
    mask = np.array([[0, 1], [2, 2]])
    image = mask_image(mask, predictor.label_ids("raw"), predictor.palette)
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image), np.asarray(label_values)[mask])


# --- the command lines ---------------------------------------------------------------------------------------


def sfseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = run_module(*args, cwd=cwd, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_eval_predict_on_a_folder(tmp_path: Path):
    root = make_folder_ids(tmp_path)
    data = [*FOLDER_IDS_OVERRIDES, f"data.root={root}"]
    run = tmp_path / "run"
    sfseg("sfseg.train", *data, *TWO_STEPS, "num_pyramid_images=1", f"hydra.run.dir={run}", cwd=tmp_path)
    trained = json.loads((run / "metrics.json").read_text())
    assert list(trained["per_class_iou"]) == list(FOLDER_IDS_CLASSES)

    ckpt = run / "checkpoints" / "last.ckpt"
    evaluated = sfseg("sfseg.eval", f"ckpt_path={ckpt}", *data, "data.num_workers=0", cwd=tmp_path)
    with (run / "eval" / "per_class.csv").open() as handle:
        assert [row["class"] for row in csv.DictReader(handle)] == list(FOLDER_IDS_CLASSES)
    assert all(name in evaluated.stdout for name in FOLDER_IDS_CLASSES)

    # The checkpoint alone names the classes and knows their raw ids: no classes file needed.
    (root / "classes.txt").unlink()
    out = tmp_path / "predicted"
    sfseg(
        "sfseg.predict",
        f"ckpt_path={ckpt}",
        f"input={root / 'images' / 'validation'}",
        f"output={out}",
        "ids=raw",
        cwd=tmp_path,
    )
    predictor = load(ckpt, device="cpu")
    assert predictor.class_names == list(FOLDER_IDS_CLASSES)
    image = root / "images" / "validation" / "b1.jpg"
    with Image.open(out / "b1_mask.png") as mask:
        raw, palette = np.asarray(mask), np.asarray(mask.getpalette()).reshape(-1, 3)
    classes = predictor.predict(np.asarray(Image.open(image).convert("RGB"))).mask
    np.testing.assert_array_equal(raw, classes + 1)  # reduce_zero_label: class k is raw k + 1
    assert palette[1:5].tolist() == [list(colour) for colour in generated_palette(4)]


@pytest.mark.slow
def test_trains_on_colour_labels_and_records_them(tmp_path: Path, run_dir: Path):
    model = train_two_steps([*FOLDER_COLOUR_OVERRIDES, f"data.root={make_folder_colours(tmp_path)}"], run_dir)
    assert 0.0 <= model.last_val_scores["mIoU"] <= 1.0
    assert model.class_names == list(FOLDER_COLOUR_CLASSES)
    assert (model.hparams.palette, model.hparams.label_values) == ([list(c) for c in PALETTE],) * 2
