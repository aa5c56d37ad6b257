"""DataModules of the paper's datasets (Sec. 5): ADE20K, COCO-Stuff-10k/164k and Pascal-Context-59, of
Cityscapes (the first dataset of HRNet-Semantic-Segmentation and of most segmentation papers) and of CamVid
(real street scenes small enough to train on a CPU).

Each reads its official (or documented converted) layout under `data.root` (see `sfseg.data.datasets`),
trains with the paper's augmentation (`transforms.train_transform`) and validates on the full image
(or a fixed `val_resize`), padded at the bottom/right to a multiple of the network's size divisor
(`SegmentationDataModule.match_network`) with the padding ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from hydra.utils import get_class

from sfseg.data.datamodule import SegmentationDataModule
from sfseg.data.datasets import (
    ADE20K,
    CAMVID,
    CITYSCAPES,
    COCO_STUFF10K,
    COCO_STUFF164K,
    LAYOUTS,
    PASCAL_CONTEXT59,
    Layout,
    Sample,
    Scan,
    SegmentationFiles,
)
from sfseg.data.transforms import size_pair, train_transform, val_transform

SUBSAMPLE_KEYS = {"train", "val", "seed", "source_split"}


class DatasetProblems(ValueError):
    """Files of a split that cannot be used; `python -m sfseg.data.validate` lists all of them."""


class FileDataModule(SegmentationDataModule):
    """A dataset read from disk in the layout `layout` describes; subclasses only pick the layout.

    `subsample` ({train, val, seed, source_split}) replaces train_split/val_split by two disjoint random
    subsets of `source_split` (the paper's ablation split, Sec. 5.4): the pairs sorted by id, permuted
    with numpy's default_rng(seed), the first `train` for training and the next `val` for validation.
    """

    layout: Layout  # a class attribute of each dataset's subclass; FolderDataModule builds its own

    def __init__(
        self,
        root: str,
        train_split: str | None = None,
        val_split: str | None = None,
        crop_size: int | Sequence[int] = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        brightness: float = 0.04,
        hflip: bool = True,
        val_resize: int | Sequence[int] | None = None,
        subsample: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.classes = self.layout.classes
        self.palette = self.layout.palette
        self.root = root
        self.train_split = train_split or self.layout.splits[0]
        self.val_split = val_split or self.layout.splits[1]
        # Plain ints/tuples, not Hydra's ListConfig.
        self.crop_size = crop_size if isinstance(crop_size, int) else tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.brightness = brightness
        self.hflip = hflip
        self.val_resize = (
            val_resize if val_resize is None or isinstance(val_resize, int) else tuple(val_resize)
        )
        self.subsample = dict(subsample) if subsample is not None else None
        if self.subsample is not None and set(self.subsample) != SUBSAMPLE_KEYS:
            raise ValueError(
                f"data.subsample needs exactly the keys {sorted(SUBSAMPLE_KEYS)}, got {sorted(self.subsample)}"
            )
        if not self.num_classes <= self.ignore_index <= 255:
            raise ValueError(
                f"data.ignore_index must lie in {self.num_classes}..255 (labels are stored as uint8), got {self.ignore_index}"
            )

    @property
    def label_values(self) -> list[int] | list[list[int]]:
        return self.layout.label_values()

    def empty_split(self, part: str) -> str:
        """The problem of a part ("train", "val") without pairs, naming the key that picks its split."""
        if self.subsample is not None:
            key = f"data.subsample.source_split={self.subsample['source_split']}"
        else:
            key = f"data.{part}_split={self.train_split if part == 'train' else self.val_split}"
        return (
            f"{self.layout.name}: the {part} split ({key}) under data.root={self.root} has no image/label "
            f"pair\n{self.layout.expected(self.root)}"
        )

    def scan(self, parts: Sequence[str] = ("train", "val")) -> dict[str, Scan]:
        """The pairs of `parts` ("train", "val"), with the files that have no partner (nothing is
        decoded here). A subsample always reads its one source split and returns both parts."""
        if self.subsample is None:
            splits = {"train": self.train_split, "val": self.val_split}
            return {part: self.layout.scan(self.root, splits[part]) for part in parts}
        source = self.layout.scan(self.root, self.subsample["source_split"])
        train, val = subsample_split(
            source.samples, self.subsample["train"], self.subsample["val"], self.subsample["seed"]
        )
        # Unpaired files of the source split belong to neither part; report them once, with train.
        return {"train": Scan(train, source.problems), "val": Scan(val, [])}

    def build_datasets(self, scans: Mapping[str, Scan]) -> dict[str, SegmentationFiles]:
        """SegmentationFiles of train (augmented) and val (full image or val_resize, padded)."""
        self.check_size("data.crop_size", size_pair(self.crop_size, "data.crop_size"))
        train_tf = train_transform(
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            brightness=self.brightness,
            hflip=self.hflip,
            ignore_index=self.ignore_index,
            seed=self.seed,
        )
        val_tf = val_transform(self.val_pad_divisor, resize=self.val_resize, ignore_index=self.ignore_index)
        transforms = {"train": train_tf, "val": val_tf}
        return {
            part: SegmentationFiles(scan.samples, self.layout, transforms[part], self.ignore_index)
            for part, scan in scans.items()
        }

    def setup(self, stage: str | None = None) -> None:
        # Evaluation reads the val split only, so it works with just that split on disk.
        scans = self.scan(("val",) if stage in ("validate", "test") else ("train", "val"))
        problems = [problem for scan in scans.values() for problem in scan.problems]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DatasetProblems(
                f"{self.layout.name}: {len(problems)} unpaired file(s) under data.root={self.root}:\n  {shown}{more}\n"
                f"List every problem with: python -m sfseg.data.validate data={self.layout.name} data.root={self.root}"
            )
        for part, scan in scans.items():
            if not scan.samples:
                raise DatasetProblems(self.empty_split(part))
        datasets = self.build_datasets(scans)
        # Evaluating after fitting keeps the training set (sfseg.bench --training times both).
        self.train_set, self.val_set = datasets.get("train", self.train_set), datasets["val"]


def subsample_split(
    samples: Sequence[Sample], train: int, val: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Two disjoint random subsets (sizes train, val) of `samples`; the same for the same files and seed."""
    if train < 1 or val < 1 or train + val > len(samples):
        raise ValueError(
            f"data.subsample asks for {train} train + {val} val samples; the source split has {len(samples)} pairs"
        )
    ordered = sorted(samples)  # independent of the order the file system lists them in
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order[:train]], [ordered[i] for i in order[train : train + val]]


class ADE20KDataModule(FileDataModule):
    """ADE20K SceneParsing, 150 classes: `ADEChallengeData2016/{images,annotations}/{training,validation}`."""

    layout = ADE20K


class COCOStuff10kDataModule(FileDataModule):
    """COCO-Stuff-10k, 171 classes, train/test lists; reads the PNGs of `sfseg.data.prepare coco_stuff10k`."""

    layout = COCO_STUFF10K


class COCOStuff164kDataModule(FileDataModule):
    """COCO-Stuff-164k, 171 classes: COCO 2017 images with the `stuffthingmaps_trainval2017` PNGs."""

    layout = COCO_STUFF164K


class PascalContext59DataModule(FileDataModule):
    """Pascal-Context-59: `VOC2010/SegmentationClassContext` PNGs (0 = background, 1..59) and the VOC2010 images."""

    layout = PASCAL_CONTEXT59


class CityscapesDataModule(FileDataModule):
    """Cityscapes, 19 classes: `leftImg8bit/{split}/<city>/*_leftImg8bit.png` with the official
    `gtFine/{split}/<city>/*_gtFine_labelIds.png` (labelIds -> trainIds 0..18, every other id ignored)."""

    layout = CITYSCAPES


class CamVidDataModule(FileDataModule):
    """CamVid, 11 classes (SegNet's 360 x 480 release): `<split>/` images and `<split>annot/` labels of the
    same name, splits train, val and test; void (11) is ignored."""

    layout = CAMVID


def training_layout(data_target: str | None, class_names: Sequence[str]) -> Layout | None:
    """The layout of the dataset a model was trained on: that of its training run's datamodule
    (`data._target_`), or without a run config the one layout whose classes are `class_names`.
    None for synthetic scenes and for classes of no dataset sfseg reads."""
    if data_target is not None:
        return getattr(get_class(data_target), "layout", None)
    layouts = [layout for layout in LAYOUTS.values() if layout.classes == tuple(class_names)]
    if len({tuple(layout.raw_ids()) for layout in layouts}) > 1:
        names = " and ".join(layout.name for layout in layouts)
        raise ValueError(
            f"the checkpoint's classes are those of {names}, whose raw label ids differ, and it is not in "
            "its training run folder (whose config.yaml names the data); predict from the run folder"
        )
    return layouts[0] if layouts else None
