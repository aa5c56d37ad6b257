"""Real datasets on disk: their layouts, their label mappings and a Dataset reading image/label pairs.

Every dataset ships label maps whose raw values are not the training ids 0..C-1 / 255 (ignore). A
lookup table per dataset (256 entries, or up to 65536 for 16-bit label PNGs) maps raw values to
training ids in one vectorised indexing step; raw values that no class or ignore id stands for map to
INVALID, which turns a broken label file into an error naming the file, each such value and its pixel
count, instead of a silent wrong class. Colour label maps (RGB PNGs in a palette's colours) first become
the index of each pixel's colour in the layout's colour list, by a vectorised sorted search.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import albumentations as A
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sfseg.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    COCO_STUFF_CLASSES,
    COCO_STUFF_PALETTE,
    PASCAL_CONTEXT59_CLASSES,
    PASCAL_CONTEXT59_PALETTE,
)
from sfseg.data.transforms import apply
from sfseg.pyramid import IGNORE_INDEX

INVALID = -1

# COCO-Stuff's 182-id vocabulary (1-based in the 10k .mat files) has 11 thing ids that never occur.
COCO_STUFF_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
COCO_STUFF_USED_IDS = tuple(raw for raw in range(1, 183) if raw not in COCO_STUFF_UNUSED_IDS)
# Pascal-Context-59: ids of the 459-class vocabulary (Pascal-Context's labels.txt), in class order.
PASCAL_CONTEXT59_RAW_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144,
    158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355,
    360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip
PASCAL_CONTEXT_VOCABULARY_SIZE = 459
# Cityscapes: the labelIds (cityscapesScripts' helpers/labels.py) of trainIds 0..18, in trainId order;
# every other labelId 0..33 is ignored, as in that table (license plate, id -1, is never drawn).
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_NUM_LABEL_IDS = 34
# CamVid (SegNet's release): ids 0..10 are the classes, 11 is void.
CAMVID_VOID = 11


class Sample(NamedTuple):
    image: Path
    label: Path


class LayoutError(FileNotFoundError):
    """A dataset root or split that is not where the expected layout puts it."""


class Scan(NamedTuple):
    """The image/label pairs of a split, and the files that have no partner (one line each)."""

    samples: list[Sample]
    problems: list[str]


def label_lut(mapping: Mapping[int, int], ignore_raw: Iterable[int], ignore_index: int) -> np.ndarray:
    """An int16 table raw value -> training id: `mapping`, ignore_raw -> ignore_index, else INVALID. It
    has 256 entries, more when a raw value is larger (16-bit labels); see `lookup` for larger values."""
    ignore_raw = tuple(ignore_raw)
    lut = np.full(max([256, *(raw + 1 for raw in (*mapping, *ignore_raw))]), INVALID, dtype=np.int16)
    for raw in ignore_raw:
        lut[raw] = ignore_index
    for raw, class_id in mapping.items():
        lut[raw] = class_id
    return lut


def lookup(lut: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """lut[raw], with INVALID for raw values beyond the table (a 16-bit map read with an 8-bit table)."""
    if raw.size and raw.max() >= len(lut):
        return np.where(raw < len(lut), lut[np.minimum(raw, len(lut) - 1)], INVALID).astype(np.int16)
    return lut[raw]


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 colours -> [...] int32 codes 0xRRGGBB (one number per colour)."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colour_indices(rgb: np.ndarray, colours: Sequence[Sequence[int]]) -> np.ndarray:
    """HxWx3 colours -> HxW index of each pixel's colour in `colours`, len(colours) for any other colour."""
    table = colour_codes(np.asarray(colours, dtype=np.uint8))
    order = np.argsort(table)
    codes = colour_codes(rgb)
    position = np.searchsorted(table[order], codes).clip(max=len(table) - 1)
    return np.where(table[order][position] == codes, order[position], len(table))


def count_values(values: np.ndarray, shown: int = 10) -> str:
    """Distinct raw values [N] or colours [N, 3] with their pixel counts, most frequent first:
    '151 (3 px), 200 (1 px)' or '(9, 9, 9) (40 px)'; beyond `shown` values, how many more."""
    distinct, counts = np.unique(values, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    described = [
        f"{tuple(distinct[i].tolist()) if distinct.ndim == 2 else distinct[i]} ({counts[i]} px)"
        for i in order[:shown]
    ]
    more = f" and {len(order) - shown} more" if len(order) > shown else ""
    return ", ".join(described) + more


def describe_values(values: Iterable[int]) -> str:
    """Integers as compact ranges: [0, 1, 2, 5, 255] -> '0-2, 5, 255'."""
    runs: list[list[int]] = []
    for value in sorted(set(values)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps its files under data.root, and what its raw label values mean.

    Path templates take `{split}`. With a `list_file`, a split is the ids listed there (one per line);
    without one, it is every image in `image_dir` and every label in `label_dir` (and, `recursive`, in
    their subfolders), paired by the file name (and subfolder) left after the suffix. With
    `label_colours`, label files are RGB and raw value k is the colour label_colours[k].
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    raw_to_class: Mapping[int, int]
    ignore_raw: tuple[int, ...]
    splits: tuple[str, ...]
    image_dir: str
    label_dir: str
    tree: str
    list_file: str | None = None
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"
    # Files in label_dir that other tools write next to the raw maps and this layout does not read.
    foreign_label_suffixes: tuple[str, ...] = ()
    recursive: bool = False
    label_colours: tuple[tuple[int, int, int], ...] = ()
    # Appended to the allowed raw values in errors: which config keys define them.
    raw_values_hint: str = ""

    def lut(self, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        return label_lut(self.raw_to_class, self.ignore_raw, ignore_index)

    def raw_ids(self) -> np.ndarray:
        """The inverse of `raw_to_class`: [C] (uint8, or uint16 for raw values above 255), the dataset's
        own label value of each class id, as its annotations and its benchmark use them (ADE20K: class
        k -> k + 1, 0 stays "other")."""
        dtype = np.uint8 if max(self.raw_to_class) < 256 else np.uint16
        raw_ids = np.zeros(len(self.classes), dtype=dtype)
        raw_ids[list(self.raw_to_class.values())] = list(self.raw_to_class)
        return raw_ids

    def label_values(self) -> list[int] | list[list[int]]:
        """Per class, what its label files hold for it: the raw id, or the [r, g, b] colour."""
        raw_ids = self.raw_ids().tolist()
        if self.label_colours:
            return [list(self.label_colours[raw]) for raw in raw_ids]
        return raw_ids

    def describe_raw_values(self) -> str:
        if self.label_colours:
            ignored = ", ".join(str(self.label_colours[raw]) for raw in self.ignore_raw) or "none"
            described = f"the {len(self.classes)} class colours of the palette; ignored: {ignored}"
        else:
            described = describe_values([*self.raw_to_class, *self.ignore_raw])
        return described + self.raw_values_hint

    def read_label(self, path: Path) -> np.ndarray:
        """A label file's raw values: HxW, or HxWx3 colours for a layout with label_colours."""
        return read_colour_label(path) if self.label_colours else read_label(path)

    def class_ids(self, raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
        """`read_label`'s raw values -> HxW int16 training ids, INVALID where no class or ignore id stands
        for the value."""
        if self.label_colours:
            raw = colour_indices(raw, self.label_colours)
        return lookup(lut, raw)

    def invalid_values_error(self, raw: np.ndarray, invalid: np.ndarray, path: Path) -> ValueError:
        """The error for a label file with raw values (or colours) that stand for no class."""
        kind, allowed = ("colours", "colours") if self.label_colours else ("values", "raw values")
        return ValueError(
            f"label {kind} {count_values(raw[invalid])} in {path} stand for no class and are not ignored; "
            f"allowed {allowed}: {self.describe_raw_values()}"
        )

    def expected(self, root: Path) -> str:
        return f"Expected layout under data.root={root} (splits {', '.join(self.splits)}):\n{self.tree}"

    def missing(self, what: str, path: Path, root: Path) -> LayoutError:
        return LayoutError(f"{self.name}: {what} not found: {path}\n{self.expected(root)}")

    def scan(self, root: str | Path, split: str) -> Scan:
        """List a split's pairs (sorted by id); a missing root, folder or list file raises LayoutError."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise self.missing("data.root", root, root)
        image_dir = root / self.image_dir.format(split=split)
        label_dir = root / self.label_dir.format(split=split)
        for what, folder in (("image folder", image_dir), ("label folder", label_dir)):
            if not folder.is_dir():
                raise self.missing(f"{what} of split {split!r}", folder, root)
        if self.list_file is None:
            return self._scan_folders(image_dir, label_dir)
        list_path = root / self.list_file.format(split=split)
        if not list_path.is_file():
            raise self.missing(f"list of split {split!r}", list_path, root)
        return self._scan_list(list_path, image_dir, label_dir)

    def _scan_folders(self, image_dir: Path, label_dir: Path) -> Scan:
        images = _files_by_stem(image_dir, self.image_suffix, (), self.recursive)
        labels = _files_by_stem(label_dir, self.label_suffix, self.foreign_label_suffixes, self.recursive)
        problems = [
            f"image without label: {images[stem]} (expected {label_dir / (stem + self.label_suffix)})"
            for stem in sorted(images.keys() - labels.keys())
        ] + [
            f"label without image: {labels[stem]} (expected {image_dir / (stem + self.image_suffix)})"
            for stem in sorted(labels.keys() - images.keys())
        ]
        samples = [Sample(images[stem], labels[stem]) for stem in sorted(images.keys() & labels.keys())]
        return Scan(samples, problems)

    def _scan_list(self, list_path: Path, image_dir: Path, label_dir: Path) -> Scan:
        ids = sorted({line.strip() for line in list_path.read_text().splitlines() if line.strip()})
        samples, problems = [], []
        for sample_id in ids:
            image = image_dir / (sample_id + self.image_suffix)
            label = label_dir / (sample_id + self.label_suffix)
            if image.is_file() and label.is_file():
                samples.append(Sample(image, label))
            elif label.is_file():
                problems.append(f"label without image: {label} (expected {image}, listed in {list_path})")
            elif image.is_file():
                problems.append(f"image without label: {image} (expected {label}, listed in {list_path})")
            else:
                problems.append(f"neither {image} nor {label} exists (listed in {list_path})")
        return Scan(samples, problems)


def _files_by_stem(
    folder: Path, suffix: str, foreign_suffixes: Sequence[str], recursive: bool
) -> dict[str, Path]:
    """{stem: path} of the files named <stem><suffix>; `recursive`: also in subfolders, the stem then
    starting with the subfolder (`aachen/aachen_000000_000019`)."""
    # scandir knows file types without a stat per file: COCO's 118k training files list in a blink.
    files, folders = {}, [folder]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if recursive and entry.is_dir():
                    folders.append(Path(entry.path))
                elif (
                    entry.name.endswith(suffix)
                    and not entry.name.endswith(tuple(foreign_suffixes))
                    and entry.is_file()
                ):
                    path = Path(entry.path)
                    files[path.relative_to(folder).as_posix()[: -len(suffix)]] = path
    return files


ADE20K = Layout(
    name="ade20k",
    classes=ADE20K_CLASSES,
    palette=ADE20K_PALETTE,
    # Raw 0 is "other" (not one of the 150 classes).
    raw_to_class={raw: raw - 1 for raw in range(1, 151)},
    ignore_raw=(0, 255),
    splits=("training", "validation"),
    image_dir="images/{split}",
    label_dir="annotations/{split}",
    tree="""\
ADEChallengeData2016/                 <- data.root
├── images/training/ADE_train_00000001.jpg ...       (20210 images)
├── images/validation/ADE_val_00000001.jpg ...       (2000 images)
├── annotations/training/ADE_train_00000001.png ...  (0 = other, 1..150 = classes)
└── annotations/validation/ADE_val_00000001.png ...""",
)

COCO_STUFF10K = Layout(
    name="coco_stuff10k",
    classes=COCO_STUFF_CLASSES,
    palette=COCO_STUFF_PALETTE,
    raw_to_class={raw: class_id for class_id, raw in enumerate(COCO_STUFF_USED_IDS)},
    ignore_raw=(0, 255),
    splits=("train", "test"),
    image_dir="images",
    label_dir="annotations",
    list_file="imageLists/{split}.txt",
    tree="""\
cocostuff-10k/                        <- data.root, written by `python -m sfseg.data.prepare coco_stuff10k`
├── images/COCO_train2014_000000000077.jpg ...       (10000 images)
├── annotations/COCO_train2014_000000000077.png ...  (field S of the .mat: 0 = unlabeled, 1..182)
└── imageLists/train.txt, imageLists/test.txt        (9000 / 1000 ids, one per line)""",
)

COCO_STUFF164K = Layout(
    name="coco_stuff164k",
    classes=COCO_STUFF_CLASSES,
    palette=COCO_STUFF_PALETTE,
    raw_to_class={raw - 1: class_id for class_id, raw in enumerate(COCO_STUFF_USED_IDS)},
    ignore_raw=(255,),
    splits=("train2017", "val2017"),
    image_dir="images/{split}",
    label_dir="annotations/{split}",
    tree="""\
coco_stuff164k/                       <- data.root
├── images/train2017/000000000009.jpg ...            (118287 COCO images)
├── images/val2017/000000000139.jpg ...              (5000)
├── annotations/train2017/000000000009.png ...       (stuffthingmaps_trainval2017.zip: 0..181, 255 = unlabeled)
└── annotations/val2017/000000000139.png ...""",
    # mmsegmentation's converter writes <id>_labelTrainIds.png next to the raw maps; we read the raw ones.
    foreign_label_suffixes=("_labelTrainIds.png",),
)

PASCAL_CONTEXT59 = Layout(
    name="pascal_context59",
    classes=PASCAL_CONTEXT59_CLASSES,
    palette=PASCAL_CONTEXT59_PALETTE,
    # The converted PNGs (ours and mmsegmentation's) store 0 = background and 1..59 for the classes.
    raw_to_class={raw: raw - 1 for raw in range(1, 60)},
    ignore_raw=(0, 255),
    splits=("train", "val"),
    image_dir="VOC2010/JPEGImages",
    label_dir="VOC2010/SegmentationClassContext",
    list_file="VOC2010/ImageSets/SegmentationContext/{split}.txt",
    tree="""\
VOCdevkit/                            <- data.root
└── VOC2010/
    ├── JPEGImages/2008_000002.jpg ...
    ├── SegmentationClassContext/2008_000002.png ...  (0 = background, 1..59 = classes; written by
    │                                                  `python -m sfseg.data.prepare pascal_context` or mmseg)
    └── ImageSets/SegmentationContext/train.txt, val.txt  (4998 / 5105 ids, one per line)""",
)

CITYSCAPES = Layout(
    name="cityscapes",
    classes=CITYSCAPES_CLASSES,
    palette=CITYSCAPES_PALETTE,
    raw_to_class={raw: class_id for class_id, raw in enumerate(CITYSCAPES_LABEL_IDS)},
    ignore_raw=tuple(raw for raw in range(CITYSCAPES_NUM_LABEL_IDS) if raw not in CITYSCAPES_LABEL_IDS),
    splits=("train", "val"),
    image_dir="leftImg8bit/{split}",
    label_dir="gtFine/{split}",
    image_suffix="_leftImg8bit.png",
    label_suffix="_gtFine_labelIds.png",
    recursive=True,
    tree="""\
cityscapes/                           <- data.root (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)
├── leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png ...   (2975 images, 18 cities)
├── leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png ... (500 images, 3 cities)
├── gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png ...    (labelIds 0..33; 19 evaluated)
└── gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png ...""",
)

CAMVID = Layout(
    name="camvid",
    classes=CAMVID_CLASSES,
    palette=CAMVID_PALETTE,
    raw_to_class={raw: raw for raw in range(len(CAMVID_CLASSES))},
    ignore_raw=(CAMVID_VOID,),
    splits=("train", "val", "test"),
    image_dir="{split}",
    label_dir="{split}annot",
    image_suffix=".png",
    label_suffix=".png",
    tree="""\
camvid/                               <- data.root (SegNet's 11-class, 360 x 480 release)
├── train/0001TP_006690.png ...       (367 RGB images)
├── trainannot/0001TP_006690.png ...  (same names; 8-bit ids 0..10 = classes, 11 = void)
├── val/, valannot/                   (101 pairs)
└── test/, testannot/                 (233 pairs; data.val_split=test scores them)""",
)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (ADE20K, COCO_STUFF10K, COCO_STUFF164K, PASCAL_CONTEXT59, CITYSCAPES, CAMVID)
}


class NotAnImageError(ValueError):
    """A file that PIL cannot decode as an image."""


def decode_rgb(path: Path) -> tuple[np.ndarray, str]:
    """HxWx3 uint8 RGB (grey, palette, RGBA and CMYK files converted) and the file's own PIL mode.
    Raises NotAnImageError naming the file when PIL cannot decode it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")), image.mode
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "corrupt or not an image"
        raise NotAnImageError(f"not an image: {path} ({error})") from error


def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB of a dataset image; a file that does not decode raises, naming it."""
    try:
        return decode_rgb(path)[0]
    except NotAnImageError as error:
        raise ValueError(f"cannot read image {path}: {error.__cause__}") from error


LABEL_MODES = ("L", "P", "I;16")
COLOUR_LABEL_MODES = ("RGB", "RGBA", "P")


def read_label(path: Path) -> np.ndarray:
    """HxW raw label values: uint8, or uint16 from a 16-bit PNG (palette PNGs give their indices, not
    colours)."""
    return _read_label(path, LABEL_MODES, "a single-channel 8- or 16-bit label map (mode L, P or I;16)")


def read_colour_label(path: Path) -> np.ndarray:
    """HxWx3 uint8 colours of a colour label map (RGB, RGBA without its alpha, or a palette PNG's colours)."""
    return _read_label(path, COLOUR_LABEL_MODES, "an RGB colour label map (mode RGB, RGBA or P)", "RGB")


def _read_label(path: Path, modes: Sequence[str], expected: str, convert: str | None = None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode not in modes:
                raise ValueError(f"expected {expected}, got mode {image.mode}")
            return np.asarray(image.convert(convert) if convert else image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read label {path}: {error}") from error


class SegmentationFiles(Dataset):
    """Image/label pairs from disk: {"image": float [3,H,W], "label": int64 [H,W], "index": int}.

    The layout reads the label files and maps their raw values (or colours) to training ids, INVALID for
    values no class stands for. Any bad pair (undecodable file, image/label size mismatch, invalid label
    value) raises ValueError naming the file; `check` runs the same checks and returns the message
    instead, for whole-split validation.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        layout: Layout,
        transform: A.Compose | None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.samples = list(samples)
        self.layout = layout
        self.lut = layout.lut(ignore_index)
        self.transform = transform  # seed_worker reseeds it per DataLoader worker

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image and the mapped label map (uint8), checked."""
        sample = self.samples[index]
        image = read_image(sample.image)
        raw = self.layout.read_label(sample.label)
        if image.shape[:2] != raw.shape[:2]:
            raise ValueError(
                f"image and label sizes differ: {sample.image} is {image.shape[1]}x{image.shape[0]}, "
                f"{sample.label} is {raw.shape[1]}x{raw.shape[0]} (width x height)"
            )
        label = self.layout.class_ids(raw, self.lut)
        invalid = label == INVALID
        if invalid.any():
            raise self.layout.invalid_values_error(raw, invalid, sample.label)
        return image, label.astype(np.uint8)

    def check(self, index: int) -> str | None:
        try:
            self.load(index)
        except ValueError as error:
            return str(error)
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        return {**apply(self.transform, image, label), "index": index}
