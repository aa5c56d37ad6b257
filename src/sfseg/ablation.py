"""The paper's central claim as one command: `python -m sfseg.ablation [--preset NAME] [overrides...]`.

Each preset trains a sweep at one shared step budget as one Hydra multirun, then writes `report.md` and
`report.csv` into the sweep folder (each job's folder keeps its metrics.json and config.yaml).

  quick (default, `make ablation-quick`)  the embedded default: L=1 vs L=4 (true_positive), both c2f,
      seeds 0,1; the table of fused and finest-only mIoU.
  mechanism (`make mechanism`)  the controlled experiment (experiment=mechanism): look-alike scenes
      whose class only sparse markers name, a backbone that sees 31 x 31 pixels, no context module;
      L=1 vs L=4 (true_positive), seeds 0,1,2; fused, finest-only and look-alike-class mIoU, Table 9 and
      the share of cells of one L=4 job, and the goals checked.
  mechanism_table6, mechanism_table7, mechanism_levels  the paper's other ablations (experiment=table6,
      table7, levels) in the same regime, in the paper's layout, again on the look-alike classes only.
      The levels sweep runs without a context module here (the regime's), the paper's with c2f.
  mechanism_fuse, fuse_default  the fuse rules (docs/fuse.md) on the same pyramids: L=4 jobs that train
      the learned fuse's gate (model/fuse=learned; the gate reads the pyramids detached, so they train as
      under Eq. 2), seeds 0,1,2, in the controlled experiment and on the embedded default (900 steps).
      Every job scores hard, soft and learned, level 1 alone, the best single level and the oracle fuse;
      the report checks each rule against level 1 alone and against hard.

Extra overrides (e.g. `data.data_seed=3`) apply to every job.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sfseg.data.synthetic_context import CONTEXT_CLASSES, LOOK_ALIKE_CLASSES, cue_coverage, draw_context_scene
from sfseg.models.backbones import LocalResNet
from sfseg.pyramid import level_strides
from sfseg.sweeps import load_job_config, write_fuse_report, write_mechanism_report, write_report

LOOK_ALIKE = ("look-alike", LOOK_ALIKE_CLASSES)
CONTROLS = ("controls", tuple(name for name in CONTEXT_CLASSES if name not in LOOK_ALIKE_CLASSES))

# The regime of experiment=mechanism, restated for the experiments built on ablation_hrnet32 (ADE20K,
# HRNet32, GPU): tests/test_mechanism.py checks that both compose to the same data, model and trainer.
MECHANISM_REGIME = (
    "data=synthetic_context",
    "~data.crop_size",
    "~data.subsample",
    "data.batch_size=8",
    "model/backbone=local",
    "model.backbone.pretrained=false",
    "model.semantic_channels=128",
    "model.unity_channels=32",
    "model.optimizer.lr=0.05",
    "trainer=default",
    "trainer.check_val_every_n_epoch=1000",
)
MECHANISM_STEPS = 1000
DEFAULT_STEPS = 900  # experiment=synthetic's, `make train`'s
PAPER_TABLE6_CELLS = (
    "single_none",
    "single_anl",
    "single_c2f",
    "pyramidal_none",
    "pyramidal_anl",
    "pyramidal_anl_multi",
    "pyramidal_c2f",
)


@dataclass(frozen=True)
class Preset:
    """A sweep: the overrides of every job, its default step budget and seeds, and how it reports."""

    task: str
    overrides: tuple[str, ...]
    steps: int
    seeds: str
    report: Callable[[Path], str]


def report_by_levels(sweep_dir: Path) -> str:
    return write_report(sweep_dir, by=["model.levels"])[2]


def report_mechanism(sweep_dir: Path) -> str:
    config = load_job_config(next(sweep_dir.glob("*/config.yaml")).parent)
    return write_mechanism_report(sweep_dir, dict([LOOK_ALIKE, CONTROLS]), cue_note(config))[2]


def cue_note(config: Mapping[str, Any]) -> list[str]:
    """How far the cue is on the val split the jobs scored (`cue_coverage` with the local backbone's R):
    the share of look-alike pixels that can see it, and the share of level-1 cells (L=4) that can.
    Nothing when the jobs ran on other data or another backbone."""
    data = config["data"]
    if (
        not data["_target_"].endswith("SyntheticContextDataModule")
        or config["model"]["backbone"]["name"] != "local"
    ):
        return []
    size = data["size"] if isinstance(data["size"], Sequence) else (data["size"], data["size"])
    geometry = {key: data[key] for key in ("region_size", "marker_spacing", "marker_size")}
    scenes = [
        draw_context_scene(index, data["data_seed"], "val", tuple(size), **geometry)
        for index in range(data["val_samples"])
    ]
    radius = LocalResNet.receptive_field
    cell = level_strides(4)[0]
    coverage = cue_coverage(scenes, radius, cell_sizes=(cell,))
    return [
        f"The cue on these val scenes: {100 * coverage['pixel']:.1f} % of the look-alike pixels have a marker "
        f"of their class within the {radius} x {radius} square a pixel's features see (model/backbone=local); "
        f"{100 * coverage[f'cells{cell}']:.1f} % lie in {cell} x {cell} cells of one class (level 1 at L=4), "
        f"and the field of {100 * coverage[f'cell{cell}']:.1f} % of those ({cell} + {radius - 1} pixels wide) "
        "holds one."
    ]


def report_fuse(sweep_dir: Path) -> str:
    """The fuse rules compared; on the look-alike scenes also over the look-alike classes and the controls."""
    config = load_job_config(next(sweep_dir.glob("*/config.yaml")).parent)
    look_alike = config["data"]["_target_"].endswith("SyntheticContextDataModule")
    groups = dict([LOOK_ALIKE, CONTROLS]) if look_alike else {}
    return write_fuse_report(sweep_dir, groups, cue_note(config))[2]


def report_layout_and_look_alike(sweep_dir: Path) -> str:
    return write_report(sweep_dir, focus=LOOK_ALIKE)[2]


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "ablation_quick",
        ("model/context=c2f", "model/relabel=true_positive", "model.levels=1,4"),
        1000,
        "0,1",
        report_by_levels,
    ),
    "mechanism": Preset(
        "mechanism", ("experiment=mechanism", "model.levels=1,4"), MECHANISM_STEPS, "0,1,2", report_mechanism
    ),
    "mechanism_fuse": Preset(
        "mechanism_fuse",
        ("experiment=mechanism", "model/fuse=learned"),
        MECHANISM_STEPS,
        "0,1,2",
        report_fuse,
    ),
    "fuse_default": Preset("fuse_default", ("model/fuse=learned",), DEFAULT_STEPS, "0,1,2", report_fuse),
    "mechanism_table6": Preset(
        "mechanism_table6",
        # the paper's cells (none / anl / anl_multi / c2f); OCR and CCNet are left to the full table6
        ("experiment=table6", *MECHANISM_REGIME, f"cell={','.join(PAPER_TABLE6_CELLS)}"),
        MECHANISM_STEPS,
        "0",
        report_layout_and_look_alike,
    ),
    "mechanism_table7": Preset(
        "mechanism_table7",
        ("experiment=table7", *MECHANISM_REGIME),
        MECHANISM_STEPS,
        "0",
        report_layout_and_look_alike,
    ),
    "mechanism_levels": Preset(
        "mechanism_levels",
        ("experiment=levels", *MECHANISM_REGIME, "model/context=none"),
        MECHANISM_STEPS,
        "0",
        report_layout_and_look_alike,
    ),
}


def override_key(override: str) -> str:
    """The config key an override sets: "~data.crop_size" -> "data.crop_size", "model/backbone=local" ->
    "model/backbone"."""
    return override.lstrip("~+").split("=", 1)[0]


def is_sweep(override: str) -> bool:
    """Whether an override gives a sweep axis ("model.levels=1,4"), not one value ("x=[1,2]", "x=1")."""
    value = override.split("=", 1)[-1].strip()
    return "," in value and not value.startswith(("[", "{"))


def sweep_command(preset_name: str, steps: int, seeds: str, out: Path, extra: list[str]) -> list[str]:
    """The `python -m sfseg.train -m` command line of a preset. Job folders are named by what varies
    between jobs: the overrides that every job shares are left out of the names."""
    preset = PRESETS[preset_name]
    fixed = [override for override in (*preset.overrides, *extra) if not is_sweep(override)]
    hidden = ["seed", "trainer.max_steps", "ckpt_path", "task_name", *map(override_key, fixed)]
    return [
        sys.executable,
        "-m",
        "sfseg.train",
        "-m",
        *preset.overrides,
        f"task_name={preset.task}",
        f"seed={seeds}",
        f"trainer.max_steps={steps}",
        f"hydra.sweep.dir={out}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(dict.fromkeys(hidden))}]",
        *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per job (the same for all)")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated training seeds (default: the preset's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="sweep folder (default multirun/<task>/<time>)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = args.out or Path("multirun") / preset.task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    command = sweep_command(
        args.preset,
        preset.steps if args.steps is None else args.steps,
        preset.seeds if args.seeds is None else args.seeds,
        out,
        args.overrides,
    )
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    print(preset.report(out))
    print(f"written: {out / 'report.md'} and {out / 'report.csv'}")


if __name__ == "__main__":
    main()
