"""LightningDataModules: a base that builds pyramid targets on the device, and the synthetic default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sfseg.data.transforms import check_test_scale, seed_worker, train_transform, val_transform
from sfseg.pyramid import IGNORE_INDEX, build_targets, level_strides


class SegmentationDataModule(L.LightningDataModule):
    """Shared loaders and target construction; subclasses provide datasets, class names and palette.

    Batches are dicts {"image": [B,3,H,W], "label": [B,H,W], ...}. After the transfer to the device,
    `on_after_batch_transfer` adds "targets": the ground-truth pyramids of `build_targets` (Sec. 3.1),
    so the cell reductions run on the accelerator, not in the loader workers.
    """

    classes: Sequence[str] = ()
    palette: Sequence[tuple[int, int, int]] = ()
    # Per class, what the dataset's own label files hold for it (a raw id or an [r, g, b] colour); None
    # when the class ids are the only ids (synthetic scenes). Checkpoints keep it for `predict ids=raw`.
    label_values: Sequence[int] | Sequence[Sequence[int]] | None = None

    def __init__(
        self,
        num_levels: int = 4,
        batch_size: int = 16,
        val_batch_size: int = 1,
        num_workers: int = 0,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
        val_pad: bool = True,
        test_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.val_pad = val_pad
        # The model sees every validation, test and predicted image resized by this factor, and is scored
        # on the labels at their own size (sfseg.inference.InputView); it goes into the checkpoint.
        self.test_scale = check_test_scale(test_scale)
        self.num_levels = num_levels
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.ignore_index = ignore_index
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        # The network's size divisor, once `match_network` has given it (train.build does).
        self.network_divisor: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def coarsest_stride(self) -> int:
        return level_strides(self.num_levels)[0]

    @property
    def size_divisor(self) -> int:
        """The multiple that training sizes must be and validation images are padded to: the network's
        size divisor, or before `match_network` the coarsest stride (all the pyramid targets need)."""
        return self.network_divisor or self.coarsest_stride

    @property
    def val_pad_divisor(self) -> int | None:
        """Validation images are padded to this multiple; None when the consumer pads them itself
        (evaluation rescales the original image for multi-scale testing, then pads; with a test scale,
        validation resizes the image and pads it too, so the labels keep their own size)."""
        return self.size_divisor if self.val_pad and self.test_scale == 1.0 else None

    def match_network(self, size_divisor: int) -> None:
        """Pad validation images and check training sizes to the network's size divisor
        (`PyramidSegmenter.size_divisor`: the coarsest stride and the backbone's); call before setup."""
        if size_divisor % self.coarsest_stride:
            raise ValueError(
                f"the network's size divisor {size_divisor} is not a multiple of the coarsest stride "
                f"{self.coarsest_stride} of data.num_levels={self.num_levels}: set data.num_levels to model.levels"
            )
        self.network_divisor = size_divisor

    def check_size(self, key: str, sides: Sequence[int]) -> None:
        """A training size (config key `key`, value `sides`) must be a multiple of the size divisor."""
        if not any(side % self.size_divisor for side in sides):
            return
        if self.network_divisor is None:
            divisor = f"the coarsest stride {self.coarsest_stride} (model.levels={self.num_levels})"
        else:
            divisor = (
                f"the model's size divisor {self.network_divisor} (of the coarsest stride {self.coarsest_stride} "
                f"at model.levels={self.num_levels} and the backbone's divisor)"
            )
        raise ValueError(f"{key}={list(sides)} must be divisible by {divisor}")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def val_examples(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` validation images [N, 3, H, W] and labels [N, H, W] spread evenly over the split, first
        and last included (for pictures: a split of video frames, as CamVid's, sorted by name holds runs of
        consecutive frames of one scene)."""
        if self.val_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for val examples")
        total = len(self.val_set)
        indices = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
        samples = [self.val_set[int(index)] for index in indices]
        # Images of different sizes are padded at the bottom and right to the largest (labels: ignored).
        height = max(sample["label"].shape[-2] for sample in samples)
        width = max(sample["label"].shape[-1] for sample in samples)

        def padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

        return (
            torch.stack([padded(sample["image"], 0) for sample in samples]),
            torch.stack([padded(sample["label"], self.ignore_index) for sample in samples]),
        )

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a loader")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            worker_init_fn=seed_worker,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Training batches only: validation builds its targets on the network's grid, after the test
        # scale (SpecializeAndFuseModule.validation_step).
        training = self.trainer is None or self.trainer.training
        if training and isinstance(batch, dict) and "label" in batch:
            batch["targets"] = build_targets(batch["label"], self.num_levels, self.ignore_index)
        return batch


class SyntheticDataModule(SegmentationDataModule):
    """The embedded default: synthetic scenes generated on the fly (no files, no download)."""

    def __init__(
        self,
        size: int | Sequence[int] = 128,
        train_samples: int = 2000,
        val_samples: int = 200,
        data_seed: int = 0,
        augment: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from sfseg.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

        self.classes = SYNTHETIC_CLASSES
        self.palette = SYNTHETIC_PALETTE
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.data_seed = data_seed
        self.augment = augment

    def scenes(self, split: str, num_samples: int, transform: Any) -> Dataset:
        """The dataset of one split."""
        from sfseg.data.synthetic import SyntheticScenes

        return SyntheticScenes(split, num_samples, self.size, seed=self.data_seed, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        self.check_size("data.size", self.size)
        # Light augmentation: the scenes already vary in layout, colour, brightness and noise.
        train_tf = (
            train_transform(crop_size=None, scale_range=None, seed=self.seed)
            if self.augment
            else val_transform(self.val_pad_divisor)
        )
        self.train_set = self.scenes("train", self.train_samples, train_tf)
        self.val_set = self.scenes("val", self.val_samples, val_transform(self.val_pad_divisor))


class SyntheticContextDataModule(SyntheticDataModule):
    """Look-alike scenes (`sfseg.data.synthetic_context`): a setting built to isolate the mechanism,
    where a region's class is named only by sparse markers far from most of its pixels."""

    def __init__(
        self,
        region_size: int = 96,
        marker_spacing: int = 64,
        marker_size: int = 8,
        both_twins: bool = False,
        size: int | Sequence[int] = 192,
        **kwargs: Any,
    ) -> None:
        super().__init__(size=size, **kwargs)
        from sfseg.data.synthetic_context import (
            CONTEXT_CLASSES,
            CONTEXT_PALETTE,
            check_geometry,
            check_twin_layout,
        )

        check_geometry(region_size, marker_spacing, marker_size)
        if both_twins:
            check_twin_layout(self.size, region_size)
        self.classes = CONTEXT_CLASSES
        self.palette = CONTEXT_PALETTE
        self.geometry = {
            "region_size": region_size,
            "marker_spacing": marker_spacing,
            "marker_size": marker_size,
            "both_twins": both_twins,
        }

    def scenes(self, split: str, num_samples: int, transform: Any) -> Dataset:
        from sfseg.data.synthetic_context import ContextScenes

        return ContextScenes(
            split, num_samples, self.size, seed=self.data_seed, transform=transform, **self.geometry
        )
