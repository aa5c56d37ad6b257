"""Class names and mask palettes of the datasets sfseg ships or reads, and the classes file of a
dataset of the user's own (`data=folder`, `read_classes`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# --- Synthetic scenes (sfseg.data.synthetic) ---------------------------------------------------------
# Stuff first: ids 0..5 are large wavy regions, ids 6..11 are small things drawn on top of them.
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "sky",
    "wall",
    "water",
    "grass",
    "road",
    "sand",
    "person",
    "car",
    "pole",
    "sign",
    "ball",
    "window",
)
SYNTHETIC_THINGS: tuple[str, ...] = SYNTHETIC_CLASSES[6:]
# Mask colours only (the rendered images use overlapping colours); chosen to be far apart from each other.
SYNTHETIC_PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180),  # sky: steel blue
    (190, 153, 153),  # wall: dusty pink
    (40, 200, 220),  # water: cyan
    (107, 142, 35),  # grass: olive green
    (128, 64, 128),  # road: purple
    (230, 200, 120),  # sand: light tan
    (220, 20, 60),  # person: crimson
    (0, 0, 142),  # car: navy
    (153, 153, 153),  # pole: grey
    (220, 220, 0),  # sign: yellow
    (255, 120, 0),  # ball: orange
    (255, 0, 255),  # window: magenta
)


# --- Real datasets (sfseg.data.real) -----------------------------------------------------------------
# Names as in mmsegmentation's dataset classes (ADE20KDataset, COCOStuffDataset, PascalContextDataset59),
# in class-id order; mmsegmentation's "bed " loses its trailing space here.


def voc_colormap(index: int) -> tuple[int, int, int]:
    """The PASCAL VOC devkit colour of `index` (bits spread over R, G, B): distinct for 0..255."""
    red = green = blue = 0
    for bit in range(8):
        red |= ((index >> 0) & 1) << (7 - bit)
        green |= ((index >> 1) & 1) << (7 - bit)
        blue |= ((index >> 2) & 1) << (7 - bit)
        index >>= 3
    return red, green, blue


def generated_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """`count` distinct colours, the same every time: the VOC colour map from index 1 (class k -> k + 1),
    so that black stays free for ignored pixels."""
    return tuple(voc_colormap(k + 1) for k in range(count))


ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
# CSAIL's 150 scene-parsing colours (color150 of its toolkit), as mmsegmentation's ADE20KDataset
# METAINFO["palette"] publishes them; "skyscraper" shares (140, 140, 140) with "road" there too.
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

# COCO-Stuff: 80 things then 91 stuff classes, the 171 ids that occur of the 182-id vocabulary.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road",
    "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
# mmsegmentation's COCOStuffDataset METAINFO["palette"], as published: it gives some classes the same
# colour (person and bicycle; truck, traffic light and cloth; ...) and handbag black.
COCO_STUFF_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224),
    (0, 192, 192), (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224),
    (0, 0, 64), (0, 160, 192), (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224),
    (0, 0, 192), (128, 160, 192), (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128),
    (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160), (0, 32, 0), (0, 128, 128),
    (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128), (0, 0, 128),
    (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192),
    (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192),
    (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192),
    (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128), (128, 192, 192),
    (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0), (128, 64, 128),
    (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128),
    (64, 0, 224), (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192),
    (0, 128, 96), (0, 224, 0), (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192),
    (0, 128, 224), (128, 224, 0), (64, 192, 64), (128, 128, 96), (128, 32, 128), (64, 0, 192),
    (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224), (0, 32, 128), (192, 128, 192),
    (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64), (192, 0, 128),
    (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128),
    (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128),
    (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192),
    (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64), (64, 128, 192),
    (0, 192, 160), (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192),
    (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192),
    (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128),
    (64, 192, 96), (64, 160, 64), (64, 64, 0),
)  # fmt: skip

# Pascal-Context-59: the 59 most frequent classes of the 459-class vocabulary, in its (alphabetical) order.
PASCAL_CONTEXT59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard",
    "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock",
    "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip
# mmsegmentation's PascalContextDataset59 METAINFO["palette"], as published (ADE20K's colours from its
# second on; bicycle and snow share (140, 140, 140)).
PASCAL_CONTEXT59_PALETTE: tuple[tuple[int, int, int], ...] = (
    (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61),
    (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7),
    (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214),
    (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8),
    (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41),
    (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
)  # fmt: skip


# Cityscapes: the 19 evaluation classes (trainIds 0..18 of cityscapesScripts' helpers/labels.py), with
# their official names and colours.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


# CamVid, the 11 classes of SegNet's 360 x 480 release (ids 0..10; 11 is void), in SegNet's order and with
# SegNet's colours (its Scripts/camvid11 colour table).
CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign-symbol", "fence", "car", "pedestrian",
    "bicyclist",
)  # fmt: skip
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
# The thin and small classes, which the literature reports apart (and which median frequency balancing lifts).
CAMVID_SMALL_CLASSES: tuple[str, ...] = ("pole", "sign-symbol", "fence", "pedestrian", "bicyclist")

# Class names -> palette: a model of a known dataset draws in that dataset's colours, whatever palette
# its checkpoint recorded (checkpoints written before the datasets' own palettes came in hold others).
KNOWN_PALETTES: tuple[tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]], ...] = (
    (SYNTHETIC_CLASSES, SYNTHETIC_PALETTE),
    (ADE20K_CLASSES, ADE20K_PALETTE),
    (COCO_STUFF_CLASSES, COCO_STUFF_PALETTE),
    (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE),
    (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    (CAMVID_CLASSES, CAMVID_PALETTE),
)


def dataset_palette(class_names: Sequence[str]) -> list[tuple[int, int, int]] | None:
    """The palette of the dataset sfseg knows by these class names; None for other classes."""
    for classes, palette in KNOWN_PALETTES:
        if tuple(class_names) == tuple(classes):
            return list(palette)
    return None


def palette_for(class_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """The dataset's palette when the classes are a dataset sfseg knows, else `generated_palette`."""
    return dataset_palette(class_names) or list(generated_palette(len(class_names)))


# --- A dataset of the user's own (data=folder) -------------------------------------------------------
CLASSES_FILE_KEYS = ("classes", "palette", "ids")
MAX_RAW_ID = 65535  # the largest value of a 16-bit label PNG


@dataclass(frozen=True)
class ClassTable:
    """The classes `data.classes` gives: names, and optionally each class's colour and raw label value.
    `source` names where they came from, for messages."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] | None
    ids: tuple[int, ...] | None
    source: str


def read_classes(value: Any, root: str | Path | None = None, key: str = "data.classes") -> ClassTable:
    """`data.classes`: a YAML or JSON file holding `classes: [names]` and optionally `palette: [[r, g, b],
    ...]` and `ids: [raw label values]`; a text file with one name per line; or the same inline (a list
    of names, or a mapping like the file). A relative path is looked up in the working directory, then
    under `root`. Anything unreadable or inconsistent is a ValueError that names `key`."""
    if isinstance(value, str | Path):
        path = find_classes_file(Path(value).expanduser(), root, key)
        source = f"{key}={path}"
        content = parse_classes_file(path, source)
    elif isinstance(value, Mapping | Sequence):
        source, content = f"{key} (inline)", value
    else:
        raise ValueError(f"{key} must be a classes file or a list of class names, got {value!r}")
    if not isinstance(content, Mapping):
        content = {"classes": content}
    return class_table(content, source)


def find_classes_file(path: Path, root: str | Path | None, key: str) -> Path:
    candidates = [path] if path.is_absolute() or root is None else [path, Path(root).expanduser() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{key}={path}: no such file (looked for {' and '.join(map(str, candidates))}); give a YAML/JSON "
        "file with classes: [...], a text file with one class name per line, or an inline list [a, b, c]"
    )


def parse_classes_file(path: Path, source: str) -> Any:
    """The file's content: YAML or JSON by suffix, otherwise one class name per non-empty line."""
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if path.suffix.lower() == ".json":
            return json.loads(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"{source}: cannot read the classes file: {error}") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_table(content: Mapping[str, Any], source: str) -> ClassTable:
    unknown = sorted(set(content) - set(CLASSES_FILE_KEYS))
    if unknown:
        raise ValueError(
            f"{source}: unknown keys {unknown}; a classes file holds classes: [names] and optionally "
            "palette: [[r, g, b], ...] and ids: [raw label values]"
        )
    names = content.get("classes")
    if (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not names
        or not all(isinstance(name, str) and name for name in names)
    ):
        raise ValueError(f"{source}: classes must be a non-empty list of class names, got {names!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{source}: class names must be distinct; repeated: {repeated}")
    palette = content.get("palette")
    if palette is not None:
        palette = tuple(colour_triple(colour, f"{source}: palette") for colour in sequence(palette, source))
        if len(palette) != len(names):
            raise ValueError(f"{source}: the palette has {len(palette)} colours for {len(names)} classes")
    ids = content.get("ids")
    if ids is not None:
        ids = tuple(raw_value(raw, f"{source}: ids") for raw in sequence(ids, source))
        if len(ids) != len(names):
            raise ValueError(f"{source}: ids has {len(ids)} values for {len(names)} classes")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{source}: ids must be distinct, got {list(ids)}")
    return ClassTable(tuple(names), palette, ids, source)


def sequence(value: Any, source: str) -> Sequence:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{source}: expected a list, got {value!r}")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def raw_value(value: Any, what: str) -> int:
    """A raw label value of an 8- or 16-bit label PNG."""
    if not is_int(value) or not 0 <= value <= MAX_RAW_ID:
        raise ValueError(f"{what}: {value!r} is not a raw label value (an integer 0..{MAX_RAW_ID})")
    return value


def colour_triple(value: Any, what: str) -> tuple[int, int, int]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 3
        or not all(is_int(c) and 0 <= c <= 255 for c in value)
    ):
        raise ValueError(f"{what}: {value!r} is not a colour [r, g, b] of integers 0..255")
    return (value[0], value[1], value[2])
