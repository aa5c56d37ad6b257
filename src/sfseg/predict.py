"""Prediction entry point: `python -m sfseg.predict ckpt_path=<ckpt> input=<image or folder> output=<folder>`.

For each image (any size; grey, palette and RGBA files are converted to RGB with a note) it writes
`<stem>_mask.png`, a palette PNG whose pixel values are the 0-based class ids (`ids=raw`: the dataset's
own label ids, e.g. ADE20K 1..150, Cityscapes' labelIds; a 16-bit PNG for raw ids above 255, an RGB PNG
in the palette's colours for a data=folder dataset with label_format=colors) and whose palette is the
dataset's, so viewers show the coloured mask; `<stem>_overlay.png`, the coloured mask over the image; and `<stem>_levels.png`, which pyramid
level each pixel was fused from, in the level colours of every sfseg picture (level 1 dark ... level L
yellow). A file that is not an image is an error naming it; in a folder the bad files are reported at
the end and the command exits non-zero after predicting the others.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig
from PIL import Image

from sfseg import CONFIG_DIR
from sfseg.data.datasets import NotAnImageError, decode_rgb
from sfseg.inference import autocast, load, resolve_device
from sfseg.visualize import colorize, level_colours, mask_image, overlay


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


def run(cfg: DictConfig) -> int:
    """Predict every input file; return the number of files that were not images."""
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"alpha={cfg.alpha} must lie in [0, 1]")
    input_path = Path(cfg.input).expanduser()
    files = input_files(input_path)
    device = resolve_device(cfg.device, "device")
    autocast(device, cfg.autocast, "autocast")  # validates the key before loading
    predictor = load(
        cfg.ckpt_path, device=device, autocast=cfg.autocast, sparse_inference=cfg.sparse_inference
    )
    ids = predictor.label_ids(cfg.ids)
    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)

    bad: list[str] = []
    for path in files:
        try:
            rgb, mode = decode_rgb(path)
        except NotAnImageError as error:
            if input_path.is_file():
                raise
            bad.append(str(error))
            continue
        if mode != "RGB":
            print(f"note: {path} is {mode}, converted to RGB")
        prediction = predictor.predict(rgb, fuse_levels=cfg.fuse)
        mask_image(prediction.mask, ids, predictor.palette).save(output / f"{path.stem}_mask.png")
        coloured = colorize(prediction.mask, predictor.palette)
        Image.fromarray(overlay(rgb, coloured, cfg.alpha)).save(output / f"{path.stem}_overlay.png")
        levels = level_colours(prediction.level_map, predictor.levels)
        Image.fromarray(levels).save(output / f"{path.stem}_levels.png")
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
