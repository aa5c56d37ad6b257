"""The controlled experiment (issue 13): look-alike scenes whose class only sparse markers name
(`data=synthetic_context`), a backbone of bounded receptive field (`model/backbone=local`), the
`experiment=mechanism` config and the `python -m sfseg.ablation --preset mechanism*` sweeps."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy import ndimage

from sfseg.ablation import MECHANISM_REGIME, PRESETS, cue_note, sweep_command
from sfseg.data.classes import SYNTHETIC_CLASSES
from sfseg.data.synthetic_context import (
    CONTEXT_CLASSES,
    CONTEXT_PALETTE,
    DEFAULT_GEOMETRY,
    LOOK_ALIKE_CLASSES,
    LOOK_ALIKE_PAIRS,
    MARKER_COLOURS,
    NO_MARKER,
    ContextScene,
    ContextScenes,
    cue_coverage,
    draw_context_scene,
    render_context_scene,
)
from sfseg.gpu_check import sizes as check_sizes
from sfseg.models.backbones import create_backbone
from sfseg.models.encoders import LocalResNet
from sfseg.module import training_loss
from sfseg.runs import resolved_config
from tests.conftest import TINY, compose_config
from tests.processes import run_module
from tests.test_reproducibility import ENV

LOOK_ALIKE_IDS = [CONTEXT_CLASSES.index(name) for name in LOOK_ALIKE_CLASSES]
# The look each class wears: twins share one.
LOOK = {"sky": 0, "water": 0, "wall": 1, "sand": 1, "grass": 2, "road": 3}
LOOK_OF_ID = np.array([LOOK[name] for name in CONTEXT_CLASSES])


@pytest.fixture(scope="module")
def scenes():
    return [draw_context_scene(index) for index in range(120)]


# --- the backbone's receptive field ---------------------------------------------------------------------


def test_local_backbone_sees_exactly_a_31_pixel_square():
    """The input gradient of one centre output of X is exactly zero outside an R x R square and
    nonzero on each of its four edges: R = 31, centred on the output's position 4k."""
    torch.manual_seed(0)
    backbone = create_backbone("local").double().eval()  # BN in eval mode: no batch statistics
    # timm zero-initialises each block's last BN scale, which would hide the block's 3x3 convolutions.
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.running_mean, -0.1, 0.1)
    images = torch.randn(1, 3, 96, 96, dtype=torch.double, requires_grad=True)
    features = backbone(images)
    assert features.shape == (1, 64, 24, 24)
    k = 12
    features[0, :, k, k].sum().backward()
    reached = images.grad[0].abs().sum(0) != 0
    rows, cols = np.flatnonzero(reached.any(1).numpy()), np.flatnonzero(reached.any(0).numpy())
    radius = LocalResNet.receptive_field // 2
    assert LocalResNet.receptive_field == 31
    low, high = 4 * k - radius, 4 * k + radius
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (low, high, low, high)
    square = reached[4 * k - radius : 4 * k + radius + 1, 4 * k - radius : 4 * k + radius + 1]
    assert int(reached.sum()) == int(square.sum())  # nothing outside the square
    for edge in (square[0], square[-1], square[:, 0], square[:, -1]):
        assert edge.any()


def test_local_backbone_needs_only_multiples_of_4():
    assert LocalResNet.size_divisor == 4
    with torch.no_grad():
        features = create_backbone("local").eval()(torch.zeros(1, 3, 36, 44))
    assert features.shape == (1, 64, 9, 11)


# --- the look-alike scenes ------------------------------------------------------------------------------

# A few look-alike scenes, rendered in this test process and in a fresh interpreter: one digest per scene.
_DIGESTED = [
    (0, 0, "train", (192, 192), False),
    (17, 3, "val", (128, 160), False),
    (5, 2, "val", (192, 384), True),
]
_DIGEST_SCRIPT = f"""
import hashlib
from sfseg.data.synthetic_context import render_context_scene
for index, seed, split, size, both in {_DIGESTED!r}:
    image, label = render_context_scene(index, seed, split, size, both_twins=both)
    print(hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest())
"""


def digest(scene: tuple[np.ndarray, np.ndarray]) -> str:
    image, label = scene
    return hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()


def test_scenes_are_deterministic_per_data_seed():
    there = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, check=True, env=ENV
    ).stdout.split()
    here = [
        digest(render_context_scene(index, seed, split, size, both_twins=both))
        for index, seed, split, size, both in _DIGESTED
    ]
    assert len(there) == 3 and there == here
    assert there[0] == digest(render_context_scene(0))  # the defaults: seed 0, train, 192x192
    another_seed = render_context_scene(5, 3, "val", (192, 384), both_twins=True)
    assert there[2] != digest(another_seed)
    label = render_context_scene(0)[1]
    others = [
        render_context_scene(0, seed=1)[1],
        render_context_scene(0, split="val")[1],
        render_context_scene(1)[1],
    ]
    assert all(not np.array_equal(label, other) for other in others)


def test_classes_palette_and_pairs():
    assert CONTEXT_CLASSES == ("sky", "water", "wall", "sand", "grass", "road")
    assert LOOK_ALIKE_PAIRS == (("sky", "water"), ("wall", "sand"))
    assert len(set(CONTEXT_PALETTE)) == len(CONTEXT_CLASSES)


def test_regions_are_large_and_touching_regions_differ_in_look(scenes):
    for scene in scenes[:30]:
        label = scene.label
        assert scene.image.shape == (192, 192, 3) and label.dtype == np.uint8 and label.max() < 6
        # Any two pixels that touch (also diagonally) and differ in class differ in look.
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            a = label[max(dy, 0) :, max(dx, 0) : label.shape[1] + min(dx, 0)]
            b = label[: label.shape[0] - dy, max(-dx, 0) : label.shape[1] - max(dx, 0)]
            differ = a != b
            assert np.all(LOOK_OF_ID[a[differ]] != LOOK_OF_ID[b[differ]])
        regions = [ndimage.label(label == cls)[0] for cls in range(6)]
        sizes = [np.bincount(r.ravel())[1:] for r in regions]
        assert max(int(s.max()) for s in sizes if s.size) > 48 * 48


def test_markers_name_their_region_and_only_look_alike_regions_have_them(scenes):
    size = DEFAULT_GEOMETRY["marker_size"]
    for scene in scenes:
        marked = scene.markers != NO_MARKER
        assert np.array_equal(scene.markers[marked], scene.label[marked])  # a marker names its own region
        assert set(np.unique(scene.markers[marked])) <= set(LOOK_ALIKE_IDS)
        components, _ = ndimage.label(marked)
        assert np.all(np.bincount(components.ravel())[1:] == size * size)  # whole squares, apart
        for cls in LOOK_ALIKE_IDS:  # each class has its own exact colour
            assert np.all(scene.image[scene.markers == cls] == MARKER_COLOURS[cls])
    assert sum(int((scene.markers == cls).any()) for scene in scenes for cls in LOOK_ALIKE_IDS) > 100


def test_twins_are_drawn_alike_and_the_coin_ignores_position(scenes):
    """Per-region colour statistics and positions of sky vs water (wall vs sand) overlap; only the
    markers differ."""
    stats: dict[int, list[np.ndarray]] = {cls: [] for cls in LOOK_ALIKE_IDS}
    for scene in scenes:
        plain = scene.markers == NO_MARKER
        for cls in LOOK_ALIKE_IDS:
            components, count = ndimage.label(scene.label == cls)
            for region in range(1, count + 1):
                mask = (components == region) & plain
                if mask.sum() < 500:
                    continue
                ys, xs = np.nonzero(mask)
                colour = scene.image[mask].astype(np.float64)
                stats[cls].append(np.r_[colour.mean(0), colour.std(0), ys.mean(), xs.mean(), mask.sum()])
    for a, b in LOOK_ALIKE_PAIRS:
        first = np.stack(stats[CONTEXT_CLASSES.index(a)])
        second = np.stack(stats[CONTEXT_CLASSES.index(b)])
        assert 0.6 < len(first) / len(second) < 1.6, "the coin is not fair"
        spread = np.concatenate([first, second]).std(0)
        gap = np.abs(first.mean(0) - second.mean(0)) / spread
        # Within 4 standard errors of the difference of two sample means: chance, not a drawn difference
        # (another colour box or texture would be more than a whole spread apart).
        limit = 4 * np.sqrt(1 / len(first) + 1 / len(second))
        assert gap.max() < limit, f"{a} and {b} differ in colour, texture, position or size: {gap.round(2)}"


def test_most_pixels_cannot_see_their_cue_and_most_coarse_cells_can(scenes):
    """With R = 31 (model/backbone=local): the geometry the experiment relies on."""
    coverage = cue_coverage(scenes, LocalResNet.receptive_field, cell_sizes=(32,))
    assert coverage["pixel"] < 0.35  # most look-alike pixels have no marker of their region within R
    assert coverage["cells32"] > 0.5  # most lie in whole-class level-1 cells (32 px at L=4)...
    assert coverage["cell32"] > 0.7  # ...whose field (32 + R - 1 pixels) holds a marker of the class


def hand_drawn_scene() -> ContextScene:
    """8 x 8 pixels: sky (top left 4 x 4), water (top right 4 x 4), sand (bottom, columns 0-5) and grass
    (bottom, columns 6-7); one water marker pixel at (3, 4) and one sand marker pixel at (7, 5)."""
    label = np.full((8, 8), CONTEXT_CLASSES.index("grass"), dtype=np.uint8)
    label[:4, :4] = CONTEXT_CLASSES.index("sky")
    label[:4, 4:] = CONTEXT_CLASSES.index("water")
    label[4:, :6] = CONTEXT_CLASSES.index("sand")
    markers = np.full((8, 8), NO_MARKER, dtype=np.uint8)
    markers[3, 4] = CONTEXT_CLASSES.index("water")
    markers[7, 5] = CONTEXT_CLASSES.index("sand")
    return ContextScene(np.zeros((8, 8, 3), dtype=np.uint8), label, markers)


def test_cue_coverage_of_a_hand_drawn_scene():
    """Counted on paper. Look-alike pixels: 16 sky + 16 water + 24 sand = 56.

    R = 3 (a pixel sees its 3 x 3 square): water pixels (2..3, 4..5) see the water marker, sand pixels
    (6..7, 4..5) the sand marker: 8 of 56. Sky pixel (3, 3) and sand pixels (4, 3..5) see the water
    marker, which is not of their class. 4 x 4 cells: sky, water and sand (bottom left) are whole-class
    cells (48 pixels); the bottom right cell is half sand, half grass. Grown by R // 2 = 1, only the water
    cell's field holds a marker of its class (the sky cell's holds the water marker; the sand cell's,
    columns -1..4, misses the sand marker in column 5): 16 of 48.
    """
    scene = hand_drawn_scene()
    coverage = cue_coverage([scene], receptive_field=3, cell_sizes=(4, 8))
    assert coverage == pytest.approx(
        {"pixel": 8 / 56, "cells4": 48 / 56, "cell4": 16 / 48, "cells8": 0.0, "cell8": 0.0}
    )
    # R = 5: water pixels in rows 1..3, columns 4..6 (9) and sand pixels in rows 5..7, columns 3..5 (9);
    # grown by 2, the sand cell's field (columns -2..5) now holds the sand marker: water 16 + sand 16 of 48.
    coverage = cue_coverage([scene], receptive_field=5, cell_sizes=(4,))
    assert coverage == pytest.approx({"pixel": 18 / 56, "cells4": 48 / 56, "cell4": 32 / 48})
    # A second scene, all water with a marker at (4, 4): 9 pixels see it; all four 4 x 4 cells are
    # whole and their fields (grown by 1) reach (4, 4). Shares are over the pixels of both scenes.
    water = np.full((8, 8), CONTEXT_CLASSES.index("water"), dtype=np.uint8)
    markers = np.full((8, 8), NO_MARKER, dtype=np.uint8)
    markers[4, 4] = CONTEXT_CLASSES.index("water")
    second = ContextScene(np.zeros((8, 8, 3), dtype=np.uint8), water, markers)
    coverage = cue_coverage([scene, second], receptive_field=3, cell_sizes=(4,))
    assert coverage == pytest.approx({"pixel": 17 / 120, "cells4": 112 / 120, "cell4": 80 / 112})


def test_cue_note_is_the_coverage_of_the_val_scenes_the_jobs_scored():
    """The mechanism report's note: cue_coverage of the config's val split (data_seed, size, geometry,
    val_samples) with R = 31 and level-1 cells of 32 pixels (L=4)."""
    geometry = {"region_size": 48, "marker_spacing": 32, "marker_size": 8}
    data = {
        "_target_": "sfseg.data.datamodule.SyntheticContextDataModule",
        "size": 96,
        "data_seed": 3,
        "val_samples": 4,
        **geometry,
    }
    config = {"data": data, "model": {"backbone": {"name": "local"}}}
    # The pixel share is 59.9 % on these scenes, 61.0 % on the train split, 69.9 % with data_seed 0.
    scenes = [draw_context_scene(index, 3, "val", (96, 96), **geometry) for index in range(4)]
    coverage = cue_coverage(scenes, receptive_field=31, cell_sizes=(32,))
    assert cue_note(config) == [
        f"The cue on these val scenes: {100 * coverage['pixel']:.1f} % of the look-alike pixels have a marker "
        "of their class within the 31 x 31 square a pixel's features see (model/backbone=local); "
        f"{100 * coverage['cells32']:.1f} % lie in 32 x 32 cells of one class (level 1 at L=4), and the field "
        f"of {100 * coverage['cell32']:.1f} % of those (32 + 30 pixels wide) holds one."
    ]
    assert cue_note({**config, "model": {"backbone": {"name": "hrnet_w18_small"}}}) == []
    other_data = {**data, "_target_": "sfseg.data.datamodule.SyntheticDataModule"}
    assert cue_note({**config, "data": other_data}) == []


# --- both twins in every image (data=synthetic_context_twins) -----------------------------------------------

TWINS_SIZE = (192, 384)  # the data config's: a 2 x 4 grid of 96-pixel regions


@pytest.fixture(scope="module")
def twin_scenes():
    return [draw_context_scene(index, size=TWINS_SIZE, both_twins=True) for index in range(60)]


def grid_classes(label: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The class at the centre of each nominal grid cell: the wavy cuts stay within 0.3 of a region's
    side of their nominal place, so the centre lies in region (row, col)."""
    h, w = label.shape
    ys = ((np.arange(rows) + 0.5) * h / rows).astype(int)
    xs = ((np.arange(cols) + 0.5) * w / cols).astype(int)
    return label[np.ix_(ys, xs)]


def test_both_twins_known_answer_on_a_drawn_scene():
    """Scene 0 at 192 x 384: 2 x 4 regions, each look in the two regions of one slot of the 2 x 2
    tiling, and each look-alike look dealt one region of each twin."""
    scene = draw_context_scene(0, size=TWINS_SIZE, both_twins=True)
    grid = grid_classes(scene.label, 2, 4)
    looks = LOOK_OF_ID[grid]
    for row in range(2):
        for col in range(2):  # a slot: the regions (row, col) and (row, col + 2)
            assert looks[row, col] == looks[row, col + 2]
    assert sorted(looks[:, :2].ravel()) == [0, 1, 2, 3]
    names = sorted(CONTEXT_CLASSES[cls] for cls in grid.ravel())
    assert names == ["grass", "grass", "road", "road", "sand", "sky", "wall", "water"]
    # Each region's label is its class everywhere: the region at a grid centre is one class, and the
    # markers inside it name that class.
    for row, col in np.ndindex(2, 4):
        components, _ = ndimage.label(scene.label == grid[row, col])
        centre = (int((row + 0.5) * 96), int((col + 0.5) * 96))
        region = components == components[centre]
        assert region.sum() > 48 * 48
        named = set(np.unique(scene.markers[region])) - {NO_MARKER}
        assert named <= {int(grid[row, col])}


def test_both_twins_every_image_holds_both_twins_and_their_markers(twin_scenes):
    look_alike = LOOK_ALIKE_IDS
    for scene in twin_scenes:
        assert scene.image.shape == (*TWINS_SIZE, 3)
        assert set(np.unique(scene.label)) == set(range(len(CONTEXT_CLASSES)))
        marked = scene.markers != NO_MARKER
        assert np.array_equal(scene.markers[marked], scene.label[marked])  # a marker names its own region
        for cls in look_alike:
            assert np.all(scene.image[scene.markers == cls] == MARKER_COLOURS[cls])
    with_all_markers = sum(all((scene.markers == cls).any() for cls in look_alike) for scene in twin_scenes)
    assert with_all_markers >= 0.9 * len(twin_scenes)  # a wavy region may be too thin for a marker


def test_both_twins_deal_is_fair_and_ignores_position(twin_scenes):
    """Which of its look's two regions (columns c and c + 2 of one row) a twin gets: a coin per image."""
    for first, second in LOOK_ALIKE_PAIRS:
        pair = [CONTEXT_CLASSES.index(first), CONTEXT_CLASSES.index(second)]
        first_on_the_left = []
        for scene in twin_scenes:
            grid = grid_classes(scene.label, 2, 4)
            rows, cols = np.nonzero(np.isin(grid, pair))
            assert len(set(rows)) == 1 and sorted(cols)[1] - sorted(cols)[0] == 2
            first_on_the_left.append(grid[rows[0], min(cols)] == pair[0])
        assert 0.25 < np.mean(first_on_the_left) < 0.75


def test_both_twins_keep_the_cue_geometry(twin_scenes):
    coverage = cue_coverage(twin_scenes, LocalResNet.receptive_field, cell_sizes=(32,))
    assert coverage["pixel"] < 0.35 and coverage["cells32"] > 0.5 and coverage["cell32"] > 0.7


def test_both_twins_needs_room_for_two_regions_of_each_look():
    with pytest.raises(ValueError, match=r"data\.both_twins=true .* data\.size=\[192, 192\] .* 2 x 2 grid"):
        draw_context_scene(0, size=(192, 192), both_twins=True)
    with pytest.raises(ValueError, match=r"data\.both_twins"):
        ContextScenes("train", 2, size=(192, 192), both_twins=True)
    scene = draw_context_scene(0, size=(192, 288), both_twins=True)  # 2 x 3: slots of 2, 1, 2, 1 regions
    assert set(LOOK_ALIKE_IDS) <= set(np.unique(scene.label))


@pytest.mark.parametrize(
    ("geometry", "key"),
    [
        ({"marker_size": 0}, "data.marker_size"),
        ({"marker_spacing": 4}, "data.marker_spacing"),
        ({"region_size": 6}, "data.region_size"),
    ],
)
def test_bad_geometry_names_the_key(geometry: dict, key: str):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        render_context_scene(0, **geometry)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ContextScenes("train", 2, **geometry)


# --- configs ---------------------------------------------------------------------------------------------


class LossHistory(L.Callback):
    """The training loss of every step (what training_step returned)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_experiment_mechanism_trains_backbone_and_both_heads(run_dir: Path):
    """experiment=mechanism as composed: its data and model, the real training loss (Eq. 1 on relabelled
    targets) reaching the local backbone, the unity head and the semantic head, and Lightning's optimizer
    steps lowering the loss on a train split of one batch (4 scenes, flips and brightness only)."""
    cfg = compose_config(["experiment=mechanism", *TINY, "data.size=96", "data.train_samples=4"], run_dir)
    assert cfg.model.backbone.name == "local" and cfg.model.context.name == "none"
    assert cfg.model.relabel.policy == "true_positive"
    datamodule = instantiate(cfg.data)
    L.seed_everything(0)
    module = instantiate(cfg.model, num_classes=datamodule.num_classes)
    datamodule.setup("fit")
    assert tuple(datamodule.classes) == CONTEXT_CLASSES
    # The pyramid targets are built after the batch reaches the device, as in training.
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert batch["image"].shape == (4, 3, 96, 96) and int(batch["label"].max()) < 6
    out = module(batch["image"])
    assert [tuple(y.shape[-2:]) for y in out.semantic] == [(3, 3), (6, 6), (12, 12), (24, 24)]
    assert [tuple(u.shape[-2:]) for u in out.unity] == [(3, 3), (6, 6), (12, 12)]

    parts = {
        "backbone": module.net.backbone,
        "unity head": module.net.unity_head,
        "semantic head": module.net.semantic_head,
    }
    total, _ = training_loss(out, batch["targets"], module.policy, module.tau)
    total.backward()
    for name, part in parts.items():
        grads = [parameter.grad for parameter in part.parameters()]
        assert all(grad is not None for grad in grads), f"no gradient reaches part of the {name}"
        assert sum(float(grad.abs().sum()) for grad in grads) > 0, f"zero gradient in the {name}"
    module.zero_grad()

    before = {name: [p.detach().clone() for p in part.parameters()] for name, part in parts.items()}
    history = LossHistory()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[history],
    )
    trainer.fit(module, datamodule=datamodule)
    assert len(history.losses) == 8 and all(np.isfinite(history.losses))
    assert history.losses[-1] < 0.9 * history.losses[0], history.losses
    for name, part in parts.items():
        changed = [
            not torch.equal(old, new) for old, new in zip(before[name], part.parameters(), strict=True)
        ]
        assert all(changed), f"the optimizer left {changed.count(False)} tensors of the {name} unchanged"


def compose_preset(name: str, run_dir: Path, *extra: str):
    """A preset's config as its first job composes it (the first value of every sweep axis)."""
    overrides = [override.split(",")[0] for override in PRESETS[name].overrides]
    return compose_config([*overrides, *extra], run_dir)


@pytest.mark.parametrize("preset", ["mechanism_table6", "mechanism_table7", "mechanism_levels"])
def test_table_presets_run_in_the_mechanism_regime(preset: str, run_dir: Path):
    """The presets built on the ADE20K ablation setting compose to the same data, backbone, heads,
    optimizer and trainer as experiment=mechanism."""
    reference = OmegaConf.to_container(compose_preset("mechanism", run_dir).copy(), resolve=False)
    cfg = OmegaConf.to_container(compose_preset(preset, run_dir).copy(), resolve=False)
    assert cfg["data"] == reference["data"]
    for key in ("backbone", "semantic_channels", "unity_channels", "optimizer", "tau"):
        assert cfg["model"][key] == reference["model"][key], key
    for key in ("accelerator", "precision", "check_val_every_n_epoch"):
        assert cfg["trainer"][key] == reference["trainer"][key], key
    assert "report" in cfg  # the paper's layout of the experiment stays
    if preset == "mechanism_levels":
        assert cfg["model"]["context"]["name"] == "none"


def test_regime_overrides_compose_to_experiment_mechanism(run_dir: Path):
    """MECHANISM_REGIME on the ADE20K ablation setting (what the mechanism_table* presets build on)
    composes to conf/experiment/mechanism.yaml's config: the same data, model and trainer, all but what
    each table varies (the context module), the task name and the step budget (ablation sets
    trainer.max_steps for every job)."""

    def composed(overrides: list[str]) -> dict:
        cfg = compose_config(overrides, run_dir)
        choices = {group: cfg.hydra.runtime.choices[group] for group in ("data", "model/backbone", "trainer")}
        config = OmegaConf.to_container(cfg, resolve=False)
        for key in ("hydra", "task_name"):
            del config[key]
        del config["model"]["context"], config["trainer"]["max_steps"]
        return {"choices": choices, **config}

    mechanism = composed(["experiment=mechanism"])
    regime = composed(["experiment=ablation_hrnet32", *MECHANISM_REGIME])
    assert mechanism["choices"] == {
        "data": "synthetic_context",
        "model/backbone": "local",
        "trainer": "default",
    }
    assert regime == mechanism


def test_sweep_command_names_job_folders_by_what_varies(tmp_path: Path):
    command = sweep_command("mechanism_table6", 10, "0,1", tmp_path, ["data.data_seed=3"])
    assert command[:4] == [sys.executable, "-m", "sfseg.train", "-m"]
    assert "seed=0,1" in command and "trainer.max_steps=10" in command and command[-1] == "data.data_seed=3"
    keys = exclude_keys(command)
    assert {"data.crop_size", "model/backbone", "experiment", "data.data_seed", "seed"} <= set(keys)
    assert "cell" not in keys  # the sweep axis names the jobs
    keys = exclude_keys(sweep_command("mechanism", 10, "0", tmp_path, ["model.tau=0.8,0.9", "x=[1,2]"]))
    assert "model.levels" not in keys and "model.tau" not in keys and "x" in keys


def test_an_extra_override_of_a_presets_key_replaces_the_presets_value(tmp_path: Path):
    command = sweep_command("camvid_factors", 10, "0", tmp_path, ["cell=L2,L4_naive", "data.root=/camvid"])
    assert [item for item in command if item.startswith("cell=")] == ["cell=L2,L4_naive"]
    assert "experiment=camvid_factors" in command  # the preset's other overrides stay
    command = sweep_command("camvid", 10, "0", tmp_path, ["model.levels=4", "data.root=/camvid"])
    assert [item for item in command if item.startswith("model.levels=")] == ["model.levels=4"]
    assert "model.levels" in exclude_keys(command)  # no longer an axis: left out of the job names


def exclude_keys(command: list[str]) -> list[str]:
    """The keys a sweep command leaves out of its job folder names."""
    prefix = "hydra.job.config.override_dirname.exclude_keys="
    (item,) = [item for item in command if item.startswith(prefix)]
    return item.removeprefix(prefix).strip("[]").split(",")


# --- end to end --------------------------------------------------------------------------------------------

# The toy regime that `python -m sfseg.gpu_check --tiny` runs the mechanism stage in, with no loader worker.
TINY_MECHANISM = [*check_sizes.TINY_MECHANISM, "data.num_workers=0", "trainer.enable_progress_bar=false"]


def run_ablation(cwd: Path, *args: str, fresh: bool = False) -> None:
    """`python -m sfseg.ablation ARGS` as a user runs it (forked, or `fresh`: tests/processes.py); it starts
    its sweep as `python -m sfseg.train -m ...` in a new interpreter itself."""
    result = run_module("sfseg.ablation", *args, cwd=cwd, env=ENV, fresh=fresh)
    assert result.returncode == 0, result.stderr[-3000:]


def goals_recomputed(jobs: list[Path]) -> tuple[float, list[bool]]:
    """The mechanism report's goals worked out from the jobs' files with numpy, apart from sfseg.sweeps:
    the fused gain of L=4 over L=1 and whether (1) it beats 3 seed spreads with 2+ seeds a side,
    (2) level 1 beats the finest level on the pixels taken from level 1 in every L=4 job, (3) the coarse
    levels take over half of the finest cells in every L=4 job."""

    def miou(confmat: np.ndarray) -> float:  # over the classes in the ground truth or the prediction
        hits = np.diag(confmat).astype(float)
        union = confmat.sum(0) + confmat.sum(1) - hits
        return float(np.mean(hits[union > 0] / union[union > 0])) if (union > 0).any() else float("nan")

    scores: dict[int, list[float]] = {1: [], 4: []}
    level1_ahead, coarse_shares = [], []
    for job in jobs:
        levels = yaml.safe_load((job / "config.yaml").read_text())["model"]["levels"]
        metrics = json.loads((job / "metrics.json").read_text())
        scores[levels].append(100 * metrics["mIoU"])
        if levels == 4:
            table9 = torch.load(job / "val_counts.pt", weights_only=True)["specialization"].numpy()
            level1_ahead.append(miou(table9[0, 0]) > miou(table9[0, 3]))  # [assigned, predicting]
            coarse_shares.append(sum(metrics[f"share_level{level}"] for level in (1, 2, 3)))
    gain = np.mean(scores[4]) - np.mean(scores[1])
    spread = max(np.std(scores[1], ddof=1), np.std(scores[4], ddof=1))
    return float(gain), [
        bool(gain > 3 * spread and min(len(scores[1]), len(scores[4])) > 1),
        all(level1_ahead),
        min(coarse_shares) > 0.5,
    ]


@pytest.mark.slow
def test_mechanism_preset_end_to_end(tmp_path: Path):
    out = tmp_path / "mechanism"
    run_ablation(
        tmp_path,
        "--preset",
        "mechanism",
        "--steps",
        "2",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        *TINY_MECHANISM,
        "data.data_seed=3",
        fresh=True,  # sfseg.ablation's test in a new interpreter
    )
    jobs = sorted(path.parent for path in out.glob("*/metrics.json"))
    assert len(jobs) == 4
    levels = []
    for job in jobs:
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["data"]["_target_"].endswith("SyntheticContextDataModule")
        assert config["data"]["data_seed"] == 3  # extra overrides reach every job
        assert config["model"]["backbone"]["name"] == "local" and config["model"]["context"]["name"] == "none"
        assert config["trainer"]["max_steps"] == 2
        assert json.loads((job / "metrics.json").read_text())["step"] == 2
        levels.append(config["model"]["levels"])
        assert (
            job.name.split("_", 1)[1] == f"model.levels={config['model']['levels']}"
        )  # named by what varies
    assert sorted(levels) == [1, 1, 4, 4]

    markdown = (out / "report.md").read_text()
    assert "| L | seeds | all classes: fused | all classes: finest only | look-alike: fused |" in markdown
    for level in (1, 4):
        (row,) = [line for line in markdown.splitlines() if line.startswith(f"| {level} | 2 |")]
        assert row.count("±") == 6  # overall, look-alike and controls; fused and finest
    assert "| controls: fused | controls: finest only |" in markdown
    assert "of the look-alike pixels have a marker of their class within the 31 x 31 square" in markdown
    for cls in CONTEXT_CLASSES:
        assert f"| {cls} |" in markdown
    assert "### Table 9 of one L=4 job" in markdown
    assert "| l' \\ l | 4 | 3 | 2 | 1 |" in markdown
    assert "finest cells taken (%)" in markdown
    # The fuse's headroom of the L=4 jobs, over all classes and each class group.
    for scope in ("all classes", "look-alike classes", "controls classes"):
        assert f"### The fuse's headroom, {scope}: mIoU (%) on the same pyramids" in markdown
    assert (
        "| L | fuse | seeds | fused | hard | soft | hard, bilinear Up | soft, bilinear Up | level 1 alone | "
        "best single level | oracle |" in markdown
    )
    assert markdown.count("| 4 | hard | 2 |") == 3
    goals = [line for line in markdown.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    gain, verdicts = goals_recomputed(jobs)
    assert f"L=4 fused - L=1 = {gain:+.2f} mIoU" in goals[0]
    assert [goal.rsplit(": ", 1)[1] for goal in goals] == [
        "**met**" if met else "**not met**" for met in verdicts
    ]
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["model.levels"] for row in rows) == ["1", "4"]
    assert all(row["seeds"] == "2" for row in rows)
    print(markdown)


@pytest.mark.slow
def test_fuse_preset_trains_the_gate_and_compares_the_rules_on_the_same_pyramids(tmp_path: Path):
    out = tmp_path / "fuse"
    run_ablation(
        tmp_path,
        "--preset",
        "mechanism_fuse",
        "--steps",
        "2",
        "--seeds",
        "0",
        "--out",
        str(out),
        *TINY_MECHANISM,
    )
    (job,) = [path.parent for path in out.glob("*/metrics.json")]
    config = yaml.safe_load((job / "config.yaml").read_text())
    assert config["model"]["fuse"]["name"] == "learned" and config["model"]["levels"] == 4
    assert config["model"]["backbone"]["name"] == "local" and config["trainer"]["max_steps"] == 2
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(metrics["mIoU_fuse_learned"])
    assert {"mIoU_fuse_hard", "mIoU_fuse_soft", "mIoU_oracle", "mIoU_best_level"} <= set(metrics)
    markdown = (out / "report.md").read_text()
    assert "of the look-alike pixels have a marker of their class" in markdown
    assert (
        "| fused | hard | soft | hard, bilinear Up | soft, bilinear Up | learned | level 1 alone |"
        in markdown
    )
    assert "### The fuse's headroom, look-alike classes" in markdown
    verdicts = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 9  # hard vs level 1; soft, hard and soft with bilinear Up, learned vs both
    assert all(line.endswith(("level 1 alone**", "hard**")) for line in verdicts)
    assert "One job: no seed spread, so a direction, not a result." in markdown


@pytest.mark.slow
def test_table7_preset_in_the_regime_reports_the_paper_layout_twice(tmp_path: Path):
    """`--preset mechanism_table7`: the paper's Table 7 over all classes, then over the look-alike
    classes, whose cells are the mean IoU of those classes (fused) of the job."""
    out = tmp_path / "table7"
    run_ablation(tmp_path, "--preset", "mechanism_table7", "--steps", "2", "--out", str(out), *TINY_MECHANISM)
    markdown = (out / "report.md").read_text()
    head = markdown.splitlines()[:3]
    assert (
        head[0]
        == f"# `python -m sfseg.ablation --preset mechanism_table7 --steps 2 --out {out} {' '.join(TINY_MECHANISM)}`"
    )
    assert head[2].startswith("Commit: ") and "(4 jobs)" in head[2] and "load average" in head[2]
    instruction_set = torch.backends.cpu.get_cpu_capability()
    assert (
        f"CPUs (torch threads per job: {ENV['OMP_NUM_THREADS']}; instruction set: {instruction_set})"
        in head[2]
    )
    assert "### Table 7: relabel policy, no context module (mIoU %)\n" in markdown
    assert "### Table 7: relabel policy, no context module (mIoU %), look-alike classes only" in markdown
    with (out / "report.csv").open() as handle:
        cells = [row for row in csv.DictReader(handle) if row["metric"] == "mIoU[look-alike]"]
    assert len(cells) == 4
    for cell in cells:
        (job,) = cell["jobs"].split(";")
        config = yaml.safe_load((out / job / "config.yaml").read_text())
        assert config["model"]["backbone"]["name"] == "local" and config["data"]["batch_size"] == 4
        per_class = json.loads((out / job / "metrics.json").read_text())["per_class_iou"]
        expected = np.nanmean(
            [np.nan if per_class[name] is None else per_class[name] for name in LOOK_ALIKE_CLASSES]
        )
        assert float(cell["mean"]) == pytest.approx(100 * expected)


# --- Table 6 on the scenes with both twins (`--preset mechanism_table6_twins`) ---------------------------------


def test_table6_twins_preset_composes_every_cell_on_the_twin_scenes(run_dir: Path):
    """Each of the paper's seven cells on data=synthetic_context_twins, with the regime's backbone,
    heads, optimizer and trainer."""
    preset = PRESETS["mechanism_table6_twins"]
    (axis,) = [override for override in preset.overrides if override.startswith("cell=")]
    reference = compose_preset("mechanism", run_dir)
    fixed = [override for override in preset.overrides if not override.startswith("cell=")]
    for cell in axis.removeprefix("cell=").split(","):
        cfg = compose_config([*fixed, f"cell={cell}"], run_dir)
        assert cfg.data.both_twins and list(cfg.data.size) == [192, 384] and cfg.data.batch_size == 4
        assert cfg.data["_target_"].endswith("SyntheticContextDataModule") and "crop_size" not in cfg.data
        for key in ("backbone", "semantic_channels", "unity_channels", "optimizer", "tau"):
            assert cfg.model[key] == reference.model[key], key
        assert cfg.model.levels == (1 if cell.startswith("single") else 4)
        assert cfg.model.context.name == cell.split("_", 1)[1]
    assert preset.seeds == "0,1,2"


def write_job(
    sweep: Path,
    name: str,
    config: dict,
    mistakes: int,
    seconds: float,
    classes: tuple[str, ...] = CONTEXT_CLASSES,
    pairs: tuple[tuple[int, int], ...] = ((0, 1), (2, 3)),
) -> float:
    """A hand-made job folder as train() leaves it; returns the IoU of the paired classes. Its confusion
    matrices (fused and every level, 100 pixels a class) send `mistakes` pixels of each class of a pair
    to the other: their IoU is then (100 - m) / (100 + m), the other classes' 1."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"cell={config['cell']}"]))
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "versions.json").write_text(json.dumps({"git_commit": "abc123", "git_dirty": False}))
    confmat = 100 * torch.eye(len(classes), dtype=torch.long)
    for first, second in pairs:
        for cls, other in ((first, second), (second, first)):
            confmat[cls, cls] -= mistakes
            confmat[cls, other] += mistakes
    levels = config["model"]["levels"]
    torch.save({"confmat": confmat.expand(levels + 1, -1, -1).clone()}, job / "val_counts.pt")
    iou = (100 - mistakes) / (100 + mistakes)
    paired = {classes[cls] for pair in pairs for cls in pair}
    per_class = {name: iou if name in paired else 1.0 for name in classes}
    miou = sum(per_class.values()) / len(classes)
    metrics = {"mIoU": miou, "mIoU_finest": miou, "mIoU_level1": miou, "per_class_iou": per_class, "step": 7}
    (job / "metrics.json").write_text(json.dumps(metrics))
    start = job.joinpath(".hydra", "overrides.yaml").stat().st_mtime
    os.utime(job / "metrics.json", (start + seconds, start + seconds))
    return iou


def test_table6_twins_report_lays_out_the_paper_table_from_job_folders(tmp_path: Path, run_dir: Path):
    """report.md of the preset, on hand-made job folders of the seven cells x two seeds: the paper's four
    columns (no OCR, CCNet), "-" for single x ANL-multi, each cell the mean of its seeds over all and over
    the look-alike classes, the cue on the val scenes, and a line per job with its minutes."""
    preset = PRESETS["mechanism_table6_twins"]
    fixed = [override for override in preset.overrides if not override.startswith("cell=")]
    sweep = tmp_path / "sweep"
    expected = {}
    cells = ("single_none", "single_anl", "single_c2f", "pyramidal_none", "pyramidal_anl")
    cells += ("pyramidal_anl_multi", "pyramidal_c2f")
    for number, cell in enumerate(cells):
        overrides = [*fixed, f"cell={cell}", "data.size=[64,128]", "data.region_size=32"]
        overrides += ["data.marker_spacing=16", "data.val_samples=3"]
        config = resolved_config(compose_config(overrides, run_dir))  # as train() saves it
        for seed, mistakes in ((0, 2 * number), (1, 2 * number + 10)):
            write_job(
                sweep, f"{2 * number + seed}_cell={cell}", {**config, "seed": seed}, mistakes, 90 + seed
            )
            expected.setdefault(cell, []).append(mistakes)

    markdown = preset.report(sweep)
    assert markdown == (sweep / "report.md").read_text()
    tables = [block for block in markdown.split("### ")[1:]]
    assert len(tables) == 2 and "look-alike classes only" in tables[1]
    for table, look_alike in zip(tables, (False, True), strict=True):
        lines = [line for line in table.splitlines() if line.startswith("|")]
        assert lines[0] == "| Output format | - | ANL | ANL-multi | ours (c2f) |"
        single, pyramidal = (line.split(" | ")[1:] for line in lines[2:4])
        assert single[2] == "-"  # the paper leaves single x ANL-multi empty
        order = ("none", "anl", "anl_multi", "c2f")
        for row, prefix in ((single, "single"), (pyramidal, "pyramidal")):
            for column, context in enumerate(order):
                if f"{prefix}_{context}" not in expected:
                    continue
                ious = [(100 - m) / (100 + m) for m in expected[f"{prefix}_{context}"]]
                values = [100 * iou if look_alike else 100 * (4 * iou + 2) / 6 for iou in ious]
                mean, spread = np.mean(values), np.std(values, ddof=1)
                assert row[column].strip(" |") == f"{mean:.2f} ± {spread:.2f}"
    assert "of the look-alike pixels have a marker of their class within the 31 x 31 square" in markdown
    job_lines = [line.strip("| ").split(" | ") for line in markdown.splitlines() if "_cell=" in line]
    assert len(job_lines) == 14
    for name, seed, *_, steps, minutes in job_lines:
        assert seed == str(int(name.split("_")[0]) % 2) and steps == "7" and minutes == "1.5"  # 90 or 91 s


# --- Table 7 on the embedded default (`--preset default_table7`) ----------------------------------------------


def test_default_table7_preset_composes_the_embedded_default_per_policy(run_dir: Path):
    """experiment=synthetic's data, backbone, heads, optimizer and trainer, without a context module,
    one relabel policy per cell."""
    preset = PRESETS["default_table7"]
    (axis,) = [override for override in preset.overrides if override.startswith("cell=")]
    assert axis == "cell=naive,oracle,true_positive" and preset.seeds == "0,1,2"
    reference = compose_config(["experiment=synthetic"], run_dir)
    fixed = [override for override in preset.overrides if not override.startswith("cell=")]
    for policy in ("naive", "oracle", "true_positive"):
        cfg = compose_config([*fixed, f"cell={policy}"], run_dir)
        assert cfg.data == reference.data
        for key in ("backbone", "semantic_channels", "unity_channels", "optimizer", "tau", "levels"):
            assert cfg.model[key] == reference.model[key], key
        assert cfg.model.context.name == "none" and cfg.model.relabel.policy == policy
        assert cfg.trainer.accelerator == reference.trainer.accelerator
        assert cfg.trainer.check_val_every_n_epoch == 1000  # one validation, after training


def test_fuse_default_preset_trains_as_long_as_make_train(run_dir: Path):
    """`--preset fuse_default` is the embedded default with the learned fuse: its step budget is
    experiment=synthetic's, whatever that becomes."""
    preset = PRESETS["fuse_default"]
    reference = compose_config(["experiment=synthetic"], run_dir)
    assert preset.steps == reference.trainer.max_steps and preset.overrides == ("model/fuse=learned",)


def test_default_table7_report_has_the_three_policies_over_all_classes_and_things(
    tmp_path: Path, run_dir: Path
):
    preset = PRESETS["default_table7"]
    fixed = [override for override in preset.overrides if not override.startswith("cell=")]
    sweep = tmp_path / "sweep"
    things = ((6, 7), (8, 9), (10, 11))  # person/car, pole/sign, ball/window: SYNTHETIC_THINGS
    expected = {}
    for number, policy in enumerate(("naive", "oracle", "true_positive")):
        config = resolved_config(compose_config([*fixed, f"cell={policy}", "data.val_samples=3"], run_dir))
        iou = write_job(
            sweep, f"{number}_cell={policy}", config, 30 - 10 * number, 60, SYNTHETIC_CLASSES, things
        )
        expected[policy] = iou
    markdown = preset.report(sweep)
    tables = markdown.split("### ")[1:]
    assert len(tables) == 2 and "things classes only" in tables[1]
    header = "|  | naive | simple fix (oracle) | our final (true positive) |"
    for table, on_things in zip(tables, (False, True), strict=True):
        lines = [line for line in table.splitlines() if line.startswith("|")]
        assert lines[0] == header  # the single output, not swept, is left out
        cells = lines[2].strip("| ").split(" | ")[1:]
        for cell, policy in zip(cells, ("naive", "oracle", "true_positive"), strict=True):
            iou = expected[policy]
            value = 100 * iou if on_things else 100 * (6 * iou + 6) / 12
            assert cell == f"{value:.2f} ± 0.00"
    assert "marker" not in markdown  # no cue note: not the look-alike scenes
    assert len([line for line in markdown.splitlines() if "_cell=" in line]) == 3
