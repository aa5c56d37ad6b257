"""Tiny fake datasets in each release's real on-disk layout and raw label format, and data=folder trees.

Images are 64x80 (H x W) JPEGs (Cityscapes: PNGs); labels are blocky (16x16 blocks of one raw value) so
that the pyramid has unity cells. `build(name, tmp_path)` returns the data.root a datamodule reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy.io import savemat

from sfseg.data.datasets import (
    CITYSCAPES_NUM_LABEL_IDS,
    COCO_STUFF_USED_IDS,
    PASCAL_CONTEXT59_RAW_IDS,
    PASCAL_CONTEXT_VOCABULARY_SIZE,
)
from sfseg.data.prepare import convert_coco_stuff10k, convert_pascal_context59

HEIGHT, WIDTH = 64, 80
BLOCK = 16


def blocky(
    rng: np.random.Generator, values: np.ndarray, height: int = HEIGHT, width: int = WIDTH
) -> np.ndarray:
    """An HxW map of 16x16 blocks, each one value drawn from `values`."""
    grid = rng.choice(values, size=(-(-height // BLOCK), -(-width // BLOCK)))
    return np.kron(grid, np.ones((BLOCK, BLOCK), dtype=grid.dtype))[:height, :width]


def write_image(path: Path, rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_label(path: Path, label: np.ndarray) -> None:
    """An 8-bit single-channel PNG, or a 16-bit one for a uint16 label, or RGB for HxWx3 colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = label if label.dtype == np.uint16 else label.astype(np.uint8)
    Image.fromarray(label).save(path)


def write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{sample_id}\n" for sample_id in ids))


def make_ade20k(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """ADEChallengeData2016: raw PNG values 0 (other) .. 150."""
    rng = np.random.default_rng(seed)
    root = root / "ADEChallengeData2016"
    for split, count in (counts or {"training": 4, "validation": 2}).items():
        prefix = "ADE_train" if split == "training" else "ADE_val"
        for i in range(1, count + 1):
            write_image(root / "images" / split / f"{prefix}_{i:08d}.jpg", rng)
            write_label(root / "annotations" / split / f"{prefix}_{i:08d}.png", blocky(rng, np.arange(151)))
    return root


def make_coco_stuff164k(root: Path, seed: int = 0) -> Path:
    """COCO 2017 images and stuffthingmaps PNGs: 0-based ids 0..181 (11 unused), 255 = unlabeled."""
    rng = np.random.default_rng(seed)
    root = root / "coco_stuff164k"
    values = np.array([raw - 1 for raw in COCO_STUFF_USED_IDS] + [255])
    for split, count in (("train2017", 4), ("val2017", 2)):
        for i in range(count):
            name = f"{1000 * (split == 'val2017') + i:012d}"
            write_image(root / "images" / split / f"{name}.jpg", rng)
            write_label(root / "annotations" / split / f"{name}.png", blocky(rng, values))
    return root


def make_coco_stuff10k_release(root: Path, seed: int = 0) -> Path:
    """cocostuff-10k-v1.1 as released: images/*.jpg, annotations/*.mat (uint16 field S), imageLists."""
    rng = np.random.default_rng(seed)
    root = root / "cocostuff-10k-v1.1"
    values = np.array([0, *COCO_STUFF_USED_IDS], dtype=np.uint16)
    ids = {"train": [f"COCO_train2014_{i:012d}" for i in (77, 78, 79, 80)], "test": ["COCO_train2014_000000000090", "COCO_train2014_000000000091"]}  # fmt: skip
    for split, names in ids.items():
        write_list(root / "imageLists" / f"{split}.txt", names)
        for name in names:
            write_image(root / "images" / f"{name}.jpg", rng)
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            savemat(root / "annotations" / f"{name}.mat", {"S": blocky(rng, values), "names": ["unlabeled"]})
    return root


def make_pascal_context_release(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Pascal-Context's per-image .mat files (field LabelMap, 459-class ids) and a VOC2010 devkit.

    Returns (folder of .mat files, VOCdevkit). VOC2010's Main lists hold one id without a .mat file,
    which the converter must leave out of the Pascal-Context lists.
    """
    rng = np.random.default_rng(seed)
    mats, devkit = root / "trainval", root / "VOCdevkit"
    mats.mkdir(parents=True, exist_ok=True)
    # Half the draws from the 59 classes, half from the other 400 ids (-> background) and 0.
    others = np.setdiff1d(np.arange(PASCAL_CONTEXT_VOCABULARY_SIZE + 1), PASCAL_CONTEXT59_RAW_IDS)
    values = np.concatenate([PASCAL_CONTEXT59_RAW_IDS, rng.choice(others, len(PASCAL_CONTEXT59_RAW_IDS))])
    ids = {"train": ["2008_000002", "2008_000003", "2008_000007", "2008_000008"], "val": ["2008_000009", "2008_000010"]}  # fmt: skip
    for split, names in ids.items():
        write_list(
            devkit / "VOC2010" / "ImageSets" / "Main" / f"{split}.txt", [*names, f"2010_00000{len(names)}"]
        )
        for name in names:
            write_image(devkit / "VOC2010" / "JPEGImages" / f"{name}.jpg", rng)
            savemat(mats / f"{name}.mat", {"LabelMap": blocky(rng, values).astype(np.uint16)})
    return mats, devkit


def make_coco_stuff10k(root: Path, seed: int = 0) -> Path:
    """The release converted by `python -m sfseg.data.prepare coco_stuff10k`."""
    dst = root / "cocostuff-10k"
    convert_coco_stuff10k(make_coco_stuff10k_release(root, seed), dst)
    return dst


def make_pascal_context59(root: Path, seed: int = 0) -> Path:
    """The VOCdevkit after `python -m sfseg.data.prepare pascal_context59`."""
    mats, devkit = make_pascal_context_release(root, seed)
    convert_pascal_context59(mats, devkit)
    return devkit


CITYSCAPES_FRAMES = {"train": {"aachen": 2, "bochum": 2}, "val": {"frankfurt": 2}}  # frames per city


def make_cityscapes(root: Path, seed: int = 0) -> Path:
    """leftImg8bit and gtFine in their city folders, labelIds 0..33 (19 evaluated, the others ignored),
    and the gtFine files next to them that the layout does not read."""
    rng = np.random.default_rng(seed)
    root = root / "cityscapes"
    for split, cities in CITYSCAPES_FRAMES.items():
        for city, frames in cities.items():
            for frame in range(frames):
                name = f"{city}_000000_{frame:06d}"
                write_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", rng)
                label_ids = blocky(rng, np.arange(CITYSCAPES_NUM_LABEL_IDS))
                write_label(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label_ids)
                write_label(root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png", label_ids)
                (root / "gtFine" / split / city / f"{name}_gtFine_polygons.json").write_text("{}")
    return root


CAMVID_COUNTS = {"train": 4, "val": 2, "test": 3}


def make_camvid(
    root: Path, seed: int = 0, counts: dict[str, int] | None = None, size: tuple[int, int] = (HEIGHT, WIDTH)
) -> Path:
    """SegNet's CamVid release: <split>/<name>.png RGB images and <split>annot/<name>.png ids 0..10, 11 =
    void, named by sequence and frame as the release names them (0001TP_006690.png); `size` (H, W): the
    release's is 360 x 480."""
    rng = np.random.default_rng(seed)
    root = root / "camvid"
    for split, count in (counts or CAMVID_COUNTS).items():
        for frame in range(count):
            name = f"0001TP_{6690 + 30 * frame:06d}.png"
            write_image(root / split / name, rng, *size)
            write_label(root / f"{split}annot" / name, blocky(rng, np.arange(12), *size))
    return root


# data=folder: raw ids with reduce_zero_label and a list file (mmsegmentation's ADE20K-style layout).
FOLDER_IDS_CLASSES = ("field", "road", "roof", "water")
FOLDER_IDS_SPLITS = {"training": ["a1", "a2", "a3", "a4"], "validation": ["b1", "b2"]}


def make_folder_ids(root: Path, seed: int = 0) -> Path:
    """images/{split}/<id>.jpg, annotations/{split}/<id>.png (0 = unlabeled, 1..4, 255 = border),
    lists/{split}.txt, classes.txt; each split folder also holds an image its list leaves out."""
    rng = np.random.default_rng(seed)
    root = root / "aerial"
    for split, ids in FOLDER_IDS_SPLITS.items():
        write_list(root / "lists" / f"{split}.txt", ids)
        for sample_id in [*ids, f"unlisted_{split}"]:
            write_image(root / "images" / split / f"{sample_id}.jpg", rng)
            label = blocky(rng, np.arange(len(FOLDER_IDS_CLASSES) + 1))
            label[:2] = 255
            write_label(root / "annotations" / split / f"{sample_id}.png", label)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in FOLDER_IDS_CLASSES))
    return root


FOLDER_IDS_OVERRIDES = [
    "data=folder",
    "data.image_dir='images/{split}'",
    "data.label_dir='annotations/{split}'",
    "data.list_file='lists/{split}.txt'",
    "data.train_split=training",
    "data.val_split=validation",
    "data.classes=classes.txt",
    "data.reduce_zero_label=true",
]

# data=folder: colour labels with a _gt.png suffix, a YAML classes file with a palette, black = ignore.
FOLDER_COLOUR_CLASSES = {"cell": (255, 0, 0), "nucleus": (0, 255, 0), "background": (0, 0, 255)}
FOLDER_IGNORE_COLOUR = (0, 0, 0)


def make_folder_colours(root: Path, seed: int = 0) -> Path:
    """img/{split}/<id>.png and gt/{split}/<id>_gt.png in the palette's colours (and black), classes.yaml."""
    rng = np.random.default_rng(seed)
    root = root / "microscopy"
    colours = np.array([*FOLDER_COLOUR_CLASSES.values(), FOLDER_IGNORE_COLOUR], dtype=np.uint8)
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            write_image(root / "img" / split / f"slide{i}.png", rng)
            write_label(
                root / "gt" / split / f"slide{i}_gt.png", colours[blocky(rng, np.arange(len(colours)))]
            )
    classes = {
        "classes": list(FOLDER_COLOUR_CLASSES),
        "palette": [list(c) for c in FOLDER_COLOUR_CLASSES.values()],
    }
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    return root


FOLDER_COLOUR_OVERRIDES = [
    "data=folder",
    "data.image_dir='img/{split}'",
    "data.label_dir='gt/{split}'",
    "data.image_suffix=.png",
    "data.label_suffix=_gt.png",
    "data.classes=classes.yaml",
    "data.label_format=colors",
    f"data.ignore_values=[{list(FOLDER_IGNORE_COLOUR)}]",
]


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "ade20k": make_ade20k,
    "coco_stuff10k": make_coco_stuff10k,
    "coco_stuff164k": make_coco_stuff164k,
    "pascal_context59": make_pascal_context59,
    "cityscapes": make_cityscapes,
    "camvid": make_camvid,
}


def build(name: str, tmp_path: Path) -> Path:
    """A fixture tree of dataset `name` under tmp_path; returns its data.root."""
    return BUILDERS[name](tmp_path)
