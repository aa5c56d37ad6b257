"""Look-alike scenes (`data=synthetic_context`): a setting built to isolate the mechanism of Specialize
and Fuse, not evidence about natural images.

Wavy lines cut the image into a grid of large regions. Each region wears one of four looks, the colour
box and texture of sky, wall, grass or road from `sfseg.data.synthetic`, and no two regions that touch,
even at a corner, wear the same look. Two looks are worn by two classes each: water is drawn exactly like
sky and sand exactly like wall. Which of the two a region is, a fair coin decides, independently of
everything else in the scene, so position, region shape, neighbours, colour and texture say nothing about
it. Only the region's markers do: small squares of one exact colour that names the class (sky red,
water yellow, wall magenta, sand cyan), stuck on the finished picture, on a lattice of `marker_spacing` pixels with a random phase, wherever a marker
fits inside its region. Marker pixels belong to their region's class. Grass and road are the controls:
their look alone names them.

With markers sparse enough, most pixels of a look-alike region have no marker of their region within a
small backbone's receptive field R (`model/backbone=local`), so a classifier that sees R pixels can only
guess there, while a coarse pyramid cell, which pools a cell of s_l pixels and so sees about s_l + R
(Eq. 3 with `model/context=none`), does see one. `cue_coverage` measures both on rendered scenes.

With `both_twins` (`data=synthetic_context_twins`), every image holds both twins of each pair: the grid
has at least two regions of each look-alike look, and their classes are dealt so that each twin gets
about half of them (which region gets which, a shuffle decides). Looking over the whole image then
no longer tells which twin a region is (both sets of markers are always there): a context module that
attends over the image has to pick the markers of the pixel's own region.

Determinism as in `sfseg.data.synthetic`: a scene depends only on (seed, split, index, size and the
geometry keys), drawn with PCG64 uniform draws and IEEE-exact arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from sfseg.data import synthetic
from sfseg.data.classes import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from sfseg.data.synthetic import SyntheticScenes, finish_image

__all__ = [
    "CONTEXT_CLASSES",
    "CONTEXT_PALETTE",
    "LOOK_ALIKE_CLASSES",
    "LOOK_ALIKE_PAIRS",
    "SCENE_KEYS",
    "ContextScene",
    "ContextScenes",
    "cue_coverage",
    "draw_context_scene",
    "render_context_scene",
]

SKY, WATER, WALL, SAND, GRASS, ROAD = range(6)
CONTEXT_CLASSES: tuple[str, ...] = ("sky", "water", "wall", "sand", "grass", "road")
CONTEXT_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    SYNTHETIC_PALETTE[SYNTHETIC_CLASSES.index(name)] for name in CONTEXT_CLASSES
)
LOOK_ALIKE_PAIRS: tuple[tuple[str, str], ...] = (("sky", "water"), ("wall", "sand"))
LOOK_ALIKE_CLASSES: tuple[str, ...] = tuple(name for pair in LOOK_ALIKE_PAIRS for name in pair)

# The four looks (a class of sfseg.data.synthetic whose colour box and texture a region wears) and the
# classes that wear each.
_LOOKS: tuple[tuple[int, tuple[int, ...]], ...] = (
    (synthetic.SKY, (SKY, WATER)),
    (synthetic.WALL, (WALL, SAND)),
    (synthetic.GRASS, (GRASS,)),
    (synthetic.ROAD, (ROAD,)),
)
# Saturated colours that no look's colour box comes near.
MARKER_COLOURS: dict[int, tuple[int, int, int]] = {
    SKY: (230, 30, 30),  # red
    WATER: (240, 225, 20),  # yellow
    WALL: (225, 30, 225),  # magenta
    SAND: (20, 225, 225),  # cyan
}
NO_MARKER = 255

DEFAULT_GEOMETRY = {"region_size": 96, "marker_spacing": 64, "marker_size": 8}
# The data config keys that shape a scene beyond its size and seed (draw_context_scene's keywords).
SCENE_KEYS = (*DEFAULT_GEOMETRY, "both_twins")


class ContextScene(NamedTuple):
    """uint8 RGB image [H,W,3], label map [H,W] (values 0..5) and marker map [H,W]: the class a marker
    pixel names, NO_MARKER elsewhere."""

    image: np.ndarray
    label: np.ndarray
    markers: np.ndarray


def check_geometry(region_size: int, marker_spacing: int, marker_size: int) -> None:
    """Clear errors for geometry keys that cannot make a scene."""
    if marker_size < 1:
        raise ValueError(f"data.marker_size must be >= 1, got {marker_size}")
    if marker_spacing <= marker_size:
        raise ValueError(
            f"data.marker_spacing={marker_spacing} must exceed data.marker_size={marker_size} (markers would touch)"
        )
    if region_size < 2 * marker_size:
        raise ValueError(
            f"data.region_size must be >= 2 * data.marker_size = {2 * marker_size}, got {region_size}"
        )


def grid_shape(size: tuple[int, int], region_size: int) -> tuple[int, int]:
    """Rows and columns of the region grid: round(H / region_size) x round(W / region_size), at least 1."""
    return max(1, round(size[0] / region_size)), max(1, round(size[1] / region_size))


def _slot_sizes(rows: int, cols: int) -> np.ndarray:
    """Regions per slot of the 2 x 2 look tiling (slot (row % 2) * 2 + col % 2)."""
    even_rows, odd_rows = (rows + 1) // 2, rows // 2
    even_cols, odd_cols = (cols + 1) // 2, cols // 2
    return np.array([even_rows * even_cols, even_rows * odd_cols, odd_rows * even_cols, odd_rows * odd_cols])


def check_twin_layout(size: tuple[int, int], region_size: int) -> None:
    """Clear error when the grid cannot hold both twins of each pair: that needs two slots of the look
    tiling with two regions or more (e.g. 2 x 3 regions or more, or 3 x 3)."""
    rows, cols = grid_shape(size, region_size)
    if int((_slot_sizes(rows, cols) >= 2).sum()) < len(LOOK_ALIKE_PAIRS):
        raise ValueError(
            f"data.both_twins=true needs at least two regions of each look-alike look, but data.size={list(size)} "
            f"with data.region_size={region_size} gives a {rows} x {cols} grid; a grid of 2 x 3 regions or more has them "
            "(e.g. data.size=[192,384] with data.region_size=96: 2 x 4)"
        )


def _bands(count: int, length: int, along: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Band index (0..count-1) of every coordinate 0..length-1 across `count - 1` wavy cuts.

    Returns [length, len(along)]: the cuts run along `along` (coordinates in [0, 1)). Jitter and waves
    stay below half the spacing, so neighbouring cuts never cross and the bands keep their order.
    """
    spacing = length / count
    coord = np.arange(length, dtype=np.float64)[:, None]
    band = np.zeros((length, along.size), dtype=np.int64)
    for cut in range(1, count):
        level = (cut + rng.uniform(-0.2, 0.2)) * spacing + synthetic.wave(along, rng, 0.1 * spacing)
        band += coord >= level[None, :]
    return band


def _marker_tops(length: int, spacing: int, size: int, phase: int) -> np.ndarray:
    return np.arange(phase, length - size + 1, spacing)


def draw_context_scene(
    index: int,
    seed: int = 0,
    split: str = "train",
    size: tuple[int, int] = (192, 192),
    region_size: int = DEFAULT_GEOMETRY["region_size"],
    marker_spacing: int = DEFAULT_GEOMETRY["marker_spacing"],
    marker_size: int = DEFAULT_GEOMETRY["marker_size"],
    both_twins: bool = False,
) -> ContextScene:
    """Draw scene `index` with its marker map (see the module docstring)."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and data.data_seed must be >= 0, got index={index}, seed={seed}")
    h, w = synthetic.check_size(size)
    check_geometry(region_size, marker_spacing, marker_size)
    if both_twins:
        check_twin_layout((h, w), region_size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), synthetic.split_id(split), int(index)]))
    canvas = synthetic.Canvas(h, w, rng)
    y, x = synthetic.axes(h, w)

    rows_count, cols_count = grid_shape((h, w), region_size)
    rows = _bands(rows_count, h, x[0] / w, rng)  # horizontal cuts, wavy along x
    cols = _bands(cols_count, w, y[:, 0] / h, rng).T  # vertical cuts, wavy along y
    region = rows * cols_count + cols
    # A 2x2 tiling of the four looks keeps regions that touch (also diagonally) apart in look.
    looks = rng.permutation(len(_LOOKS))
    twin_of = None
    if both_twins:
        looks, twin_of = _deal_twins(looks, rows_count, cols_count, rng)
    markers = np.full((h, w), NO_MARKER, dtype=np.uint8)
    offsets = np.arange(marker_size)
    for row in range(rows_count):
        for col in range(cols_count):
            mask = region == row * cols_count + col
            look, wearers = _LOOKS[looks[(row % 2) * 2 + col % 2]]
            twin = int(rng.integers(len(wearers))) if twin_of is None else twin_of[row, col]
            cls = wearers[twin]
            canvas.label[mask] = cls
            canvas.paint_region(mask, look)
            if cls not in MARKER_COLOURS:
                continue
            phase_y, phase_x = (int(p) for p in rng.integers(0, marker_spacing, size=2))
            tops = _marker_tops(h, marker_spacing, marker_size, phase_y)
            lefts = _marker_tops(w, marker_spacing, marker_size, phase_x)
            top, left = (t.ravel() for t in np.meshgrid(tops, lefts, indexing="ij"))
            pixel_y = top[:, None, None] + offsets[None, :, None]
            pixel_x = left[:, None, None] + offsets[None, None, :]
            inside = mask[pixel_y, pixel_x].all(axis=(1, 2))  # whole marker inside its region
            markers[pixel_y[inside], pixel_x[inside]] = cls
    image = finish_image(canvas)
    # Markers are stickers put on the finished picture: their exact colour, no contrast, brightness or noise.
    colours = np.zeros((len(CONTEXT_CLASSES), 3), dtype=np.uint8)
    for cls, colour in MARKER_COLOURS.items():
        colours[cls] = colour
    marked = markers != NO_MARKER
    image[marked] = colours[markers[marked]]
    return ContextScene(image, canvas.label, markers)


def _deal_twins(
    looks: np.ndarray, rows: int, cols: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The looks of the tiling's slots reordered so that the two look-alike looks sit in slots of two
    regions or more, and which twin (0 or 1) each region of the grid is, [rows, cols] (0 for controls).

    The slots keep the drawn order of their looks, the roomy ones first. Each look-alike slot's regions
    are dealt the two twins in turn from a random first twin, then shuffled over the regions."""
    sizes = _slot_sizes(rows, cols)
    by_look = np.argsort(looks)  # the slot of each drawn look
    ordered = [*(s for s in by_look if sizes[s] >= 2), *(s for s in by_look if sizes[s] < 2)]
    looks = np.empty_like(looks)
    looks[ordered] = np.arange(len(ordered))  # _LOOKS lists the look-alike looks first
    slot = (np.arange(rows)[:, None] % 2) * 2 + np.arange(cols)[None, :] % 2
    twin = np.zeros((rows, cols), dtype=np.int64)
    for look in range(len(LOOK_ALIKE_PAIRS)):
        where = slot == ordered[look]
        dealt = (int(rng.integers(2)) + np.arange(int(where.sum()))) % 2
        twin[where] = rng.permutation(dealt)
    return looks, twin


def render_context_scene(
    index: int, seed: int = 0, split: str = "train", size: tuple[int, int] = (192, 192), **geometry: Any
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB image [H,W,3] and uint8 label map [H,W] with values 0..5 of scene `index`."""
    scene = draw_context_scene(index, seed, split, size, **geometry)
    return scene.image, scene.label


def cue_coverage(
    scenes: Sequence[ContextScene], receptive_field: int, cell_sizes: Sequence[int]
) -> dict[str, float]:
    """How far the cue is from the pixels of the look-alike classes, over rendered scenes.

    "pixel": the share of look-alike pixels with a marker of their own class inside the R x R square
    centred on them (R = receptive_field). "cell<s>": the share of look-alike pixels in s x s cells
    (aligned on an s-pixel grid, all of one class) whose field, the cell grown by R // 2 on each side,
    holds a marker of that class; "cells<s>": the share of look-alike pixels that lie in such
    whole-class cells at all.
    """
    seen_by_pixel = look_alike = 0
    in_cells = dict.fromkeys(cell_sizes, 0)
    seen_by_cell = dict.fromkeys(cell_sizes, 0)
    for scene in scenes:
        label = scene.label
        own_marker_near = np.zeros(label.shape, dtype=bool)
        for cls in MARKER_COLOURS:
            near = ndimage.maximum_filter(scene.markers == cls, size=receptive_field, mode="constant")
            own_marker_near |= near & (label == cls)
        is_look_alike = np.isin(label, list(MARKER_COLOURS))
        look_alike += int(is_look_alike.sum())
        seen_by_pixel += int(own_marker_near.sum())
        for cell in cell_sizes:
            whole, seen = _cells_seeing(label, scene.markers, is_look_alike, cell, receptive_field)
            in_cells[cell] += whole
            seen_by_cell[cell] += seen
    total = max(look_alike, 1)
    result = {"pixel": seen_by_pixel / total}
    for cell in cell_sizes:
        result[f"cells{cell}"] = in_cells[cell] / total
        result[f"cell{cell}"] = seen_by_cell[cell] / max(in_cells[cell], 1)
    return result


def _cells_seeing(
    label: np.ndarray, markers: np.ndarray, is_look_alike: np.ndarray, cell: int, receptive_field: int
) -> tuple[int, int]:
    """Pixels of look-alike classes in whole-class s x s cells, and those of them whose cell's field
    (the cell grown by R // 2) holds a marker of the cell's class."""
    h, w = label.shape
    ch, cw = h // cell, w // cell
    blocks = label[: ch * cell, : cw * cell].reshape(ch, cell, cw, cell)
    uniform = (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3))
    cell_class = blocks[:, 0, :, 0]
    whole = uniform & is_look_alike[: ch * cell : cell, : cw * cell : cell]
    seen = np.zeros_like(whole)
    half = receptive_field // 2
    for cls in MARKER_COLOURS:
        near = ndimage.maximum_filter(markers == cls, size=2 * half + 1, mode="constant")
        # A marker within R // 2 of any pixel of the cell.
        cell_near = near[: ch * cell, : cw * cell].reshape(ch, cell, cw, cell).any(axis=(1, 3))
        seen |= whole & (cell_class == cls) & cell_near
    return int(whole.sum()) * cell * cell, int(seen.sum()) * cell * cell


class ContextScenes(SyntheticScenes):
    """Look-alike scenes rendered in __getitem__, as `SyntheticScenes` (same keys, splits, transform hook)."""

    classes: tuple[str, ...] = CONTEXT_CLASSES
    palette: tuple[tuple[int, int, int], ...] = CONTEXT_PALETTE

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        size: tuple[int, int] = (192, 192),
        seed: int = 0,
        transform: Callable[..., dict[str, Any]] | None = None,
        region_size: int = DEFAULT_GEOMETRY["region_size"],
        marker_spacing: int = DEFAULT_GEOMETRY["marker_spacing"],
        marker_size: int = DEFAULT_GEOMETRY["marker_size"],
        both_twins: bool = False,
    ) -> None:
        super().__init__(split, num_samples, size, seed, transform)
        check_geometry(region_size, marker_spacing, marker_size)
        if both_twins:
            check_twin_layout(self.size, region_size)
        self.geometry = {
            "region_size": region_size,
            "marker_spacing": marker_spacing,
            "marker_size": marker_size,
            "both_twins": both_twins,
        }

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_context_scene(index, self.seed, self.split, self.size, **self.geometry)
