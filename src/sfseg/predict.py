"""Prediction entry point: `python -m sfseg.predict ckpt_path=<ckpt, model folder or hf-hub:owner/name>
input=<image or folder> [output=<folder>] [write=[mask]] [ids=raw]`.

A folder is walked recursively (hidden files and folders left out) and its subfolders are mirrored under
`output`, so a dataset split in `<split>/<city>/` folders comes out in the same tree. For each image (any
size; grey, palette and RGBA files are converted to RGB with a note) it writes the pictures `write` names:
`mask`, a palette PNG whose pixel values are the 0-based class ids (`ids=raw`: the dataset's own label
ids, e.g. ADE20K 1..150, Cityscapes' labelIds; a 16-bit PNG for raw ids above 255, an RGB PNG in the
palette's colours for a data=folder dataset with label_format=colors) and whose palette is the dataset's,
so viewers show the coloured mask; `overlay`, the coloured mask over the image; and `levels`, which
pyramid level each pixel was fused from, in the level colours of every sfseg picture (level 1 dark ...
level L yellow). They are `<stem>_<kind>.png`; a single kind is `<stem>.png`, named like the image, as
benchmark servers take masks (`write=[mask] ids=raw`). An `output` inside the input folder is refused
(a recursive walk would read the pictures back). A file that is not an image is an error naming it; in a
folder the bad files are reported at the end and the command exits non-zero after predicting the others.
Without `output`, the pictures go into the checkpoint's training run folder (`default_output`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sfseg.cli import hydra_main
from sfseg.data.datasets import NotAnImageError, decode_rgb
from sfseg.inference import Predictor, autocast, load, resolve_device, results_folder
from sfseg.visualize import colorize, level_colours, mask_image, overlay

PICTURES = ("mask", "overlay", "levels")


def input_files(input_path: Path) -> list[Path]:
    """The file itself, or every file of a folder and its subfolders (hidden files and folders left
    out), sorted."""
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise FileNotFoundError(f"input={input_path}: no such file or folder")
    files = []
    for folder, subfolders, names in os.walk(input_path):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [Path(folder) / name for name in names if not name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"input={input_path}: the folder and its subfolders have no files")
    stems = Counter(path.relative_to(input_path).with_suffix("") for path in files)
    clashes = [str(stem) for stem, count in stems.items() if count > 1]
    if clashes:
        raise ValueError(
            f"input={input_path}: files share a name up to the extension ({', '.join(sorted(clashes))}); "
            "their pictures <stem>_mask.png ... would overwrite each other"
        )
    return sorted(files)


def pictures(write: str | Sequence[str]) -> tuple[str, ...]:
    """The kinds of picture `write` names (one name or a list), checked."""
    kinds = (write,) if isinstance(write, str) else tuple(write)
    unknown = [kind for kind in kinds if kind not in PICTURES]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"write={list(kinds)} must name each picture once, from {', '.join(PICTURES)}: e.g. write=[mask] "
            "for the masks of a benchmark submission"
        )
    return kinds


def picture_paths(
    input_path: Path, files: Sequence[Path], output: Path, kinds: Sequence[str]
) -> dict[Path, dict[str, Path]]:
    """file -> {kind: path}: `output/<subfolder>/<stem>_<kind>.png` (`<stem>.png` for a single kind),
    the input folder's subfolders mirrored. Refuses an output inside the input folder, or over an input."""
    paths, inputs = {}, {file.resolve() for file in files}
    for file in files:
        relative = file.relative_to(input_path) if input_path.is_dir() else Path(file.name)
        stem = output / relative.with_suffix("")
        paths[file] = {
            kind: stem.with_name(stem.name + ("" if len(kinds) == 1 else f"_{kind}") + ".png")
            for kind in kinds
        }
    if input_path.is_dir() and output.resolve().is_relative_to(input_path.resolve()):
        raise ValueError(
            f"output={output} lies inside input={input_path}: a recursive walk would read its pictures back "
            "as images next time; give an output outside the input folder"
        )
    replaced = [path for targets in paths.values() for path in targets.values() if path.resolve() in inputs]
    if replaced:
        raise ValueError(
            f"output={output} would write {replaced[0]} over an input image: give another output"
        )
    return paths


def default_output(ckpt_path: str, input_path: Path, fuse: bool) -> Path:
    """`<training run folder>/predict` (`predict_finest` for the finest level only), plus the folder's
    name for a folder of images: next to the run's eval/ and export/, apart from the input images."""
    folder = results_folder(ckpt_path) / ("predict" if fuse else "predict_finest")
    return folder / input_path.resolve().name if input_path.is_dir() else folder


def run(cfg: DictConfig) -> int:
    """Predict every input file; return the number of files that were not images."""
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"alpha={cfg.alpha} must lie in [0, 1]")
    kinds = pictures(OmegaConf.to_object(cfg.write) if OmegaConf.is_config(cfg.write) else cfg.write)
    input_path = Path(cfg.input).expanduser()
    files = input_files(input_path)
    output = (
        Path(cfg.output).expanduser() if cfg.output else default_output(cfg.ckpt_path, input_path, cfg.fuse)
    )
    paths = picture_paths(input_path, files, output, kinds)  # before the model loads
    device = resolve_device(cfg.device, "device")
    autocast(device, cfg.autocast, "autocast")  # validates the key before loading
    predictor = load(
        cfg.ckpt_path, device=device, autocast=cfg.autocast, sparse_inference=cfg.sparse_inference
    )
    ids = predictor.label_ids(cfg.ids)

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
        write_pictures(predictor, rgb, paths[path], ids, cfg)
    names = ", ".join("<stem>.png" if len(kinds) == 1 else f"<stem>_{kind}.png" for kind in kinds)
    print(f"{len(files) - len(bad)} image(s) predicted into {output} ({names}; subfolders mirrored)")
    if bad:
        print(f"{len(bad)} file(s) skipped:\n  " + "\n  ".join(bad), file=sys.stderr)
    return len(bad)


def write_pictures(
    predictor: Predictor, rgb: np.ndarray, paths: dict[str, Path], ids: np.ndarray, cfg: DictConfig
) -> None:
    """Predict one image and write the pictures of `paths` (kind -> file)."""
    prediction = predictor.predict(rgb, fuse_levels=cfg.fuse)
    next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
    if "mask" in paths:
        mask_image(prediction.mask, ids, predictor.palette).save(paths["mask"])
    if "overlay" in paths:
        coloured = colorize(prediction.mask, predictor.palette)
        Image.fromarray(overlay(rgb, coloured, cfg.alpha)).save(paths["overlay"])
    if "levels" in paths:
        Image.fromarray(level_colours(prediction.level_map, predictor.levels)).save(paths["levels"])


@hydra_main("predict")
def main(cfg: DictConfig) -> None:
    if run(cfg):
        sys.exit(1)


if __name__ == "__main__":
    main()
