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
      under Eq. 2), seeds 0,1,2, in the controlled experiment and on the embedded default (750 steps).
      Every job scores hard, soft and learned, level 1 alone, the best single level and the oracle fuse;
      the report checks each rule against level 1 alone and against hard.
  mechanism_table6_twins  Table 6 (seeds 0,1,2) on scenes that hold both twins of each pair in every
      image (data=synthetic_context_twins), so that a context module attending over the whole image has
      to pick the markers of the pixel's own region.
  default_table7  Table 7's three relabel policies (seeds 0,1,2) on the embedded default without a
      context module (experiment=synthetic's data, backbone and heads), over all classes and the small
      things (person, car, pole, sign, ball, window).

  camvid  real images (data.root=<CamVid>, e.g. ../shared/data/camvid): L=1 vs L=4 on experiment=camvid_cpu,
      seeds 0,1,2; fused, finest-only, level-1 and oracle-fuse mIoU, per-class IoU with the small classes
      apart, Table 9 and the share of cells of one L=4 job, minutes per job, and report.png (per-class IoU
      of both arms with their spread; val mIoU over the steps). docs/real/camvid.md.
  camvid_factors  one factor at a time of the CamVid L=4 run with Eq. 1's mean (experiment=camvid_factors:
      L=2, the relabel policies, no context module, lighter coarse levels (the recipe now), tau), seeds 0,1.

report.md starts with the command, the commit its jobs ran at and how busy the machine was, and the
table presets list each job's fused, level-1 and finest mIoU and its wall-clock minutes. As each job ends,
the sweep prints its fused mIoU, its minutes and the estimated time left.

Extra overrides (e.g. `data.data_seed=3`) apply to every job; one of a key the preset sets replaces the
preset's value (e.g. `--preset camvid_factors cell=L2,L4_naive`: two of its cells).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sfseg.data.classes import CAMVID_SMALL_CLASSES, SYNTHETIC_THINGS
from sfseg.data.synthetic_context import (
    CONTEXT_CLASSES,
    LOOK_ALIKE_CLASSES,
    SCENE_KEYS,
    cue_coverage,
    draw_context_scene,
)
from sfseg.models.encoders import LocalResNet
from sfseg.pyramid import level_strides
from sfseg.sweeps import (
    add_focus_metrics,
    collect_runs,
    job_seconds,
    jobs_markdown,
    load_job_config,
    write_fuse_report,
    write_levels_report,
    write_mechanism_report,
    write_report,
)

LOOK_ALIKE = ("look-alike", LOOK_ALIKE_CLASSES)
CONTROLS = ("controls", tuple(name for name in CONTEXT_CLASSES if name not in LOOK_ALIKE_CLASSES))

# The regime of experiment=mechanism, restated for the experiments built on ablation_hrnet32 (ADE20K,
# HRNet32, GPU): tests/test_mechanism.py checks that both compose to the same data, model and trainer.
_REGIME_BESIDES_SCENES = (
    "~data.crop_size",
    "~data.subsample",
    "model/backbone=local",
    "model.backbone.pretrained=false",
    "model.semantic_channels=128",
    "model.unity_channels=32",
    "model.optimizer.lr=0.05",
    "trainer=default",
    "trainer.check_val_every_n_epoch=1000",
)
MECHANISM_REGIME = ("data=synthetic_context", "data.batch_size=8", *_REGIME_BESIDES_SCENES)
# The same on the scenes with both twins of each pair in every image (192 x 384, the data config's batch
# of 4: the pixels of a step stay those of the mechanism regime).
TWINS_REGIME = ("data=synthetic_context_twins", *_REGIME_BESIDES_SCENES)
MECHANISM_STEPS = 1000
DEFAULT_STEPS = 750  # experiment=synthetic's, `make train`'s
# The embedded default (experiment=synthetic: 128 px scenes with stuff and small things, hrnet_w18_small
# from scratch, D_s=128, D_u=32, AdamW lr 0.002, batch 8), restated for the experiments built on
# ablation_hrnet32; one validation after training.
DEFAULT_REGIME = (
    "data=synthetic",
    "~data.crop_size",
    "~data.subsample",
    "data.batch_size=8",
    "model/backbone=hrnet_w18_small",
    "model.backbone.pretrained=false",
    "model.semantic_channels=128",
    "model.unity_channels=32",
    "model.optimizer.name=adamw",
    "model.optimizer.lr=0.002",
    "model.optimizer.weight_decay=0.01",
    "trainer=default",
    "trainer.check_val_every_n_epoch=1000",
)
THINGS = ("things", SYNTHETIC_THINGS)
# 9 jobs (3 policies x 3 seeds): 18.0 minutes on this 2-core CPU, docs/mechanism/table7_relabel.md.
DEFAULT_TABLE7_STEPS = 400
# 21 jobs (7 cells x 3 seeds): 24.7 minutes on this 2-core CPU, docs/mechanism/table6_twins.md.
TWINS_STEPS = 240
PAPER_TABLE6_COLUMNS = ("-", "ANL", "ANL-multi", "ours (c2f)")  # experiment=table6 adds OCR and CCNet
TABLE7_POLICY_COLUMNS = ("naive", "simple fix (oracle)", "our final (true positive)")  # no single output
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
    needs: tuple[str, ...] = ()  # keys the user must give (a real dataset's data.root)


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
    geometry = {key: data[key] for key in SCENE_KEYS if key in data}  # configs from before both_twins lack it
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


def report_layout_and_look_alike(
    sweep_dir: Path,
    columns: Sequence[str] | None = None,
    focus: tuple[str, Sequence[str]] = LOOK_ALIKE,
) -> str:
    """The paper's layout over all classes and over the `focus` classes (the look-alike ones by
    default), the cue on the scored scenes (look-alike scenes only), and each job's fused, level-1 and
    finest mIoU and its wall-clock minutes."""
    runs = collect_runs(sweep_dir)
    add_focus_metrics(runs, dict([focus]))
    per_job = ["Per job (mIoU %), and its wall-clock minutes (start-up and final validation included):", ""]
    per_job += jobs_markdown(runs, focus[0])
    notes = [*cue_note(runs[0]["config"]), "", *per_job]
    return write_report(sweep_dir, focus=focus, columns=columns, notes=notes)[2]


def report_table6(sweep_dir: Path) -> str:
    return report_layout_and_look_alike(sweep_dir, PAPER_TABLE6_COLUMNS)


def report_table7_policies(sweep_dir: Path) -> str:
    return report_layout_and_look_alike(sweep_dir, TABLE7_POLICY_COLUMNS, THINGS)


CAMVID_SMALL = ("small", CAMVID_SMALL_CLASSES)


def report_camvid(sweep_dir: Path) -> str:
    return write_levels_report(sweep_dir, CAMVID_SMALL, "CamVid val, single output (L=1) vs S&F (L=4)")[2]


def report_camvid_factors(sweep_dir: Path) -> str:
    """experiment=camvid_factors' layout over all classes and over the small ones, and each job."""
    runs = collect_runs(sweep_dir)
    add_focus_metrics(runs, dict([CAMVID_SMALL]))
    notes = ["Per job (mIoU %), and its wall-clock minutes (start-up and validations included):", ""]
    notes += jobs_markdown(runs, CAMVID_SMALL[0])
    return write_report(sweep_dir, focus=CAMVID_SMALL, notes=notes)[2]


# experiment=camvid_cpu's trainer.max_steps (tests/test_camvid.py checks they agree).
CAMVID_STEPS = 1200
CAMVID_FACTOR_CELLS = (
    "L2",
    "L4_naive",
    "L4_oracle",
    "L1_no_context",
    "L4_no_context",
    "L4_coarse_quarter",
    "L4_tau_low",
    "L4_tau_high",
)

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
        report_table6,
    ),
    "mechanism_table6_twins": Preset(
        "mechanism_table6_twins",
        ("experiment=table6", *TWINS_REGIME, f"cell={','.join(PAPER_TABLE6_CELLS)}"),
        TWINS_STEPS,
        "0,1,2",
        report_table6,
    ),
    "mechanism_table7": Preset(
        "mechanism_table7",
        ("experiment=table7", *MECHANISM_REGIME),
        MECHANISM_STEPS,
        "0",
        report_layout_and_look_alike,
    ),
    "default_table7": Preset(
        "default_table7",
        ("experiment=table7", *DEFAULT_REGIME, "cell=naive,oracle,true_positive"),
        DEFAULT_TABLE7_STEPS,
        "0,1,2",
        report_table7_policies,
    ),
    "camvid": Preset(
        "camvid_levels",
        ("experiment=camvid_cpu", "model.levels=1,4"),
        CAMVID_STEPS,
        "0,1,2",
        report_camvid,
        needs=("data.root",),
    ),
    "camvid_factors": Preset(
        "camvid_factors",
        ("experiment=camvid_factors", f"cell={','.join(CAMVID_FACTOR_CELLS)}"),
        CAMVID_STEPS,
        "0,1",
        report_camvid_factors,
        needs=("data.root",),
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
    # An extra override of a key the preset sets replaces the preset's (e.g. cell=L2,L4_naive: some cells
    # only); given twice to a multirun, the last value would win in every job of the product.
    preset, replaced = PRESETS[preset_name], set(map(override_key, extra))
    own = [override for override in preset.overrides if override_key(override) not in replaced]
    fixed = [override for override in (*own, *extra) if not is_sweep(override)]
    hidden = ["seed", "trainer.max_steps", "ckpt_path", "task_name", *map(override_key, fixed)]
    return [
        sys.executable,
        "-m",
        "sfseg.train",
        "-m",
        *own,
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
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw_argv)
    preset = PRESETS[args.preset]
    missing = [key for key in preset.needs if not any(override_key(o) == key for o in args.overrides)]
    if missing:
        parser.error(
            f"--preset {args.preset} needs {', '.join(f'{key}=<...>' for key in missing)} "
            "(e.g. data.root=../shared/data/camvid beside this project)"
        )
    out = args.out or Path("multirun") / preset.task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    command = sweep_command(
        args.preset,
        preset.steps if args.steps is None else args.steps,
        preset.seeds if args.seeds is None else args.seeds,
        out,
        args.overrides,
    )
    print(" ".join(command), flush=True)
    started, load_at_start = datetime.now(), os.getloadavg()[0]
    run_with_progress(command, out)
    markdown = preset.report(out)
    header = provenance(["python", "-m", "sfseg.ablation", *raw_argv], out, started, load_at_start)
    (out / "report.md").write_text(header + "\n" + markdown)
    print(header + "\n" + markdown)
    print(f"written: {out / 'report.md'} and {out / 'report.csv'}")


def sweep_axes(command: Sequence[str]) -> dict[str, list[str]]:
    """The sweep axes of a command line, key -> values ("seed=0,1,2" -> {"seed": ["0", "1", "2"]})."""
    axes = [argument.split("=", 1) for argument in command if "=" in argument and is_sweep(argument)]
    return {key: value.split(",") for key, value in axes}


def job_values(job: Path) -> dict[str, str]:
    """A job's overrides (its .hydra/overrides.yaml), key -> value."""
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(item.split("=", 1) for item in overrides)


def minutes_left(axes: Mapping[str, Sequence[str]], finished: Sequence[Path]) -> float:
    """The estimated minutes of the jobs still to run: each takes the mean of the finished jobs of its
    kind (the same values on every axis but the seed), or of all finished jobs when none of its kind is."""
    kinds = [key for key in axes if key != "seed"]
    minutes: dict[tuple[str, ...], list[float]] = {}
    done = set()
    for job in finished:
        values = job_values(job)
        minutes.setdefault(tuple(values.get(key) for key in kinds), []).append(job_seconds(job) / 60)
        done.add(tuple(values.get(key) for key in axes))
    every = [value for values in minutes.values() for value in values]
    left = 0.0
    for combination in itertools.product(*axes.values()):
        if combination not in done:
            values = dict(zip(axes, combination, strict=True))
            same_kind = minutes.get(tuple(values[key] for key in kinds), every)
            left += sum(same_kind) / len(same_kind)
    return left


def progress_line(
    job: Path, finished: Sequence[Path], axes: Mapping[str, Sequence[str]], started: float
) -> str:
    """One line as a job ends: its fused mIoU, its minutes, the minutes since the sweep started and the
    estimated time left (`minutes_left`)."""
    metrics = json.loads((job / "metrics.json").read_text())
    total = math.prod(len(values) for values in axes.values())
    left = total - len(finished)
    estimate = (
        f"about {minutes_left(axes, finished):.0f} min left ({left} jobs)" if left > 0 else "no job left"
    )
    return (
        f"[{len(finished)}/{total}] {job.name}: fused mIoU {100 * metrics['mIoU']:.2f} %, "
        f"{job_seconds(job) / 60:.1f} min; {(time.time() - started) / 60:.0f} min since the start, {estimate}"
    )


def run_with_progress(command: Sequence[str], out: Path, poll_seconds: float = 5.0) -> None:
    """Run the sweep, printing `progress_line` as each job writes its metrics.json."""
    started, axes = time.time(), sweep_axes(command)
    process = subprocess.Popen(command)
    reported: list[Path] = []
    while True:
        running = process.poll() is None
        for metrics_file in sorted(out.glob("*/metrics.json"), key=lambda path: path.stat().st_mtime):
            if metrics_file.parent not in reported:
                reported.append(metrics_file.parent)
                print(progress_line(metrics_file.parent, reported, axes, started), flush=True)
        if not running:
            break
        time.sleep(poll_seconds)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)


# versions.json keys that decide a CPU run's numbers besides the seed -> how the report names them
CPU_RECORD = {"torch_threads": "torch threads per job", "cpu_capability": "instruction set"}


def provenance(command: Sequence[str], sweep_dir: Path, started: datetime, load_at_start: float) -> str:
    """The head of a preset's report.md: the command, the commits its jobs ran at (from each job's
    versions.json), when it ran, its jobs' torch threads and CPU instruction set (on a CPU the numbers
    depend on both) and how busy the machine was (1-minute load average at start and end)."""
    commits: dict[str, int] = {}
    cpu_values: dict[str, set[str]] = {key: set() for key in CPU_RECORD}
    for versions_file in sorted(sweep_dir.glob("*/versions.json")):
        versions = json.loads(versions_file.read_text())
        commit = versions.get("git_commit") or "unknown (not a git checkout)"
        commit += " with local changes" if versions.get("git_dirty") else ""
        commits[commit] = commits.get(commit, 0) + 1
        for key, values in cpu_values.items():
            if key in versions:  # runs from before it was recorded lack it
                values.add(str(versions[key]))
    ran_at = "; ".join(f"{commit} ({count} jobs)" for commit, count in commits.items()) or "no job finished"
    described = [f"{CPU_RECORD[key]}: {' or '.join(sorted(v))}" for key, v in cpu_values.items() if v]
    cpu_note = f" ({'; '.join(described)})" if described else ""
    minutes = (datetime.now() - started).total_seconds() / 60
    return (
        f"# `{shlex.join(command)}`\n\n"
        f"Commit: {ran_at}. Started {started:%Y-%m-%d %H:%M}, {minutes:.1f} minutes in all, on "
        f"{os.cpu_count()} CPUs{cpu_note}; 1-minute load average {load_at_start:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end.\n"
    )


if __name__ == "__main__":
    main()
