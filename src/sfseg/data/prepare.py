"""Converters from the releases' .mat annotations to the label PNGs the datamodules read.

    python -m sfseg.data.prepare coco_stuff10k    <cocostuff-10k-v1.1> <dst>
    python -m sfseg.data.prepare pascal_context59 <folder of Pascal-Context .mat files> <VOCdevkit>

Both are idempotent: a file whose output exists is skipped, and every output is written under a
temporary name and renamed, so a killed run leaves no half-written file and a re-run resumes. They
never write into their input: a dst equal to or inside src is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import loadmat, whosmat
from scipy.io.matlab import MatReadError
from tqdm import tqdm

from sfseg.data.datasets import (
    COCO_STUFF10K,
    PASCAL_CONTEXT59,
    PASCAL_CONTEXT59_RAW_IDS,
    PASCAL_CONTEXT_VOCABULARY_SIZE,
    describe_values,
)

COCO_STUFF10K_SOURCE_TREE = """\
cocostuff-10k-v1.1/                   <- src
├── images/COCO_train2014_000000000077.jpg ...
├── annotations/COCO_train2014_000000000077.mat ...  (label map in field S: 0 = unlabeled, 1..182)
└── imageLists/train.txt, imageLists/test.txt"""

PASCAL_CONTEXT_SOURCE_TREE = """\
trainval/                             <- src (from Pascal-Context's trainval.tar.gz)
└── 2008_000002.mat ...               (field LabelMap: ids of the 459-class vocabulary)
VOCdevkit/                            <- dst (the PASCAL VOC 2010 devkit)
└── VOC2010/
    ├── JPEGImages/2008_000002.jpg ...
    └── ImageSets/Main/train.txt, val.txt  (4998 / 5105 ids: Pascal-Context's train / val)"""

# 459-class vocabulary id -> converted PNG value: 1..59 for the 59 classes, 0 (background) for the rest.
_PASCAL_CONTEXT_TO_PNG = np.zeros(PASCAL_CONTEXT_VOCABULARY_SIZE + 1, dtype=np.uint8)
_PASCAL_CONTEXT_TO_PNG[list(PASCAL_CONTEXT59_RAW_IDS)] = np.arange(1, len(PASCAL_CONTEXT59_RAW_IDS) + 1)


class ConversionError(ValueError):
    """An input that is missing or not in the release's format; the message names the file."""


def check_not_inside(src: Path, dst: Path) -> None:
    """Refuse a dst equal to or inside src, so that no input can be overwritten."""
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents:
        raise ConversionError(
            f"dst {dst} is {'the same folder as' if dst == src else 'inside'} src {src}: the converter never "
            "writes into its input, so that a mistake cannot overwrite the original release; choose a dst outside src"
        )


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path), then rename it to `path`: a killed run leaves no half file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no extra space) where the file system allows one, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_png(label: np.ndarray, path: Path) -> None:
    # The format is explicit: `path` is the temporary <name>.png.partial.
    Image.fromarray(label.astype(np.uint8)).save(path, format="PNG")


def load_label_field(path: Path, field: str, max_value: int) -> np.ndarray:
    """The 2-D integer label map in `field` of a MATLAB file, checked to lie in 0..max_value."""
    try:
        mat = loadmat(path, variable_names=[field])
    # scipy's ways of saying "not a readable .mat" (NotImplementedError: a v7.3 HDF5 file).
    except (OSError, ValueError, TypeError, MatReadError, NotImplementedError) as error:
        raise ConversionError(f"cannot read {path}: {error}") from error
    if field not in mat:  # only `field` was loaded: list the file's variables for the message
        fields = sorted(name for name, *_ in whosmat(path))
        raise ConversionError(f"{path} has no field {field!r} (fields: {fields})")
    raw = np.asarray(mat[field])
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.number):
        raise ConversionError(
            f"field {field!r} of {path} is not a 2-D numeric label map (shape {raw.shape}, {raw.dtype})"
        )
    bad = (raw < 0) | (raw > max_value) | (raw != np.round(raw))
    if bad.any():
        raise ConversionError(
            f"field {field!r} of {path} holds values {describe_values(np.unique(raw[bad]).astype(np.int64).tolist())} "
            f"outside the ids 0..{max_value}"
        )
    return raw.astype(np.int64)


def convert_files(
    items: Iterable[tuple[Path, Path]], write: Callable[[Path, Path], None], desc: str
) -> tuple[int, int]:
    """write(src, dst) for every pair whose dst is missing; returns (written, skipped)."""
    items = list(items)
    written = 0
    for src, dst in tqdm(items, desc=desc, unit="file"):
        if dst.exists():
            continue
        write_atomic(dst, lambda partial, src=src: write(src, partial))
        written += 1
    return written, len(items) - written


def require(paths: Iterable[Path], tree: str) -> None:
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise ConversionError(f"not found: {', '.join(missing)}\nExpected:\n{tree}")


def convert_coco_stuff10k(src: Path, dst: Path) -> dict[str, tuple[int, int]]:
    """cocostuff-10k-v1.1 -> `dst` in the layout COCOStuff10kDataModule reads (sfseg.data.datasets).

    Labels: field S of annotations/<id>.mat -> annotations/<id>.png, raw ids unchanged (0 = unlabeled,
    1..182), so that the datamodule's lookup table is the only place mapping them to 0..170.
    Images and the image lists are hard-linked (or copied) next to them.
    """
    src, dst = Path(src), Path(dst)
    check_not_inside(src, dst)
    require([src / "images", src / "annotations", src / "imageLists"], COCO_STUFF10K_SOURCE_TREE)
    mats = sorted((src / "annotations").glob("*.mat"))
    if not mats:
        raise ConversionError(
            f"no .mat file in {src / 'annotations'}\nExpected:\n{COCO_STUFF10K_SOURCE_TREE}"
        )

    def convert(mat: Path, partial: Path) -> None:
        write_png(load_label_field(mat, "S", 182), partial)

    return {
        "annotations": convert_files(
            ((mat, dst / "annotations" / f"{mat.stem}.png") for mat in mats), convert, "coco_stuff10k labels"
        ),
        "images": convert_files(
            ((image, dst / "images" / image.name) for image in sorted((src / "images").glob("*.jpg"))),
            link_or_copy,
            "coco_stuff10k images",
        ),
        "imageLists": convert_files(
            ((lst, dst / "imageLists" / lst.name) for lst in sorted((src / "imageLists").glob("*.txt"))),
            shutil.copyfile,
            "coco_stuff10k lists",
        ),
    }


def convert_pascal_context59(src: Path, dst: Path) -> dict[str, tuple[int, int]]:
    """Pascal-Context's per-image .mat files (459-class LabelMap) -> PNGs under the VOCdevkit `dst`.

    Writes VOC2010/SegmentationClassContext/<id>.png (0 = background, 1..59 = the 59 classes: the same
    convention as mmsegmentation's converter) and ImageSets/SegmentationContext/{train,val}.txt: the
    ids of VOC2010's ImageSets/Main/{train,val}.txt that have a .mat file.
    """
    src, dst = Path(src), Path(dst)
    check_not_inside(src, dst)
    voc = dst / "VOC2010"
    main_lists = {split: voc / "ImageSets" / "Main" / f"{split}.txt" for split in PASCAL_CONTEXT59.splits}
    require([src, voc / "JPEGImages", *main_lists.values()], PASCAL_CONTEXT_SOURCE_TREE)
    mats = sorted(src.glob("*.mat"))
    if not mats:
        raise ConversionError(f"no .mat file in {src}\nExpected:\n{PASCAL_CONTEXT_SOURCE_TREE}")

    def convert(mat: Path, partial: Path) -> None:
        raw = load_label_field(mat, "LabelMap", PASCAL_CONTEXT_VOCABULARY_SIZE)
        write_png(_PASCAL_CONTEXT_TO_PNG[raw], partial)

    counts = {
        "labels": convert_files(
            ((mat, voc / "SegmentationClassContext" / f"{mat.stem}.png") for mat in mats),
            convert,
            "pascal_context59 labels",
        )
    }
    annotated = {mat.stem for mat in mats}
    for split, main_list in main_lists.items():
        ids = [line.strip() for line in main_list.read_text().splitlines() if line.strip() in annotated]

        def write_list(_: Path, partial: Path, ids: list[str] = ids) -> None:
            partial.write_text("".join(f"{sample_id}\n" for sample_id in ids))

        counts[f"{split}.txt"] = convert_files(
            [(main_list, voc / "ImageSets" / "SegmentationContext" / f"{split}.txt")],
            write_list,
            f"{split} list",
        )
    return counts


CONVERTERS: dict[str, Callable[[Path, Path], dict[str, tuple[int, int]]]] = {
    COCO_STUFF10K.name: convert_coco_stuff10k,
    PASCAL_CONTEXT59.name: convert_pascal_context59,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfseg.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("src", type=Path, help="the release as downloaded (never written to)")
    parser.add_argument(
        "dst", type=Path, help="where the converted dataset goes (data.root of the datamodule)"
    )
    args = parser.parse_args(argv)
    try:
        counts = CONVERTERS[args.dataset](args.src, args.dst)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for what, (written, skipped) in counts.items():
        print(f"{what}: {written} written, {skipped} already there")
    print(f"done: data={args.dataset} data.root={args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
