"""The Sec. 5.4 ablations as sweep configs (`-m experiment=table6|table7|table8|levels`) and the
paper-style tables that `python -m sfseg.report` makes of them."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sfseg.report import main as report_main
from tests.conftest import TINY, compose_config
from tests.test_reproducibility import run_train

# The ablation setting (ADE20K, HRNet32, GPU) shrunk to seconds on a CPU: synthetic data without
# ADE20K's keys, a small backbone from scratch, and TINY's sizes and step limit.
REDUCED = [
    "data=synthetic",
    "~data.crop_size",
    "~data.subsample",
    "model/backbone=hrnet_w18_small",
    "model.backbone.pretrained=false",
    "trainer=cpu",
    "trainer.check_val_every_n_epoch=1",
    *TINY,
    "num_pyramid_images=0",
]


def run_sweep(experiment: str, sweep_dir: Path, *extra: str) -> list[dict]:
    """Run the experiment's sweep at the reduced size; the jobs' metrics and resolved configs."""
    result = run_train(
        "-m",
        f"experiment={experiment}",
        *REDUCED,
        *extra,
        f"hydra.sweep.dir={sweep_dir}",
        cwd=sweep_dir.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        config = OmegaConf.to_container(OmegaConf.load(metrics_file.parent / "config.yaml"))
        jobs.append(
            {"name": metrics_file.parent.name, "metrics": json.loads(metrics_file.read_text()), **config}
        )
    return jobs


def report(sweep_dir: Path) -> tuple[list[dict], str]:
    """`python -m sfseg.report <sweep dir>`: the CSV cells and the markdown table."""
    report_main([str(sweep_dir)])
    with (sweep_dir / "report.csv").open() as handle:
        cells = list(csv.DictReader(handle))
    return cells, (sweep_dir / "report.md").read_text()


def cell(cells: list[dict], row: str, column: str) -> dict:
    (found,) = [item for item in cells if item["row"] == row and item["column"] == column]
    return found


def assert_one_cell_per_job(cells: list[dict], jobs: list[dict]) -> None:
    named = [name for item in cells for name in filter(None, item["jobs"].split(";"))]
    assert sorted(named) == sorted(job["name"] for job in jobs)


@pytest.mark.parametrize(
    ("experiment", "cells"),
    [
        ("table6", ["single_none", "single_anl", "single_c2f", "pyramidal_none", "pyramidal_anl",
                    "pyramidal_anl_multi", "pyramidal_c2f", "single_ocr", "single_ccnet", "pyramidal_ocr",
                    "pyramidal_ccnet"]),
        ("table7", ["single_output", "naive", "oracle", "true_positive"]),
    ],
)  # fmt: skip
def test_cells_compose_into_the_ablation_setting(experiment: str, cells: list[str], run_dir: Path):
    """At full size: the sweep axis, the ablation setting of Sec. 5.4, and what each cell trains."""
    base = compose_config([f"experiment={experiment}"], run_dir)
    assert base.hydra.sweeper.params == {"cell": ",".join(cells)}
    assert base.model.backbone.name == "hrnet_w32" and base.data.subsample.train == 16000
    for name in cells:
        cfg = compose_config([f"experiment={experiment}", f"cell={name}"], run_dir)
        assert cfg.model.levels == (1 if name.startswith("single") else 4) == cfg.data.num_levels
        if experiment == "table6":
            assert cfg.model.context.name == name.split("_", 1)[1]
        else:
            assert cfg.model.context.name == "none"
            assert name == "single_output" or cfg.model.relabel.policy == name


@pytest.mark.slow
def test_table6_sweep_fills_eleven_cells_and_leaves_single_anl_multi_empty(tmp_path: Path):
    jobs = run_sweep("table6", tmp_path / "table6")
    assert len(jobs) == 11
    cells, markdown = report(tmp_path / "table6")
    assert len(cells) == 12  # output format (2) x context module (6: Table 6's four, OCR, CCNet)
    assert_one_cell_per_job(cells, jobs)
    for job in jobs:
        row = "Single (standard)" if job["model"]["levels"] == 1 else "Pyramidal (ours)"
        column = {
            "none": "-",
            "anl": "ANL",
            "anl_multi": "ANL-multi",
            "c2f": "ours (c2f)",
            "ocr": "OCR",
            "ccnet": "CCNet",
        }
        found = cell(cells, row, column[job["model"]["context"]["name"]])
        assert float(found["mean"]) == pytest.approx(100 * job["metrics"]["mIoU"])
    assert cell(cells, "Single (standard)", "ANL-multi")["seeds"] == "0"
    single_row = next(line for line in markdown.splitlines() if line.startswith("| Single (standard) |"))
    assert single_row.split(" | ")[3] == "-"  # the ANL-multi column


@pytest.mark.slow
def test_table7_sweep_has_the_single_output_and_three_relabel_policies(tmp_path: Path):
    jobs = run_sweep("table7", tmp_path / "table7")
    assert sorted((job["model"]["levels"], job["model"]["relabel"]["policy"]) for job in jobs) == [
        (1, "naive"),
        (4, "naive"),
        (4, "oracle"),
        (4, "true_positive"),
    ]
    assert {job["model"]["context"]["name"] for job in jobs} == {"none"}
    cells, markdown = report(tmp_path / "table7")
    assert "### Table 7" in markdown
    assert [item["column"] for item in cells] == [
        "single output",
        "naive",
        "simple fix (oracle)",
        "our final (true positive)",
    ]
    assert_one_cell_per_job(cells, jobs)
    assert all(item["seeds"] == "1" for item in cells)


@pytest.mark.slow
def test_table8_reads_aux_supervision_off_the_pyramid_runs_with_spread_over_seeds(tmp_path: Path):
    jobs = run_sweep("table8", tmp_path / "table8", "seed=0,1")
    assert len(jobs) == 4  # L in {1, 4} x 2 seeds: no training for the middle column
    cells, markdown = report(tmp_path / "table8")
    columns = ["single output", "aux. supervision", "specialize & fuse"]
    assert [item["column"] for item in cells] == columns
    assert "| single output | aux. supervision | specialize & fuse |" in markdown
    for column, levels, metric in [
        ("single output", 1, "mIoU"),
        ("aux. supervision", 4, "mIoU_finest"),
        ("specialize & fuse", 4, "mIoU"),
    ]:
        values = [100 * job["metrics"][metric] for job in jobs if job["model"]["levels"] == levels]
        found = cell(cells, "mIoU (%)", column)
        assert (found["metric"], found["seeds"]) == (metric, "2")
        assert float(found["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(found["std"]) == pytest.approx(statistics.stdev(values))
    assert {job["seed"] for job in jobs} == {0, 1}


@pytest.mark.slow
def test_levels_sweep_reports_fused_and_finest_per_level_count(tmp_path: Path):
    jobs = run_sweep("levels", tmp_path / "levels")
    assert sorted(job["model"]["levels"] for job in jobs) == [1, 2, 4]
    cells, _ = report(tmp_path / "levels")
    assert len(cells) == 6  # L in {1, 2, 4} x (fused, finest)
    for job in jobs:
        row = f"L={job['model']['levels']}"
        assert float(cell(cells, row, "specialize & fuse")["mean"]) == pytest.approx(
            100 * job["metrics"]["mIoU"]
        )
        finest = cell(cells, row, "finest level only")
        assert float(finest["mean"]) == pytest.approx(100 * job["metrics"]["mIoU_finest"])
    single = next(job for job in jobs if job["model"]["levels"] == 1)["metrics"]
    assert single["mIoU"] == pytest.approx(single["mIoU_finest"])  # one level: nothing to fuse
