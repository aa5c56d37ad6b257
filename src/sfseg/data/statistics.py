"""Split statistics for the dataset browser: how often each class occurs, and how much of the ground-truth
pyramid is unity cells at each level (Sec. 3.1) - what Specialize and Fuse can resolve coarsely."""

from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sfseg.data.transforms import val_transform
from sfseg.pyramid import PyramidTargets, build_targets, level_strides

if TYPE_CHECKING:
    from sfseg.data.datamodule import SegmentationDataModule


@dataclass
class SplitStatistics:
    """Counts over the images of a split; `add` one image's labels and targets at a time."""

    class_names: list[str]
    num_levels: int
    images: int = 0
    class_pixels: np.ndarray = field(init=False)  # valid pixels of each class
    class_images: np.ndarray = field(init=False)  # images in which each class occurs
    # valid pixels of the images in which each class occurs (median frequency balancing's denominator)
    class_image_pixels: np.ndarray = field(init=False)
    valid_cells: np.ndarray = field(init=False)  # cells with a valid pixel, per unity level 1..L-1
    unity_cells: np.ndarray = field(init=False)  # of which unity cells

    def __post_init__(self) -> None:
        self.class_pixels = np.zeros(len(self.class_names), dtype=np.int64)
        self.class_images = np.zeros(len(self.class_names), dtype=np.int64)
        self.class_image_pixels = np.zeros(len(self.class_names), dtype=np.int64)
        self.valid_cells = np.zeros(self.num_levels - 1, dtype=np.int64)
        self.unity_cells = np.zeros(self.num_levels - 1, dtype=np.int64)

    def add(self, label: torch.Tensor, targets: PyramidTargets) -> None:
        """One image's labels [1, H, W] and ground-truth pyramids."""
        valid = label[label != targets.ignore_index]
        counts = torch.bincount(valid, minlength=len(self.class_names)).cpu().numpy()
        self.class_pixels += counts
        self.class_images += counts > 0
        self.class_image_pixels += (counts > 0) * int(counts.sum())
        self.images += 1
        for level, unity in enumerate(targets.unity):
            self.valid_cells[level] += int((unity != targets.ignore_index).sum())
            self.unity_cells[level] += int((unity == 1).sum())

    def class_rows(self) -> list[dict[str, Any]]:
        """One row per class: valid pixels and images with the class, and their shares."""
        total = max(int(self.class_pixels.sum()), 1)
        return [
            {
                "class_id": index,
                "class": name,
                "pixels": int(self.class_pixels[index]),
                "pixel_share": self.class_pixels[index] / total,
                "images": int(self.class_images[index]),
                "image_share": self.class_images[index] / max(self.images, 1),
            }
            for index, name in enumerate(self.class_names)
        ]

    def unity_rows(self) -> list[dict[str, Any]]:
        """One row per unity level 1..L-1: cells with a valid pixel, unity cells and their share."""
        strides = level_strides(self.num_levels)
        return [
            {
                "level": level + 1,
                "stride": strides[level],
                "cells": int(self.valid_cells[level]),
                "unity_cells": int(self.unity_cells[level]),
                "unity_share": self.unity_cells[level] / max(int(self.valid_cells[level]), 1),
            }
            for level in range(self.num_levels - 1)
        ]

    def median_frequency_weights(self) -> np.ndarray:
        """SegNet's median frequency balancing of the counted split (`median_frequency_weights`)."""
        return median_frequency_weights(self.class_pixels, self.class_image_pixels)


def median_frequency_weights(class_pixels: np.ndarray, class_image_pixels: np.ndarray) -> np.ndarray:
    """Per-class CE weights [C] by median frequency balancing (Eigen and Fergus 2015, SegNet): a class's
    frequency is its pixels over the (valid) pixels of the images that contain it, and its weight is the
    median of the frequencies over that frequency. A class absent from the split gets weight 0 (it is
    never a target) and stays out of the median."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    present = np.asarray(class_image_pixels) > 0
    if not present.any():
        raise ValueError("median frequency balancing needs a split with at least one labelled pixel")
    frequency = np.divide(class_pixels, class_image_pixels, out=np.zeros_like(class_pixels), where=present)
    weights = np.zeros_like(frequency)
    weights[present] = np.median(frequency[present]) / frequency[present]
    return weights


def split_statistics(
    dataset: Dataset,
    class_names: Sequence[str],
    num_levels: int,
    ignore_index: int,
    num_workers: int = 0,
    description: str = "statistics",
    progress: bool = True,
) -> SplitStatistics:
    """Count a whole split (a progress bar on stderr). The dataset yields {"label": [H, W]} with H and W
    multiples of the coarsest stride (pad with the ignore index)."""
    stats = SplitStatistics(list(class_names), num_levels)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)  # images differ in size
    for batch in tqdm(loader, desc=description, unit="image", disable=not progress):
        label = batch["label"]
        stats.add(label, build_targets(label, num_levels, ignore_index))
    return stats


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows of equal keys as a CSV file with a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def count_split(datamodule: SegmentationDataModule, split: str, progress: bool = True) -> SplitStatistics:
    """The statistics of a whole split ("train" or "val" of a set-up datamodule), each image unaugmented
    and padded to the coarsest stride (the padding ignored)."""
    dataset = copy.copy(datamodule.train_set if split == "train" else datamodule.val_set)
    dataset.transform = val_transform(datamodule.coarsest_stride, ignore_index=datamodule.ignore_index)
    return split_statistics(
        dataset,
        datamodule.classes,
        datamodule.num_levels,
        datamodule.ignore_index,
        datamodule.num_workers,
        description=f"counting the {split} split",
        progress=progress,
    )
