"""Known answers of the numbers the sweep reports print (`sfseg.sweeps`, `python -m sfseg.report`,
`python -m sfseg.ablation --preset mechanism*`): hand-made job folders whose confusion matrices are
small enough to score on paper, and the exact text the reports must write from them.

The mechanism sweeps below have 3 classes (sky, water: the look-alike group; grass: the controls), two
L=1 jobs and two L=4 jobs. Every expected number is worked out in the comments."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from sfseg.ablation import minutes_left, progress_line
from sfseg.runs import write_validation
from sfseg.sweeps import (
    add_focus_metrics,
    collect_runs,
    jobs_markdown,
    mean_and_spread,
    mechanism_goals,
    per_class_markdown,
    selects,
    summarize,
    table9_markdown,
    to_markdown,
    write_levels_report,
    write_mechanism_report,
    write_report,
    write_study_report,
)

CLASSES = ("sky", "water", "grass")
GROUPS = {"look-alike": ("sky", "water"), "controls": ("grass",)}
EMPTY = torch.zeros(3, 3, dtype=torch.long)


def matrix(*rows: tuple[int, int, int]) -> torch.Tensor:
    """A confusion matrix: rows ground truth, columns prediction (sky, water, grass)."""
    return torch.tensor(rows, dtype=torch.long)


def write_job(
    sweep: Path,
    name: str,
    levels: int,
    metrics: dict,
    counts: dict[str, torch.Tensor],
    config: dict | None = None,
    overrides: tuple[str, ...] = (),
) -> Path:
    """A finished job as train() leaves it: metrics.json and val_counts.pt (the real writer),
    config.yaml (the resolved config) and .hydra/overrides.yaml (what the sweep varied)."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.levels={levels}", *overrides]))
    (job / "config.yaml").write_text(yaml.safe_dump({"model": {"levels": levels}, **(config or {})}))
    write_validation(job, metrics, counts)
    return job


def single_output_job(sweep: Path, name: str, fused: torch.Tensor, miou: float, iou: tuple) -> Path:
    """An L=1 job: the fused output is the one level (confmat rows fused and level 1 alike)."""
    counts = {
        "confmat": torch.stack([fused, fused]),
        "specialization": fused.view(1, 1, 3, 3),
        "cells": torch.tensor([16]),
    }
    metrics = {
        "mIoU": miou,
        "mIoU_finest": miou,
        "per_class_iou": dict(zip(CLASSES, iou, strict=True)),
        "share_level1": 1.0,
    }
    return write_job(sweep, name, 1, metrics, counts)


def pyramid_job(
    sweep: Path,
    name: str,
    level1_group: dict[int, torch.Tensor],
    cells: list[int],
    miou: float,
    miou_finest: float,
    iou: tuple,
) -> Path:
    """An L=4 job whose fused map took 16 pixels (8 sky, 8 water) from level 1 and 8 grass pixels from
    level 4, none from levels 2 and 3. `level1_group`: the confusion matrix of each predicting level
    (0 = level 1 .. 3 = level 4) on the level-1 pixels. On the level-4 pixels the levels predict:
      level 1: 4 grass right, 4 as water   -> water IoU 0, grass 4/8          -> mIoU 25.00
      level 2, 3: 6 right, 2 as sky        -> sky IoU 0, grass 6/8            -> mIoU 37.50
      level 4: all 8 right                 -> grass IoU 1                     -> mIoU 100.00
    """
    finest_group = {
        0: matrix((0, 0, 0), (0, 0, 0), (0, 4, 4)),
        1: matrix((0, 0, 0), (0, 0, 0), (2, 0, 6)),
        2: matrix((0, 0, 0), (0, 0, 0), (2, 0, 6)),
        3: matrix((0, 0, 0), (0, 0, 0), (0, 0, 8)),
    }
    specialization = torch.zeros(4, 4, 3, 3, dtype=torch.long)  # [assigned, predicting, C, C]
    for predicting in range(4):
        specialization[0, predicting] = level1_group[predicting]
        specialization[3, predicting] = finest_group[predicting]
    fused = level1_group[0] + finest_group[3]  # each pixel predicted by the level it was taken from
    levels = [specialization[:, predicting].sum(0) for predicting in range(4)]
    counts = {
        "confmat": torch.stack([fused, *levels]),
        "specialization": specialization,
        "cells": torch.tensor(cells),
    }
    shares = {f"share_level{level + 1}": count / sum(cells) for level, count in enumerate(cells)}
    metrics = {
        "mIoU": miou,
        "mIoU_finest": miou_finest,
        "per_class_iou": dict(zip(CLASSES, iou, strict=True)),
        **shares,
    }
    return write_job(sweep, name, 4, metrics, counts)


# On its 16 pixels, level 1 right everywhere (IoU 1, 1 -> 100.00), levels 2 and 3 call all of them sky
# (sky 8/16, water 0 -> 25.00), level 4 half wrong (sky 4/12, water 4/12 -> 33.33).
STRONG_LEVEL1 = {
    0: matrix((8, 0, 0), (0, 8, 0), (0, 0, 0)),
    1: matrix((8, 0, 0), (8, 0, 0), (0, 0, 0)),
    2: matrix((8, 0, 0), (8, 0, 0), (0, 0, 0)),
    3: matrix((4, 4, 0), (4, 4, 0), (0, 0, 0)),
}
# Level 1 misses 2 water pixels (sky 8/10, water 6/8 -> 77.50), level 4 as above (33.33).
GOOD_LEVEL1 = {**STRONG_LEVEL1, 0: matrix((8, 0, 0), (2, 6, 0), (0, 0, 0))}
# Level 1 half wrong (33.33), level 4 right everywhere (100.00): level 1 is behind on its own pixels.
WEAK_LEVEL1 = {**STRONG_LEVEL1, 0: STRONG_LEVEL1[3], 3: STRONG_LEVEL1[0]}


def single_output_jobs(sweep: Path) -> None:
    # seed 0: sky 2/(2+3+3) = 0.25, water 0.25, grass 1 -> mIoU 0.5
    single_output_job(sweep, "0_L1_seed0", matrix((2, 3, 0), (3, 2, 0), (0, 0, 8)), 0.5, (0.25, 0.25, 1.0))
    # seed 1: sky 4/(4+3+3) = 0.4, water 0.4, grass 1 -> mIoU 0.6
    single_output_job(sweep, "1_L1_seed1", matrix((4, 3, 0), (3, 4, 0), (0, 0, 8)), 0.6, (0.4, 0.4, 1.0))


def first_pyramid_job(sweep: Path) -> None:
    # fused: every pixel right -> mIoU 1; finest (level 4): sky 4/12, water 4/12, grass 8/8 -> 5/9.
    # Cells: 4 from level 1, 3 from level 4 -> shares 4/7, 0, 0, 3/7.
    pyramid_job(sweep, "2_L4_seed0", STRONG_LEVEL1, [4, 0, 0, 3], 1.0, 5 / 9, (1.0, 1.0, 1.0))


@pytest.fixture
def goals_met_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "met"
    single_output_jobs(sweep)
    first_pyramid_job(sweep)
    # fused: sky 8/10, water 6/8, grass 1 -> mIoU 0.85; finest 5/9. Shares 5/8, 0, 0, 3/8.
    pyramid_job(sweep, "3_L4_seed1", GOOD_LEVEL1, [5, 0, 0, 3], 0.85, 5 / 9, (0.8, 0.75, 1.0))
    return sweep


@pytest.fixture
def goals_not_met_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "not_met"
    single_output_jobs(sweep)
    first_pyramid_job(sweep)
    # fused: sky 4/12, water 4/12, grass 1 -> mIoU 5/9; finest: all right -> 1. Shares 1/4, 0, 0, 3/4.
    pyramid_job(sweep, "3_L4_seed1", WEAK_LEVEL1, [1, 0, 0, 3], 5 / 9, 1.0, (1 / 3, 1 / 3, 1.0))
    return sweep


def goal_lines(sweep: Path) -> list[str]:
    runs = collect_runs(sweep)
    levels_of = {run["job"]: run["config"]["model"]["levels"] for run in runs}
    return mechanism_goals(runs, levels_of, max(levels_of.values()))


def test_goals_met(goals_met_sweep: Path):
    assert goal_lines(goals_met_sweep) == [
        # L=1: 50, 60 -> 55.00, spread 7.07; L=4: 100, 85 -> 92.50, spread 10.61; 3 x 10.61 = 31.82
        "1. L=4 fused - L=1 = +37.50 mIoU; 3 x the larger seed spread = 31.82 (2 and 2 seeds): **met**",
        "2. Table 9, coarsest column: on the pixels taken from level 1, level 1 scores 100.00 and the finest "
        "level 33.33 (the job shown); level 1 is ahead in 2 of 2 L=4 jobs: **met**",
        # 4/7 = 57.1 % and 5/8 = 62.5 %, mean 59.8 %: both above half
        "3. Share of finest cells taken from the coarse levels 1..3: 59.8 % (per job: 57.1, 62.5): **met**",
    ]


def test_goals_not_met(goals_not_met_sweep: Path):
    assert goal_lines(goals_not_met_sweep) == [
        # L=4: 100, 55.56 -> 77.78 (gain 22.78), spread 44.44 / sqrt 2 = 31.43; 3 x 31.43 = 94.28
        "1. L=4 fused - L=1 = +22.78 mIoU; 3 x the larger seed spread = 94.28 (2 and 2 seeds): **not met**",
        "2. Table 9, coarsest column: on the pixels taken from level 1, level 1 scores 100.00 and the finest "
        "level 33.33 (the job shown); level 1 is ahead in 1 of 2 L=4 jobs: **not met**",
        # 4/7 = 57.1 % and 1/4 = 25.0 %: one job below half
        "3. Share of finest cells taken from the coarse levels 1..3: 41.1 % (per job: 57.1, 25.0): **not met**",
    ]


def test_goal_1_needs_two_seeds_a_side_and_both_sides(tmp_path: Path):
    """A large gain from one seed a side is not met: one seed has no spread to compare with."""
    sweep = tmp_path / "one_seed"
    single_output_job(sweep, "0_L1_seed0", matrix((2, 3, 0), (3, 2, 0), (0, 0, 8)), 0.5, (0.25, 0.25, 1.0))
    first_pyramid_job(sweep)
    assert goal_lines(sweep)[0] == (
        "1. L=4 fused - L=1 = +50.00 mIoU; 3 x the larger seed spread = 0.00 (1 and 1 seeds): **not met**"
    )
    (sweep / "0_L1_seed0" / "metrics.json").unlink()
    assert goal_lines(sweep) == ["Needs jobs with L=1 and with L>1."]


def test_table9_of_a_hand_made_job(tmp_path: Path):
    first_pyramid_job(tmp_path)
    assert table9_markdown(tmp_path / "2_L4_seed0").splitlines() == [
        "| l' \\ l | 4 | 3 | 2 | 1 |",
        "|---|---|---|---|---|",
        # rows: the scored level l'; columns: where the fused map took the pixels from (2, 3: none -> "-")
        "| 4 | 100.00 | - | - | 33.33 |",
        "| 3 | 37.50 | - | - | 25.00 |",
        "| 2 | 37.50 | - | - | 25.00 |",
        "| 1 | 25.00 | - | - | 100.00 |",
        "| pixels taken (%) | 33.3 | 0.0 | 0.0 | 66.7 |",  # 8 and 16 of 24 pixels
        "| finest cells taken (%) | 42.9 | 0.0 | 0.0 | 57.1 |",  # 3 and 4 of 7 cells
    ]


def test_mechanism_report_of_hand_made_jobs(goals_met_sweep: Path):
    md_path, csv_path, markdown = write_mechanism_report(goals_met_sweep, GROUPS, ["A note."])
    assert md_path.read_text() == markdown
    lines = markdown.splitlines()
    header = (
        "| L | seeds | all classes: fused | all classes: finest only | look-alike: fused | "
        "look-alike: finest only | controls: fused | controls: finest only |"
    )
    start = lines.index(header)
    assert lines[start + 2 : start + 4] == [
        # L=1: mIoU 50, 60; look-alike (sky, water): 25, 40 -> 32.50 ± 10.61; grass 100 in both
        "| 1 | 2 | 55.00 ± 7.07 | 55.00 ± 7.07 | 32.50 ± 10.61 | 32.50 ± 10.61 | 100.00 ± 0.00 | 100.00 ± 0.00 |",
        # L=4: mIoU 100, 85; finest 5/9 twice; look-alike fused (1+1)/2 and (0.8+0.75)/2 -> 100, 77.5
        # -> 88.75 ± 15.91; look-alike finest 4/12 twice -> 33.33; grass 1 everywhere
        "| 4 | 2 | 92.50 ± 10.61 | 55.56 ± 0.00 | 88.75 ± 15.91 | 33.33 ± 0.00 | 100.00 ± 0.00 | 100.00 ± 0.00 |",
    ]
    assert "A note." in lines
    per_class = lines.index("| class | L=1 | L=4 |")
    assert lines[per_class + 2 : per_class + 5] == [
        "| sky | 32.50 | 90.00 |",  # (25 + 40) / 2 and (100 + 80) / 2
        "| water | 32.50 | 87.50 |",  # (25 + 40) / 2 and (100 + 75) / 2
        "| grass | 100.00 | 100.00 |",
    ]
    assert "### Table 9 of one L=4 job (2_L4_seed0): " in markdown
    table9 = lines.index("| l' \\ l | 4 | 3 | 2 | 1 |")
    assert lines[table9 + 2] == "| 4 | 100.00 | - | - | 33.33 |"
    assert lines[-3:] == goal_lines(goals_met_sweep)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model.levels"] for row in rows] == ["1", "4"]
    assert float(rows[1]["mIoU[look-alike]_mean"]) == pytest.approx(88.75)
    assert float(rows[1]["mIoU[look-alike]_std"]) == pytest.approx(22.5 / math.sqrt(2))
    assert float(rows[0]["mIoU_finest[controls]_mean"]) == pytest.approx(100.0)


def test_focus_metrics_are_the_mean_iou_of_the_group_from_the_counts(goals_not_met_sweep: Path):
    runs = collect_runs(goals_not_met_sweep)
    add_focus_metrics(runs, {"water only": ["water"], "look-alike": ["sky", "water"]})
    by_job = {Path(run["job"]).name: run["metrics"] for run in runs}
    # 3_L4_seed1: fused sky 4/12, water 4/12; finest (level 4) sky 8/8, water 8/8
    assert by_job["3_L4_seed1"]["mIoU[look-alike]"] == pytest.approx(1 / 3)
    assert by_job["3_L4_seed1"]["mIoU_finest[look-alike]"] == pytest.approx(1.0)
    # 1_L1_seed1: water 4/10 in both rows
    assert by_job["1_L1_seed1"]["mIoU[water only]"] == pytest.approx(0.4)
    assert by_job["1_L1_seed1"]["mIoU_finest[water only]"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"focus classes \['sand'\] are not classes of job .*0_L1_seed0"):
        add_focus_metrics(runs, {"look-alike": ["sky", "sand"]})


def test_focus_group_skips_a_class_absent_from_the_job(tmp_path: Path):
    # water neither occurs nor is predicted (IoU NaN): the group's mean is over sky alone (2/3).
    single_output_job(tmp_path, "0_L1", matrix((2, 0, 1), (0, 0, 0), (0, 0, 5)), 0.0, (2 / 3, None, 5 / 6))
    runs = collect_runs(tmp_path)
    add_focus_metrics(runs, GROUPS)
    assert runs[0]["metrics"]["mIoU[look-alike]"] == pytest.approx(2 / 3)


def test_jobs_come_in_hydra_job_number_order_not_text_order(tmp_path: Path):
    # A 21-job preset: sorted as text, job 10 would come before job 2 in every per-job table.
    perfect = matrix((2, 0, 0), (0, 2, 0), (0, 0, 2))
    for number in (10, 2, 1, 0, 11):
        single_output_job(tmp_path, f"{number}_cell=single", perfect, 1.0, (1.0, 1.0, 1.0))
    runs = collect_runs(tmp_path)
    assert [Path(run["job"]).name.split("_")[0] for run in runs] == ["0", "1", "2", "10", "11"]
    rows = jobs_markdown(runs[::-1])[2:]  # the per-job table orders whatever it is given
    assert [row.split("_")[0] for row in rows] == ["| 0", "| 1", "| 2", "| 10", "| 11"]


def test_mean_and_spread_in_percent_over_the_jobs_that_have_the_metric():
    runs = [{"metrics": {"mIoU": value}} for value in (0.5, 0.6, 0.7, None)] + [{"metrics": {}}]
    mean, spread = mean_and_spread(runs, "mIoU")
    assert mean == pytest.approx(60.0) and spread == pytest.approx(10.0)  # sample std of 50, 60, 70
    assert mean_and_spread(runs[:1], "mIoU") == (50.0, 0.0)  # one seed: no spread
    mean, spread = mean_and_spread(runs[3:], "mIoU")
    assert math.isnan(mean) and spread == 0.0


def test_per_class_markdown_means_over_the_seeds_of_each_level():
    runs = [
        {"job": "a", "metrics": {"per_class_iou": {"sky": 0.5, "road": None}}},
        {"job": "b", "metrics": {"per_class_iou": {"sky": 0.25, "road": None}}},
        {"job": "c", "metrics": {"per_class_iou": {"sky": 1.0, "road": 0.125}}},
    ]
    assert per_class_markdown(runs, {"a": 1, "b": 1, "c": 4}) == [
        "| class | L=1 | L=4 |",
        "|---|---|---|",
        "| sky | 37.50 | 100.00 |",
        "| road | - | 12.50 |",  # no L=1 job scored road
    ]


def test_summarize_groups_by_the_varied_overrides_and_leaves_seed_out():
    runs = [
        {"overrides": {"model.levels": "1", "seed": "0"}, "metrics": {"mIoU": 0.25}},
        {"overrides": {"model.levels": "1", "seed": "1"}, "metrics": {"mIoU": 0.35}},
        {"overrides": {"model.levels": "4", "seed": "0"}, "metrics": {"mIoU": 0.5}},
    ]
    rows = summarize(runs, metrics=["mIoU"])
    assert rows == [
        {
            "model.levels": "1",
            "seeds": 2,
            "mIoU_mean": pytest.approx(30.0),
            "mIoU_std": pytest.approx(50**0.5),
        },
        {"model.levels": "4", "seeds": 1, "mIoU_mean": 50.0, "mIoU_std": 0.0},
    ]
    assert to_markdown(rows, ["mIoU"]).splitlines() == [
        "| model.levels | seeds | mIoU (%) |",
        "|---|---|---|",
        "| 1 | 2 | 30.00 ± 7.07 |",
        "| 4 | 1 | 50.00 ± 0.00 |",
    ]


LAYOUT = {
    "title": "Table 7: relabel policy (mIoU %)",
    "metric": "mIoU",
    "rows": [{"name": "mIoU (%)"}],
    "columns": [
        {"name": "single output", "where": {"model.levels": 1}},
        {"name": "naive", "where": {"model.levels": 4, "model.relabel.policy": "naive"}},
        {"name": "finest", "metric": "mIoU_finest", "where": {"model.levels": 4}},
        {"name": "oracle", "where": {"model.levels": 4, "model.relabel.policy": "oracle"}},
    ],
}


def test_paper_layout_and_its_focus_table_from_hand_made_jobs(tmp_path: Path):
    """`python -m sfseg.report --focus`: the experiment's layout over all classes, then over the focus
    classes, each cell the mean over the jobs it selects."""

    def layout_job(
        name: str, levels: int, policy: str, fused: torch.Tensor, finest: torch.Tensor, miou, finest_miou
    ):
        counts = {"confmat": torch.stack([fused, *[EMPTY] * (levels - 1), finest])}
        metrics = {"mIoU": miou, "mIoU_finest": finest_miou, "per_class_iou": dict.fromkeys(CLASSES)}
        config = {"report": LAYOUT, "model": {"levels": levels, "relabel": {"policy": policy}}}
        write_job(tmp_path, name, levels, metrics, counts, config, overrides=(f"seed={name[-1]}",))

    half = matrix((2, 2, 0), (0, 4, 0), (0, 0, 4))  # sky 2/4, water 4/6 -> look-alike 7/12
    right = matrix((4, 0, 0), (0, 4, 0), (0, 0, 4))  # look-alike 1
    layout_job("single_s0", 1, "naive", half, half, 0.4, 0.4)
    layout_job("naive_s0", 4, "naive", half, right, 0.6, 0.9)
    layout_job("naive_s1", 4, "naive", right, right, 0.7, 0.8)
    (tmp_path / "crashed" / ".hydra").mkdir(parents=True)  # started, no metrics.json
    _, csv_path, markdown = write_report(tmp_path, focus=("look-alike", ["sky", "water"]))
    lines = markdown.splitlines()
    assert lines[:5] == [
        "### Table 7: relabel policy (mIoU %)",
        "",
        "|  | single output | naive | finest | oracle |",
        "|---|---|---|---|---|",
        # naive: 60, 70; finest: 90, 80 -> 85.00 ± 7.07; no oracle job -> "-"
        "| mIoU (%) | 40.00 ± 0.00 | 65.00 ± 7.07 | 85.00 ± 7.07 | - |",
    ]
    assert "1 job(s) have no metrics.json yet (failed or still running)." in lines
    focus = lines.index("### Table 7: relabel policy (mIoU %), look-alike classes only")
    # look-alike of the fused rows: 7/12 (58.33), then 7/12 and 1 (79.17 ± 29.46); finest 1 and 1
    assert lines[focus + 4] == "| mIoU (%) | 58.33 ± 0.00 | 79.17 ± 29.46 | 100.00 ± 0.00 | - |"
    with csv_path.open() as handle:
        cells = list(csv.DictReader(handle))
    assert [(cell["column"], cell["metric"], cell["seeds"]) for cell in cells[4:]] == [
        ("single output", "mIoU[look-alike]", "1"),
        ("naive", "mIoU[look-alike]", "2"),
        ("finest", "mIoU_finest[look-alike]", "2"),
        ("oracle", "mIoU[look-alike]", "0"),
    ]
    assert cells[1]["jobs"] == "naive_s0;naive_s1"


def test_report_by_levels_with_a_focus_group(goals_met_sweep: Path):
    """`python -m sfseg.report --by model.levels --focus ...` (and `--preset quick`'s report): one row
    per L, the focus group's columns after the overall ones."""
    _, _, markdown = write_report(
        goals_met_sweep, by=["model.levels"], focus=("look-alike", ["sky", "water"])
    )
    assert markdown.splitlines() == [
        "| model.levels | seeds | mIoU (%) | mIoU_finest (%) | mIoU[look-alike] (%) | mIoU_finest[look-alike] (%) |",
        "|---|---|---|---|---|---|",
        "| 1 | 2 | 55.00 ± 7.07 | 55.00 ± 7.07 | 32.50 ± 10.61 | 32.50 ± 10.61 |",
        "| 4 | 2 | 92.50 ± 10.61 | 55.56 ± 0.00 | 88.75 ± 15.91 | 33.33 ± 0.00 |",
    ]


def test_a_layout_takes_a_job_whatever_the_yaml_type_of_its_values() -> None:
    """A layout written by hand may quote what the job's config holds as a number (or the reverse):
    `where` values compare as text, so "4" takes a job of model.levels=4 and "1" does not."""
    run = {"config": {"model": {"levels": 4, "tau": 0.9, "context": {"name": "c2f"}}}}
    assert selects({"where": {"model.levels": "4", "model.tau": "0.9", "model.context.name": "c2f"}}, run)
    assert selects({"where": {"model.levels": 4}}, {"config": {"model": {"levels": "4"}}})
    assert not selects({"where": {"model.levels": "1"}}, run)
    assert selects({"name": "no condition"}, run)


# --- real-data levels report (python -m sfseg.ablation --preset camvid), studies, sweep progress -----------


def with_headroom_and_minutes(
    sweep: Path, extra: dict[str, dict[str, float]], minutes: dict[str, float]
) -> None:
    """Add level-1 and oracle mIoU to each job's metrics.json (as real jobs of any L have them) and set
    its wall-clock minutes (from writing .hydra/overrides.yaml to writing metrics.json)."""
    for name, values in extra.items():
        job = sweep / name
        metrics = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps({**metrics, **values}))
        os.utime(job / ".hydra" / "overrides.yaml", (1_000_000, 1_000_000))
        end = 1_000_000 + 60 * minutes[name]
        os.utime(job / "metrics.json", (end, end))


def test_levels_report_of_hand_made_jobs(goals_met_sweep: Path):
    with_headroom_and_minutes(
        goals_met_sweep,
        {
            "0_L1_seed0": {"mIoU_level1": 0.5, "mIoU_oracle": 0.5},
            "1_L1_seed1": {"mIoU_level1": 0.6, "mIoU_oracle": 0.6},
            "2_L4_seed0": {"mIoU_level1": 0.7, "mIoU_oracle": 1.0},
            "3_L4_seed1": {"mIoU_level1": 0.8, "mIoU_oracle": 0.9},
        },
        {"0_L1_seed0": 2, "1_L1_seed1": 4, "2_L4_seed0": 5, "3_L4_seed1": 7},
    )
    md_path, csv_path, markdown = write_levels_report(goals_met_sweep, ("small", ["water"]), "A title")
    lines = markdown.splitlines()
    header = (
        "| L | seeds | fused | finest only | level 1 alone | oracle fuse | fused, small classes | "
        "fused, other 2 classes | minutes per job |"
    )
    start = lines.index(header)
    assert lines[start + 2 : start + 4] == [
        # L=1: 50, 60; water 25, 40; sky and grass (25 + 100) / 2, (40 + 100) / 2 = 62.5, 70; 2 and 4 min
        "| 1 | 2 | 55.00 ± 7.07 | 55.00 ± 7.07 | 55.00 ± 7.07 | 55.00 ± 7.07 | 32.50 ± 10.61 | 66.25 ± 5.30 | 3.0 |",
        # L=4: 100, 85; finest 5/9 twice; level 1 70, 80; oracle 100, 90; water 100, 75; others 100, 90
        "| 4 | 2 | 92.50 ± 10.61 | 55.56 ± 0.00 | 75.00 ± 7.07 | 95.00 ± 7.07 | 87.50 ± 17.68 | 95.00 ± 7.07 | 6.0 |",
    ]
    per_class = lines.index("| class | L=1 | L=4 |")
    assert lines[per_class + 2 : per_class + 6] == [
        "| **water** | 32.50 ± 10.61 | 87.50 ± 17.68 |",  # the small classes first
        "| *other classes* | | |",
        "| sky | 32.50 ± 10.61 | 90.00 ± 14.14 |",
        "| grass | 100.00 ± 0.00 | 100.00 ± 0.00 |",
    ]
    assert (
        "### Table 9 of one L=4 job (2_L4_seed0): " in markdown and "| 4 | 100.00 | - | - | 33.33 |" in lines
    )
    assert md_path.read_text() == markdown and (goals_met_sweep / "report.png").stat().st_size > 10_000
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["model.levels"], float(row["minutes_mean"])) for row in rows] == [("1", 3.0), ("4", 6.0)]


def write_trial(sweep: Path, number: int, params: dict[str, str], miou: float, minutes: float) -> None:
    """A finished trial of an Optuna study as Hydra leaves it: its overrides, the sweeper's config in
    .hydra/hydra.yaml, and train()'s metrics.json."""
    job = sweep / f"trial_{number}"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"{key}={value}" for key, value in params.items()] + ["experiment=camvid_cpu"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    sweeper = {
        "n_trials": 3,
        "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 0, "n_startup_trials": 2},
        "params": {
            "model.optimizer.lr": "tag(log, interval(0.0005, 0.008))",
            "data.crop_size": "choice(128, 160)",
        },
    }
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"sweeper": sweeper}}, sort_keys=False)
    )
    metrics = {"mIoU": miou, "mIoU_finest": miou, "per_class_iou": {"sky": miou}, "step": 800}
    (job / "metrics.json").write_text(json.dumps(metrics))
    os.utime(job / ".hydra" / "overrides.yaml", (1_000_000, 1_000_000))
    os.utime(job / "metrics.json", (1_000_000 + 60 * minutes, 1_000_000 + 60 * minutes))


def test_study_report_lists_the_trials_best_first_with_their_parameters(tmp_path: Path):
    write_trial(
        tmp_path, 0, {"model.optimizer.lr": "0.002289851460477038", "data.crop_size": "224"}, 0.40, 5.5
    )
    write_trial(tmp_path, 1, {"model.optimizer.lr": "0.001", "data.crop_size": "160"}, 0.45, 6.0)
    (tmp_path / "trial_2" / ".hydra").mkdir(parents=True)  # started, not finished
    _, _, markdown = write_study_report(tmp_path)
    lines = markdown.splitlines()
    assert lines[:4] == [
        "| trial | model.optimizer.lr | data.crop_size | fused | finest only | level 1 | steps | minutes |",
        "|---|---|---|---|---|---|---|---|",
        "| trial_1 | 0.001 | 160 | 45.00 | 45.00 | 45.00 | 800 | 6.0 |",
        "| trial_0 | 0.00229 | 224 | 40.00 | 40.00 | 40.00 | 800 | 5.5 |",
    ]
    assert "- `data.crop_size`: `choice(128, 160)`" in lines
    assert (
        "2 trials finished of 3; sampler optuna.samplers.TPESampler (seed 0, 2 random trials first)." in lines
    )
    assert "1 trial(s) have no metrics.json (failed or still running)." in lines
    (tmp_path / "optimization_results.yaml").write_text(
        yaml.safe_dump(
            {"best_params": {"model.optimizer.lr": 0.001, "data.crop_size": 160}, "best_value": 0.45},
            sort_keys=False,
        )
    )
    assert write_study_report(tmp_path)[2].splitlines()[-1] == (
        "Best (the sweeper's optimization_results.yaml): `model.optimizer.lr=0.001`, `data.crop_size=160`, "
        "fused mIoU 45.00 %."
    )


def test_sweep_progress_estimates_the_jobs_left_by_their_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    axes = {"model.levels": ["1", "4"], "seed": ["0", "1", "2"]}
    finished = []
    for name, levels, seed, minutes in (("0_a", 1, 0, 10.0), ("1_b", 1, 1, 12.0), ("3_c", 4, 0, 15.0)):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"model.levels={levels}", f"seed={seed}"])
        )
        (job / "metrics.json").write_text(json.dumps({"mIoU": 0.5}))
        os.utime(job / ".hydra" / "overrides.yaml", (1_000_000, 1_000_000))
        os.utime(job / "metrics.json", (1_000_000 + 60 * minutes, 1_000_000 + 60 * minutes))
        finished.append(job)
    # left: one L=1 job (mean of its kind 11 min) and two L=4 jobs (15 min each)
    assert minutes_left(axes, finished) == pytest.approx(11 + 2 * 15)
    monkeypatch.setattr("time.time", lambda: 1_000_000 + 60 * 37)
    assert progress_line(finished[-1], finished, axes, started=1_000_000) == (
        "[3/6] 3_c: fused mIoU 50.00 %, 15.0 min; 37 min since the start, about 41 min left (3 jobs)"
    )
    # jobs of a kind none has finished take the mean of all finished jobs
    assert minutes_left({"model.levels": ["1", "2"], "seed": ["0"]}, finished[:1]) == pytest.approx(10.0)
