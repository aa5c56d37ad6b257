"""Prediction entry point: `python -m sfseg.predict ckpt_path=<ckpt> input=<image or folder> output=<folder>`.

For each image (any size; grey, palette and RGBA files are converted to RGB with a note) it writes
`<stem>_mask.png` (the coloured prediction), `<stem>_overlay.png` (the mask over the image) and
`<stem>_levels.png` (which pyramid level each pixel was fused from, level 1 dark ... level L yellow).
A file that is not an image is an error naming it; in a folder the bad files are reported at the
end and the command exits non-zero after predicting the others.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import hydra
import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from sfseg.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    COCO_STUFF_CLASSES,
    COCO_STUFF_PALETTE,
    PASCAL_CONTEXT59_CLASSES,
    PASCAL_CONTEXT59_PALETTE,
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    voc_colormap,
)
from sfseg.data.transforms import val_transform
from sfseg.eval import autocast, load_model, resolve_device
from sfseg.models import PyramidSegmenter
from sfseg.pyramid import FINEST_STRIDE, repeat_cells
from sfseg.train import CONFIG_DIR
from sfseg.visualize import LEVEL_CMAP, colorize

KNOWN_PALETTES = (
    (SYNTHETIC_CLASSES, SYNTHETIC_PALETTE),
    (ADE20K_CLASSES, ADE20K_PALETTE),
    (COCO_STUFF_CLASSES, COCO_STUFF_PALETTE),
    (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE),
)


class NotAnImageError(ValueError):
    """A file that PIL cannot decode as an image."""


def palette_for(class_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """The dataset's palette when the classes are a dataset sfseg knows, else the VOC colour map."""
    for classes, palette in KNOWN_PALETTES:
        if tuple(class_names) == tuple(classes):
            return list(palette)
    return [voc_colormap(index) for index in range(len(class_names))]


def read_rgb(path: Path) -> tuple[np.ndarray, str | None]:
    """HxWx3 uint8 RGB and, for a file stored otherwise (grey, palette, RGBA, CMYK...), a note saying
    it was converted. Raises NotAnImageError naming the file when PIL cannot decode it."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "corrupt or not an image"
        raise NotAnImageError(f"not an image: {path} ({error})") from error
    note = None if mode == "RGB" else f"note: {path} is {mode}, converted to RGB"
    return rgb, note


def input_files(input_path: Path) -> list[Path]:
    """The file itself, or the files (not folders, not hidden) directly in a folder, sorted."""
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise FileNotFoundError(f"input={input_path}: no such file or folder")
    files = sorted(p for p in input_path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"input={input_path}: the folder has no files")
    clashes = [stem for stem, count in Counter(p.stem for p in files).items() if count > 1]
    if clashes:
        raise ValueError(
            f"input={input_path}: files share a name up to the extension ({', '.join(sorted(clashes))}); "
            "their outputs <stem>_mask.png ... would overwrite each other"
        )
    return files


@torch.inference_mode()
def predict_image(
    net: PyramidSegmenter, rgb: np.ndarray, tau: float, fuse_levels: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Class map [H, W] and per-pixel level map [H, W] (0 = coarsest) of an HxWx3 uint8 image of any
    size: normalised and padded like validation images, predicted, cropped back."""
    height, width = rgb.shape[:2]
    device = next(net.parameters()).device
    normalised = val_transform(net.size_divisor)(image=rgb)["image"]
    images = torch.from_numpy(normalised.transpose(2, 0, 1)).unsqueeze(0).to(device)
    logits, level_map = net.predict(images, tau, fuse_levels)
    pred = logits[0, :, :height, :width].argmax(0)
    levels = repeat_cells(level_map[0], FINEST_STRIDE)[:height, :width]
    return pred.cpu().numpy(), levels.cpu().numpy()


def level_colours(levels: np.ndarray, num_levels: int) -> np.ndarray:
    """A level map [H, W] as RGB uint8 in the colours of the pyramid pictures (LEVEL_CMAP)."""
    scaled = levels / max(num_levels - 1, 1)
    return (matplotlib.colormaps[LEVEL_CMAP](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    return ((1 - alpha) * rgb + alpha * mask).round().astype(np.uint8)


def run(cfg: DictConfig) -> int:
    """Predict every input file; return the number of files that were not images."""
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"alpha={cfg.alpha} must lie in [0, 1]")
    input_path = Path(cfg.input).expanduser()
    files = input_files(input_path)
    device = resolve_device(cfg.device, "device")
    model = load_model(cfg.ckpt_path, device)
    net = model.net.to(device)
    palette = palette_for(model.class_names)
    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)

    bad: list[str] = []
    for path in files:
        try:
            rgb, note = read_rgb(path)
        except NotAnImageError as error:
            if input_path.is_file():
                raise
            bad.append(str(error))
            continue
        if note:
            print(note)
        with autocast(device, cfg.autocast, "autocast"):
            pred, levels = predict_image(net, rgb, model.tau, cfg.fuse)
        mask = colorize(pred, palette)
        Image.fromarray(mask).save(output / f"{path.stem}_mask.png")
        Image.fromarray(overlay(rgb, mask, cfg.alpha)).save(output / f"{path.stem}_overlay.png")
        Image.fromarray(level_colours(levels, model.levels)).save(output / f"{path.stem}_levels.png")
    done = len(files) - len(bad)
    print(f"{done} image(s) predicted into {output} (<stem>_mask.png, <stem>_overlay.png, <stem>_levels.png)")
    if bad:
        print(f"{len(bad)} file(s) skipped:\n  " + "\n  ".join(bad), file=sys.stderr)
    return len(bad)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    if run(cfg):
        sys.exit(1)


if __name__ == "__main__":
    main()
