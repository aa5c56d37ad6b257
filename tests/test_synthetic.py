"""The embedded synthetic dataset: determinism, class layout, colour ambiguity, API and the kept scenes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import albumentations as A
import numpy as np
import pytest
import torch
from scipy import ndimage

from sfseg.data import synthetic
from sfseg.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticScenes,
    render_scene,
)
from sfseg.data.transforms import train_transform

NUM_CLASSES = 12
POLE = SYNTHETIC_CLASSES.index("pole")
NUM_STUFF = 6

# A few scenes, rendered in this test process and in a fresh interpreter (its own hash seed, imports and
# allocator): one digest per scene.
_DIGESTED = [
    ("train", 0, 0, (128, 128)),
    ("train", 1234, 0, (128, 128)),
    ("val", 7, 3, (128, 128)),
    ("train", 5, 0, (96, 160)),
]
_DIGEST_SCRIPT = f"""
import hashlib
from sfseg.data.synthetic import render_scene
for split, index, seed, size in {_DIGESTED!r}:
    image, label = render_scene(index, seed=seed, split=split, size=size)
    print(hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest())
"""


def _digests_in_subprocess() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.split()


def _digests_here() -> list[str]:
    scenes = [
        render_scene(index, seed=seed, split=split, size=size) for split, index, seed, size in _DIGESTED
    ]
    return [hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest() for image, label in scenes]


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_scene(i) for i in range(50)]


def test_same_scene_in_separate_processes_is_byte_identical():
    there, here = _digests_in_subprocess(), _digests_here()
    assert len(there) == 4 and len(set(there)) == 4
    assert there == here


def test_same_index_twice_is_equal():
    a_img, a_lab = render_scene(42, seed=1, split="val")
    b_img, b_lab = render_scene(42, seed=1, split="val")
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)


def test_indices_splits_and_seeds_give_different_scenes():
    base_img, base_lab = render_scene(3)
    for other_img, other_lab in (render_scene(4), render_scene(3, split="val"), render_scene(3, seed=1)):
        assert not np.array_equal(base_img, other_img)
        assert not np.array_equal(base_lab, other_lab)


def test_train_and_val_share_no_scene():
    train = {render_scene(i, split="train")[0].tobytes() for i in range(100)}
    val = {render_scene(i, split="val")[0].tobytes() for i in range(100)}
    assert len(train) == 100 and len(val) == 100
    assert not train & val


def test_output_types_and_every_class_appears(scenes):
    seen = np.zeros(NUM_CLASSES, dtype=bool)
    for image, label in scenes:
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert label.shape == (128, 128) and label.dtype == np.uint8
        assert label.max() < NUM_CLASSES
        seen[np.unique(label)] = True
    missing = [SYNTHETIC_CLASSES[c] for c in np.flatnonzero(~seen)]
    assert not missing, f"classes never rendered in 50 scenes: {missing}"


def test_classes_and_palette():
    assert SYNTHETIC_CLASSES[:NUM_STUFF] == ("sky", "wall", "water", "grass", "road", "sand")
    assert SYNTHETIC_CLASSES[NUM_STUFF:] == ("person", "car", "pole", "sign", "ball", "window")
    assert len(SYNTHETIC_PALETTE) == NUM_CLASSES
    assert len(set(SYNTHETIC_PALETTE)) == NUM_CLASSES
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in SYNTHETIC_PALETTE)


def test_stuff_covers_most_pixels_and_things_are_small(scenes):
    labels = np.stack([label for _, label in scenes])
    per_image_stuff = (labels < NUM_STUFF).mean(axis=(1, 2))
    assert per_image_stuff.mean() > 0.85
    assert per_image_stuff.min() > 0.6
    extents, areas = [], []
    for label in labels:
        for cls in range(NUM_STUFF, NUM_CLASSES):
            components, _ = ndimage.label(label == cls)
            areas.extend(np.bincount(components.ravel())[1:].tolist())
            for rows, cols in ndimage.find_objects(components):
                extents.append(max(rows.stop - rows.start, cols.stop - cols.start))
    assert len(extents) > 5 * len(labels), "expected several things per scene"
    # Things are 3-30 px; merged overlapping things and clipped shapes may go a bit beyond that.
    assert np.percentile(extents, 95) <= 32
    assert np.median(areas) < 150
    assert max(areas) < 0.1 * labels[0].size


def test_poles_are_thin(scenes):
    runs = []
    for _, label in scenes:
        edges = np.diff(np.pad((label == POLE).astype(np.int8), ((0, 0), (1, 1))), axis=1)
        runs.extend((np.argwhere(edges == -1)[:, 1] - np.argwhere(edges == 1)[:, 1]).tolist())
    assert len(runs) > 100
    assert np.mean(np.asarray(runs) <= 3) > 0.95


def test_colour_alone_is_ambiguous(scenes):
    pixels = np.concatenate([image.reshape(-1, 3) for image, _ in scenes[:30]]).astype(np.float64)
    labels = np.concatenate([label.ravel() for _, label in scenes[:30]])
    means = np.stack([pixels[labels == c].mean(axis=0) for c in range(NUM_CLASSES)])
    nearest = np.argmin(((pixels[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)
    accuracy = (nearest == labels).mean()
    print(f"nearest-mean-colour pixel accuracy: {accuracy:.3f}")
    assert accuracy < 0.9

    # Per-scene mean colours of look-alike classes overlap in every channel.
    def colour_range(cls: int) -> np.ndarray:
        per_scene = [img[lab == cls].mean(axis=0) for img, lab in scenes if (lab == cls).sum() > 50]
        return np.stack([np.min(per_scene, axis=0), np.max(per_scene, axis=0)])

    for a, b in (("sky", "water"), ("wall", "sand"), ("grass", "sign")):
        ra, rb = colour_range(SYNTHETIC_CLASSES.index(a)), colour_range(SYNTHETIC_CLASSES.index(b))
        assert np.all((ra[0] <= rb[1]) & (rb[0] <= ra[1])), f"{a} and {b} colours do not overlap"


def test_size_is_configurable():
    image, label = render_scene(0, size=(96, 160))
    assert image.shape == (96, 160, 3) and label.shape == (96, 160)
    assert len(np.unique(label)) >= 4
    sample = SyntheticScenes("val", num_samples=3, size=(96, 160))[2]
    assert sample["image"].shape == (3, 96, 160) and sample["label"].shape == (96, 160)
    with pytest.raises(ValueError, match=r"data\.size"):
        render_scene(0, size=(31, 128))


def test_dataset_without_transform():
    ds = SyntheticScenes("val", num_samples=5, seed=2)
    sample = ds[4]
    image, label = render_scene(4, seed=2, split="val")
    assert sample["index"] == 4
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 128, 128)
    assert sample["label"].dtype == torch.int64
    torch.testing.assert_close(sample["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
    assert torch.equal(sample["label"], torch.from_numpy(label).long())
    assert ds.classes == SYNTHETIC_CLASSES and ds.palette == SYNTHETIC_PALETTE
    with pytest.raises(IndexError):
        ds[5]


def test_dataset_transform_hook_flips_image_and_label_together():
    flip = A.Compose([A.HorizontalFlip(p=1.0)], strict=True)
    sample = SyntheticScenes("train", transform=flip)[11]
    image, label = render_scene(11)
    expected_image = torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(sample["image"], expected_image)
    assert torch.equal(sample["label"], torch.from_numpy(label[:, ::-1].copy()).long())


def test_default_lengths_and_dataloader():
    assert len(SyntheticScenes("train")) == 2000
    assert len(SyntheticScenes("val")) == 200
    loader = torch.utils.data.DataLoader(SyntheticScenes("train", num_samples=6), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 128, 128) and batch["label"].shape == (4, 128, 128)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_bad_split_names_parameter_and_allowed_values():
    with pytest.raises(ValueError, match=r"data\.split.*train.*val"):
        SyntheticScenes("test")
    with pytest.raises(ValueError, match=r"data\.split"):
        render_scene(0, split="validation")


def test_a_split_is_rendered_once_and_the_transform_cannot_alter_the_kept_scene(monkeypatch):
    ds = SyntheticScenes(
        "train", num_samples=4, transform=train_transform(crop_size=None, scale_range=None, seed=0)
    )
    first = ds.scene(2)
    assert ds.scene(2) is first  # kept: the second draw does not render again
    image, label = render_scene(2)
    assert np.array_equal(first[0], image) and np.array_equal(first[1], label)
    assert not first[0].flags.writeable and not first[1].flags.writeable
    for _ in range(3):  # augmented draws leave the kept scene as rendered
        ds[2]
    assert np.array_equal(ds.scene(2)[0], image)
    monkeypatch.setattr(synthetic, "MAX_CACHED_BYTES", 3 * 128 * 128 * 4)
    too_big = SyntheticScenes("train", num_samples=4)
    assert too_big.scene(2) is not too_big.scene(2)  # over the budget: rendered at every draw
    assert np.array_equal(too_big.scene(2)[1], label)
