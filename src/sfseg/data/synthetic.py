"""Synthetic street-like scenes: the embedded default dataset, rendered on the fly, no files needed.

Each scene has large stuff regions with wavy boundaries (sky, wall, and a ground split into water /
grass / road / sand) and small things on top (person, car, pole, sign, ball, window), so that coarse
pyramid levels can own the big uniform regions and fine levels the small things and the boundaries.
Class colours overlap on purpose and every class has its own texture, so colour alone cannot solve it.

Determinism: a scene depends only on (seed, split, index, size). The generator uses PCG64 draws
(uniform only) and float64 +, -, *, /, floor, sqrt and comparisons, which IEEE 754 fixes bit for bit;
libm/SIMD transcendental functions (sin, exp, log, and so normal draws) are avoided because their last
bits differ between machines, and a one-ulp difference could flip a thresholded label pixel.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sfseg.data.classes import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from sfseg.data.transforms import apply

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_PALETTE", "SyntheticScenes", "render_scene"]

SPLIT_IDS = {"train": 0, "val": 1}
DEFAULT_NUM_SAMPLES = {"train": 2000, "val": 200}
MIN_SIZE = 32
# A split whose rendered scenes fit in this many bytes is kept in memory after each scene's first draw.
MAX_CACHED_BYTES = 512 * 2**20

SKY, WALL, WATER, GRASS, ROAD, SAND, PERSON, CAR, POLE, SIGN, BALL, WINDOW = range(12)
GROUND = (WATER, GRASS, ROAD, SAND)

# Base colour box per class (RGB low, high). The boxes overlap on purpose: sky/water/window blues,
# grass/sign greens, wall/sand/person/ball browns, road/pole greys, and cars can be any colour.
_COLOUR_BOX = {
    SKY: ((85, 135, 185), (175, 215, 255)),
    WALL: ((130, 95, 70), (215, 170, 145)),
    WATER: ((35, 90, 135), (135, 180, 235)),
    GRASS: ((40, 100, 30), (125, 185, 100)),
    ROAD: ((65, 65, 65), (155, 155, 160)),
    SAND: ((160, 130, 80), (235, 205, 155)),
    PERSON: ((95, 60, 40), (205, 155, 130)),
    CAR: ((30, 30, 30), (225, 225, 225)),
    POLE: ((75, 75, 75), (180, 180, 185)),
    SIGN: ((30, 105, 35), (115, 200, 120)),
    BALL: ((150, 45, 25), (250, 200, 165)),
    WINDOW: ((35, 60, 90), (125, 150, 195)),
}
# Texture strength range per class: pixel = colour * (1 + amplitude * texture), texture in [-1, 1].
_TEXTURE_AMPLITUDE = {
    SKY: (0.10, 0.25),
    WALL: (0.20, 0.35),
    WATER: (0.10, 0.25),
    GRASS: (0.20, 0.35),
    ROAD: (0.10, 0.25),
    SAND: (0.15, 0.30),
    PERSON: (0.20, 0.35),
    CAR: (0.20, 0.35),
    POLE: (0.0, 0.0),
    SIGN: (0.25, 0.40),
    BALL: (0.30, 0.45),
    WINDOW: (0.30, 0.50),
}


def split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"data.split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    return SPLIT_IDS[split]


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"data.size must be (H, W) with both >= {MIN_SIZE}, got {tuple(size)}")
    return h, w


def _sin_turns(t: np.ndarray) -> np.ndarray:
    """sin(2*pi*t) from a polynomial (error < 1e-5): bit-identical on every machine, unlike np.sin."""
    u = t - np.floor(t + 0.5)  # [-0.5, 0.5)
    u = np.where(u > 0.25, 0.5 - u, u)
    u = np.where(u < -0.25, -0.5 - u, u)  # [-0.25, 0.25], where the Taylor series converges fast
    a = (2.0 * np.pi) * u
    a2 = a * a
    return a * (1.0 + a2 * (-1.0 / 6 + a2 * (1.0 / 120 + a2 * (-1.0 / 5040 + a2 / 362880))))


def wave(u: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth random curve over u in [0, 1]: three sines of 0.5-4 cycles, decreasing amplitudes."""
    out = np.zeros_like(u)
    for k, weight in enumerate((1.0, 0.5, 0.25)):
        cycles = rng.uniform(0.5, 1.5) * 2.0**k
        out += weight * amplitude * _sin_turns(cycles * u + rng.random())
    return out


def _value_noise(h: int, w: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random grid with `cell`-pixel spacing, bilinearly interpolated."""
    fy = np.arange(h) / cell
    fx = np.arange(w) / cell
    iy = fy.astype(np.int64)
    ix = fx.astype(np.int64)
    wy = (fy - iy)[:, None]
    wx = (fx - ix)[None, :]
    grid = rng.random((iy[-1] + 2, ix[-1] + 2)) * 2.0 - 1.0
    top = grid[iy][:, ix] * (1.0 - wx) + grid[iy][:, ix + 1] * wx
    bottom = grid[iy + 1][:, ix] * (1.0 - wx) + grid[iy + 1][:, ix + 1] * wx
    return top * (1.0 - wy) + bottom * wy


def _stripes(coord: np.ndarray, period: int) -> np.ndarray:
    """+1 / -1 stripes of `period` pixels along an integer-valued coordinate."""
    return np.where(coord % period < period / 2, 1.0, -1.0)


# Textures: (y [h,1], x [1,w] local pixel coordinates, rng) -> values in about [-1, 1], broadcastable to [h,w].
def _tex_sky(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return y / max(float(y[-1, 0]), 1.0) * 2.0 - 1.0  # smooth vertical gradient, lighter downwards


def _tex_wall(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    brick_h = int(rng.integers(4, 8))
    brick_w = int(rng.integers(8, 16))
    row = np.floor(y / brick_h)
    xs = x + (row % 2) * (brick_w // 2)  # every other row shifted by half a brick
    mortar = (y - row * brick_h < 1) | (xs % brick_w < 1)
    return np.where(mortar, -1.0, 0.3)


def _tex_water(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    wobble = rng.uniform(0.5, 2.0) * _sin_turns(x / rng.uniform(8.0, 20.0) + rng.random())
    return _sin_turns((y + wobble) / rng.uniform(3.0, 6.0))  # horizontal ripples


def _tex_grass(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    columns = rng.random(x.shape) * 2.0 - 1.0  # one value per pixel column: vertical streaks
    return 0.75 * columns + 0.25 * (rng.random((y.shape[0], x.shape[1])) * 2.0 - 1.0)


def _tex_road(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.random((y.shape[0], x.shape[1])) * 2.0 - 1.0  # fine speckle


def _tex_sand(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _value_noise(y.shape[0], x.shape[1], rng.uniform(10.0, 20.0), rng)  # low-frequency blobs


def _tex_person(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _stripes(x, int(rng.integers(2, 4)))  # vertical stripes


def _tex_car(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _stripes(y, int(rng.integers(3, 6)))  # horizontal bands


def _tex_pole(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros(1)  # flat


def _tex_sign(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cell = int(rng.integers(1, 3))
    return np.where((np.floor(y / cell) + np.floor(x / cell)) % 2 == 0, 1.0, -1.0)  # checker


def _tex_ball(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cy = (y.shape[0] - 1) / 2
    cx = (x.shape[1] - 1) / 2
    r2 = ((y - cy) ** 2 + (x - cx) ** 2) / max(cy * cx, 1.0)
    return np.maximum(1.0 - 2.0 * r2, -1.0)  # radial shading, bright centre


def _tex_window(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pane = int(rng.integers(3, 6))
    return np.where((y % pane < 1) | (x % pane < 1), -1.0, 0.5)  # dark frame grid, bright panes


_TEXTURES: dict[int, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    SKY: _tex_sky,
    WALL: _tex_wall,
    WATER: _tex_water,
    GRASS: _tex_grass,
    ROAD: _tex_road,
    SAND: _tex_sand,
    PERSON: _tex_person,
    CAR: _tex_car,
    POLE: _tex_pole,
    SIGN: _tex_sign,
    BALL: _tex_ball,
    WINDOW: _tex_window,
}


def _colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    low, high = (np.asarray(b, dtype=np.float64) for b in _COLOUR_BOX[cls])
    # Mostly shared across channels so that grey classes stay grey and brightness varies coherently.
    u = 0.7 * rng.random() + 0.3 * rng.random(3)
    return low + (high - low) * u


def _amplitude(cls: int, rng: np.random.Generator) -> float:
    return float(rng.uniform(*_TEXTURE_AMPLITUDE[cls]))


@lru_cache(maxsize=8)
def axes(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


class Canvas:
    """Label map plus per-pixel base colour and texture modulation, painted layer by layer."""

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.label = np.zeros((h, w), dtype=np.uint8)
        self.base = np.zeros((h, w, 3), dtype=np.float64)
        self.mod = np.zeros((h, w), dtype=np.float64)

    def paint_stuff(self, cls: int) -> None:
        mask = self.label == cls
        if mask.any():
            self.paint_region(mask, cls)

    def paint_region(self, mask: np.ndarray, look: int) -> None:
        """Paint the pixels of `mask` with one colour, amplitude and texture draw of class `look`."""
        y, x = axes(self.h, self.w)
        texture = np.broadcast_to(_TEXTURES[look](y, x, self.rng), (self.h, self.w))
        self.base[mask] = _colour(look, self.rng)
        self.mod[mask] = _amplitude(look, self.rng) * texture[mask]

    def paint_thing(
        self,
        cls: int,
        top: int,
        left: int,
        shape: Callable[[np.ndarray, np.ndarray], np.ndarray],
        height: int,
        width: int,
        only_on: int | None = None,
    ) -> None:
        """Paint shape(y, x) (local coords of a height x width box at top/left), clipped to the image."""
        y0, y1 = max(top, 0), min(top + height, self.h)
        x0, x1 = max(left, 0), min(left + width, self.w)
        if y0 >= y1 or x0 >= x1:
            return
        y = np.arange(y0 - top, y1 - top, dtype=np.float64)[:, None]
        x = np.arange(x0 - left, x1 - left, dtype=np.float64)[None, :]
        mask = np.broadcast_to(shape(y, x), (y1 - y0, x1 - x0))
        if only_on is not None:
            mask = mask & (self.label[y0:y1, x0:x1] == only_on)
        # Texture on the full box so that its pattern (e.g. ball shading) is centred on the shape.
        full_y = np.arange(height, dtype=np.float64)[:, None]
        full_x = np.arange(width, dtype=np.float64)[None, :]
        texture = np.broadcast_to(_TEXTURES[cls](full_y, full_x, self.rng), (height, width))
        texture = texture[y0 - top : y1 - top, x0 - left : x1 - left]
        self.label[y0:y1, x0:x1][mask] = cls
        self.base[y0:y1, x0:x1][mask] = _colour(cls, self.rng)
        self.mod[y0:y1, x0:x1][mask] = _amplitude(cls, self.rng) * texture[mask]


def _disk(cy: float, cx: float, r: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda y, x: (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _full(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.ones((y.shape[0], x.shape[1]), dtype=bool)


def _person_shape(h: int, w: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    r = max(w * 0.35, 1.0)
    c = (w - 1) / 2

    def shape(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        head = (y - r) ** 2 + (x - c) ** 2 <= r * r
        body = y >= 1.8 * r
        if w >= 5:  # a gap between the legs once there is room for one
            body = body & ~((y >= 0.65 * h) & (np.abs(x - c) < 0.6))
        return head | body

    return shape


def _car_shape(h: int, w: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def shape(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        cabin = (x >= 0.2 * w) & (x < 0.8 * w)
        return (y >= 0.4 * h) | cabin

    return shape


def _sign_shape(size: int, kind: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    c = (size - 1) / 2
    if kind == 0:
        return _full
    if kind == 1:
        return lambda y, x: np.abs(y - c) + np.abs(x - c) <= size / 2  # diamond
    return _disk(c, c, size / 2)


def _layout_stuff(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Sky, optional wall and the ground regions into canvas.label; returns the horizon row per column."""
    h, w = canvas.h, canvas.w
    y, x = axes(h, w)
    u_x = x[0] / w
    u_y = y[:, 0] / h
    horizon_level = h * rng.uniform(0.25, 0.5)
    horizon = horizon_level + wave(u_x, rng, 0.05 * h)
    ground = y >= horizon[None, :]

    wall_kind = rng.random()
    if wall_kind < 0.2:  # wall instead of sky: a facade filling everything above the horizon
        canvas.label[~ground] = WALL
    elif wall_kind < 0.55:  # a building next to the sky, standing on the horizon
        left = w * rng.uniform(-0.3, 0.6) + wave(u_y, rng, 0.03 * w)
        right = left + w * rng.uniform(0.3, 0.7) + wave(u_y, rng, 0.03 * w)
        roof = h * rng.uniform(0.02, 0.25) + wave(u_x, rng, 0.04 * h)
        wall = (x >= left[:, None]) & (x < right[:, None]) & (y >= roof[None, :]) & ~ground
        canvas.label[wall] = WALL

    # The ground is cut by 1-2 roughly horizontal wavy curves and maybe one roughly vertical one; each
    # resulting region gets a ground class, neighbours along the region order always different.
    band = np.zeros((h, w), dtype=np.int64)
    for _ in range(int(rng.integers(1, 3))):
        level = horizon_level + (h - horizon_level) * rng.uniform(0.15, 0.85)
        band += y >= (level + wave(u_x, rng, 0.05 * h))[None, :]
    region = band * 2
    if rng.random() < 0.6:
        split_x = w * rng.uniform(0.2, 0.8) + wave(u_y, rng, 0.08 * w)
        region += x >= split_x[:, None]
    steps = rng.integers(1, len(GROUND), size=6)
    region_class = np.asarray(GROUND, dtype=np.uint8)[np.cumsum(steps) % len(GROUND)]
    canvas.label[ground] = region_class[region[ground]]
    return horizon


def _add_windows(canvas: Canvas, rng: np.random.Generator) -> None:
    wall_pixels = np.flatnonzero(canvas.label == WALL)
    if wall_pixels.size < 64:
        return
    for _ in range(int(rng.integers(1, 7))):
        centre = int(wall_pixels[rng.integers(wall_pixels.size)])
        height, width = int(rng.integers(6, 17)), int(rng.integers(5, 15))
        top, left = centre // canvas.w - height // 2, centre % canvas.w - width // 2
        canvas.paint_thing(WINDOW, top, left, _full, height, width, only_on=WALL)


def _ground_things(canvas: Canvas, horizon: np.ndarray, rng: np.random.Generator) -> None:
    """Persons, cars, poles (some with a sign on top) and balls standing on the ground, far to near."""
    h, w = canvas.h, canvas.w
    count = max(1, round(rng.integers(4, 12) * h * w / 128**2))  # same density at any canvas size
    ops: list[tuple[float, int, Callable[[], None]]] = []
    for i in range(count):
        cx = int(rng.integers(w))
        lo = min(float(horizon[cx]) + 1.0, h - 1.0)
        foot = rng.uniform(lo, h + 2.0)
        depth = 0.45 + 0.55 * min((foot - lo) / max(h - lo, 1.0), 1.0)  # nearer the horizon -> smaller
        kind = rng.random()
        bottom = int(foot)
        if kind < 0.3:
            ht = max(6, round(depth * rng.uniform(12, 30)))
            wd = max(3, round(ht * rng.uniform(0.3, 0.45)))
            draw = [(PERSON, bottom - ht, cx - wd // 2, _person_shape(ht, wd), ht, wd)]
        elif kind < 0.55:
            wd = max(6, round(depth * rng.uniform(14, 30)))
            ht = max(4, round(wd * rng.uniform(0.4, 0.55)))
            draw = [(CAR, bottom - ht, cx - wd // 2, _car_shape(ht, wd), ht, wd)]
        elif kind < 0.8:
            pw = int(rng.integers(1, 4))  # thin by design, not scaled with depth
            ht = max(8, round(depth * rng.uniform(16, 40)))
            draw = [(POLE, bottom - ht, cx - pw // 2, _full, ht, pw)]
            if rng.random() < 0.6:
                s = max(3, round(depth * rng.uniform(5, 11)))
                shape = _sign_shape(s, int(rng.integers(3)))
                draw.append((SIGN, bottom - ht - s // 2, cx - s // 2, shape, s, s))
        else:
            r = depth * rng.uniform(2.0, 7.0)
            d = max(3, round(2 * r))
            draw = [(BALL, bottom - d, cx - d // 2, _disk((d - 1) / 2, (d - 1) / 2, d / 2), d, d)]
        for args in draw:
            ops.append((foot, i, lambda args=args: canvas.paint_thing(*args)))
    for _, _, paint in sorted(ops, key=lambda op: (op[0], op[1])):
        paint()


def render_scene(
    index: int, seed: int = 0, split: str = "train", size: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """Render scene `index`: uint8 RGB image [H,W,3] and uint8 label map [H,W] with values 0..11.

    The same (index, seed, split, size) gives the same bytes on any machine; splits use different
    seed streams, so train and val never share a scene.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and data.seed must be >= 0, got index={index}, seed={seed}")
    h, w = check_size(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_id(split), int(index)]))
    canvas = Canvas(h, w, rng)

    horizon = _layout_stuff(canvas, rng)
    for cls in (SKY, WALL, WATER, GRASS, ROAD, SAND):
        canvas.paint_stuff(cls)
    _add_windows(canvas, rng)
    _ground_things(canvas, horizon, rng)
    return finish_image(canvas), canvas.label


def finish_image(canvas: Canvas) -> np.ndarray:
    """The painted canvas as uint8 RGB: texture modulation, a random contrast and brightness, pixel noise."""
    h, w, rng = canvas.h, canvas.w, canvas.rng
    image = canvas.base * (1.0 + canvas.mod)[..., None]
    contrast, brightness = rng.uniform(0.7, 1.3), rng.uniform(-30.0, 30.0)
    image = (image - 128.0) * contrast + (128.0 + brightness)
    image += (rng.random((h, w, 3)) * 2.0 - 1.0) * rng.uniform(2.0, 12.0)  # uniform: no libm in the draw
    return np.rint(np.clip(image, 0.0, 255.0)).astype(np.uint8)


class SyntheticScenes(Dataset):
    """Synthetic scenes rendered in __getitem__: {"image": float32 [3,H,W], "label": int64 [H,W], "index"}.

    `transform` is an albumentations pipeline (see `sfseg.data.transforms`); without one the image is
    scaled to [0, 1]. A scene is the same bytes at every draw, so a split that fits in MAX_CACHED_BYTES
    is rendered once per process (each loader worker keeps its own) and only augmented after that:
    rendering is most of the loader's work, and on a 2-core machine the loader shares the cores with
    training.
    """

    classes: tuple[str, ...] = SYNTHETIC_CLASSES
    palette: tuple[tuple[int, int, int], ...] = SYNTHETIC_PALETTE

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        size: tuple[int, int] = (128, 128),
        seed: int = 0,
        transform: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        split_id(split)
        self.split = split
        self.num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise ValueError(f"data.num_samples must be >= 0, got {num_samples}")
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {seed}")
        self.size = check_size(size)
        self.seed = int(seed)
        self.transform = transform
        scene_bytes = self.size[0] * self.size[1] * 4  # uint8 RGB image and label
        self._rendered: dict[int, tuple[np.ndarray, np.ndarray]] | None = (
            {} if self.num_samples * scene_bytes <= MAX_CACHED_BYTES else None
        )

    def __len__(self) -> int:
        return self.num_samples

    @property
    def keeps_scenes(self) -> bool:
        """Whether each scene is rendered once and kept (the split fits in MAX_CACHED_BYTES)."""
        return self._rendered is not None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} {self.split} samples")
        image, label = self.scene(int(index))
        return {**apply(self.transform, image, label), "index": int(index)}

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image and label map of scene `index`, rendered at its first draw only (when cached)."""
        if self._rendered is None:
            return self.render(index)
        if index not in self._rendered:
            image, label = self.render(index)
            image.flags.writeable = label.flags.writeable = False  # a transform must not alter the cache
            self._rendered[index] = image, label
        return self._rendered[index]

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image and label map of scene `index`."""
        return render_scene(index, self.seed, self.split, self.size)
