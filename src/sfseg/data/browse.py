"""Dataset browser: `python -m sfseg.data.browse data=<name> [data.root=<path>] [n=16] [out=<folder>]`.

Draws n training samples after augmentation with their ground-truth unity and semantic pyramids
(Sec. 3.1), and counts the whole split (with a progress bar): the class frequencies and the share of
unity cells per pyramid level, as CSV files and bar charts. See conf/browse.yaml for what it writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from sfseg.cli import hydra_main
from sfseg.data.datamodule import SegmentationDataModule
from sfseg.data.statistics import SplitStatistics, count_split, write_csv
from sfseg.pyramid import build_targets
from sfseg.visualize import save_figure, statistics_figure, target_pyramid_figure

SPLITS = ("train", "val")


def check_options(cfg: DictConfig) -> None:
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} is not one of {', '.join(SPLITS)}")
    if not isinstance(cfg.n, int) or cfg.n < 0:
        raise ValueError(f"n={cfg.n!r} must be a number of samples >= 0")


def draw_samples(datamodule: SegmentationDataModule, n: int, seed: int, out: Path) -> list[Path]:
    """n training samples, spread over the split, after augmentation, with their target pyramids."""
    dataset = datamodule.train_set
    indices = np.random.default_rng(seed).permutation(len(dataset))[:n]
    paths = []
    for number, index in enumerate(indices.tolist()):
        sample = dataset[index]
        targets = build_targets(sample["label"][None], datamodule.num_levels, datamodule.ignore_index)
        figure = target_pyramid_figure(
            sample["image"],
            sample["label"],
            targets,
            datamodule.palette,
            datamodule.classes,
            title=f"training sample {index} after augmentation",
        )
        paths.append(save_figure(figure, out / "samples" / f"sample_{number:02d}.png"))
    return paths


def browse(cfg: DictConfig) -> Path:
    """Write the samples, the CSV files and the charts into cfg.out; return that folder."""
    check_options(cfg)
    out = Path(cfg.out)
    datamodule: SegmentationDataModule = instantiate(cfg.data)
    datamodule.setup("fit")
    samples = draw_samples(datamodule, cfg.n, cfg.seed, out)
    stats = count_split(datamodule, cfg.split)
    class_rows, unity_rows = stats.class_rows(), stats.unity_rows()
    write_csv(class_rows, out / "class_frequency.csv")
    write_csv(unity_rows, out / "unity_cells.csv")
    figure = statistics_figure(
        [row["class"] for row in class_rows],
        [row["pixel_share"] for row in class_rows],
        [f"level {row['level']} (stride {row['stride']})" for row in unity_rows],
        [row["unity_share"] for row in unity_rows],
        title=f"data={HydraConfig.get().runtime.choices['data']}: {cfg.split} split, {stats.images} images",
    )
    save_figure(figure, out / "statistics.png")
    print_summary(stats, class_rows, unity_rows, len(samples), out)
    return out


def print_summary(
    stats: SplitStatistics, class_rows: list[dict], unity_rows: list[dict], samples: int, out: Path
) -> None:
    frequent = sorted(class_rows, key=lambda row: row["pixels"], reverse=True)[:5]
    absent = [row["class"] for row in class_rows if row["pixels"] == 0]
    print(f"{stats.images} images; most frequent classes (share of valid pixels):")
    for row in frequent:
        print(
            f"  {row['class']:<24} {100 * row['pixel_share']:6.2f} %   in {100 * row['image_share']:.0f} % of images"
        )
    if absent:
        print(
            f"  {len(absent)} classes never occur: {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}"
        )
    for row in unity_rows:
        print(
            f"level {row['level']} (stride {row['stride']:>3}): {100 * row['unity_share']:5.1f} % unity cells"
        )
    print(f"samples    : {out / 'samples'} ({samples} pictures)")
    print(f"statistics : {out / 'class_frequency.csv'}, {out / 'unity_cells.csv'}, {out / 'statistics.png'}")


@hydra_main("browse")
def main(cfg: DictConfig) -> None:
    browse(cfg)  # a missing root or unusable files: one message (sfseg.cli.short_errors)


if __name__ == "__main__":
    main()
