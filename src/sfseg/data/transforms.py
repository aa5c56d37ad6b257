"""Albumentations pipelines shared by every dataset (the paper's recipe, Sec. 5.1.1).

`Compose(strict=True)` turns a misspelt argument into an error instead of albumentations' silent
warning. The random state of a pipeline is not reseeded per DataLoader worker by albumentations:
`seed_worker` does it, so workers do not repeat each other's augmentations (DESIGN 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from sfseg.pyramid import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    crop_size: int | Sequence[int] | None = 512,
    scale_range: Sequence[float] | None = (0.5, 2.0),
    brightness: float = 0.1,
    hflip: bool = True,
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
) -> A.Compose:
    """Random scale, random crop (pad image 0, label ignore), horizontal flip, random brightness,
    ImageNet normalisation. `crop_size=None` keeps the image size; `scale_range=None` skips scaling."""
    steps: list[A.BasicTransform] = []
    if scale_range is not None:
        low, high = scale_range
        # RandomScale samples the factor from 1 + scale_limit.
        steps.append(
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR, p=1.0)
        )
    if crop_size is not None:
        height, width = size_pair(crop_size, "data.crop_size")
        steps += [
            pad_bottom_right(ignore_index, min_height=height, min_width=width),
            A.RandomCrop(height=height, width=width),
        ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if brightness > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=0.0, p=0.5))
    steps.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return A.Compose(steps, strict=True, seed=seed)


def val_transform(
    pad_divisor: int | None = 32, resize: int | Sequence[int] | None = None, ignore_index: int = IGNORE_INDEX
) -> A.Compose:
    """Normalise, optionally resize to a fixed size, and pad (image 0, label ignore) at the bottom and
    right to a multiple of `pad_divisor` (the network's size divisor), so predictions crop back to the
    original pixels.
    `pad_divisor=None` leaves the size as it is (evaluation pads after its own rescaling)."""
    steps: list[A.BasicTransform] = []
    if resize is not None:
        height, width = size_pair(resize, "data.val_resize")
        steps.append(A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR))
    if pad_divisor is not None:
        steps.append(
            pad_bottom_right(
                ignore_index,
                min_height=None,
                min_width=None,
                pad_height_divisor=pad_divisor,
                pad_width_divisor=pad_divisor,
            )
        )
    steps.append(A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return A.Compose(steps, strict=True)


def pad_bottom_right(ignore_index: int, **size: int | None) -> A.PadIfNeeded:
    """Pad at the bottom and right (image 0, label ignore), so the original pixels keep their place."""
    return A.PadIfNeeded(
        **size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
    )


def apply(transform: A.Compose | None, image: np.ndarray, label: np.ndarray) -> dict[str, torch.Tensor]:
    """Run a pipeline on an HxWx3 uint8 image and an HxW label map; return CHW float and HW int64.

    An image still in uint8 afterwards (no Normalize in the pipeline) is scaled to [0, 1].
    """
    if transform is not None:
        out = transform(image=image, mask=label)
        image, label = out["image"], out["mask"]
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
        "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker's albumentations pipeline its own seed.

    torch's per-worker seed differs per worker and per epoch, and follows the global seed.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    seed = info.seed % 2**32
    np.random.seed(seed)
    if transform is not None:
        transform.set_random_seed(seed)


def size_pair(value: int | Sequence[int], key: str) -> tuple[int, int]:
    """An int or [H, W] config value as (H, W); anything else is an error naming the config key."""
    pair = (value, value) if isinstance(value, int) else tuple(int(side) for side in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{key} must be a positive int or [H, W], got {value}")
    return pair


def check_test_scale(scale: float, key: str = "data.test_scale") -> float:
    """A test scale: a number > 0 (1.0: images reach the network at their own size)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"{key} must be a number > 0 (1.0: no resizing), got {scale!r}")
    return float(scale)
