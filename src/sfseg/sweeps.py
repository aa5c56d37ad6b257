"""A sweep's jobs gathered into a paper-style table (`python -m sfseg.report <sweep dir>` prints it).

Each job folder holds `metrics.json` (what it measured), `config.yaml` (the resolved config it ran
with) and `.hydra/overrides.yaml` (what the job varied). Jobs that differ only in `seed` fill the
same cell, with the mean and the spread (sample standard deviation) over seeds.

The layout: when the sweep's experiment has a `report` section (experiment=table6, table7, table8,
levels), the table is the paper's. Rows and columns select jobs by config values and may name the
metric of their cells; a cell without jobs shows "-":

    report:
      title: "Table 6: output format x context module (mIoU %)"
      corner: Output format          # header of the row names (optional)
      metric: mIoU                   # default metric of a cell
      rows: [{name: Single (standard), where: {model.levels: 1}}, ...]
      columns: [{name: ANL, where: {model.context.name: anl}}, {name: finest, metric: mIoU_finest}]

Otherwise, or with --by, one row per combination of the varied overrides and one column per metric.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = ("mIoU", "mIoU_finest")


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per finished job: its overrides (key -> value), its metrics and its config."""
    runs = []
    for metrics_file in sorted(Path(sweep_dir).glob("**/metrics.json")):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        varied = dict(item.split("=", 1) for item in overrides)
        runs.append(
            {
                "job": str(job),
                "overrides": varied,
                "metrics": json.loads(metrics_file.read_text()),
                "config": load_job_config(job),
            }
        )
    if not runs:
        raise FileNotFoundError(f"no job with a metrics.json under {sweep_dir}")
    return runs


def load_job_config(job: Path) -> dict[str, Any]:
    """The resolved config.yaml that train() writes; {} for jobs from before it did."""
    config_file = job / "config.yaml"
    if not config_file.exists():
        return {}
    return yaml.safe_load(config_file.read_text()) or {}


def unfinished_jobs(sweep_dir: str | Path) -> list[str]:
    """Job folders that Hydra started but that have no metrics.json (failed, or still running)."""
    return sorted(
        str(hydra_dir.parent)
        for hydra_dir in Path(sweep_dir).glob("**/.hydra")
        if not (hydra_dir.parent / "metrics.json").exists()
    )


def summarize(
    runs: Sequence[dict[str, Any]], by: Sequence[str] | None = None, metrics: Sequence[str] = DEFAULT_METRICS
) -> list[dict[str, Any]]:
    """Rows grouped by the overrides in `by` (default: every varied key except seed), with
    `<metric>_mean`, `<metric>_std` (0 for a single seed) and `seeds` per row."""
    if by is None:
        by = sorted({key for run in runs for key in run["overrides"] if key != "seed"})
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run["overrides"].get(key, "") for key in by), []).append(run)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key, strict=True))
        row["seeds"] = len(members)
        for metric in metrics:
            mean, std = mean_and_spread(members, metric)
            row[f"{metric}_mean"] = mean
            row[f"{metric}_std"] = std
        rows.append(row)
    return rows


def mean_and_spread(runs: Sequence[dict[str, Any]], metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation of a metric in percent (NaN mean without values; 0 spread
    for one value)."""
    values = [100 * run["metrics"][metric] for run in runs if run["metrics"].get(metric) is not None]
    mean = statistics.fmean(values) if values else float("nan")
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def to_markdown(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    keys = [key for key in rows[0] if key != "seeds" and not key.endswith(("_mean", "_std"))]
    header = [*keys, "seeds", *(f"{metric} (%)" for metric in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[key]) for key in keys] + [str(row["seeds"])]
        cells += [f"{row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f}" for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_layout(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The `report` section the jobs' experiment defines, or None (no section, or jobs that disagree)."""
    layouts = {json.dumps(run["config"].get("report"), sort_keys=True) for run in runs}
    return json.loads(layouts.pop()) if len(layouts) == 1 else None


def config_value(config: Mapping[str, Any], dotted_key: str) -> Any:
    """config["model"]["levels"] for "model.levels"; None where the key is absent."""
    value: Any = config
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def selects(entry: Mapping[str, Any], run: Mapping[str, Any]) -> bool:
    """Whether a row or column of the layout takes this job (values compare as text: 1 == "1")."""
    where = entry.get("where") or {}
    return all(str(config_value(run["config"], key)) == str(value) for key, value in where.items())


def layout_rows(layout: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return layout.get("rows") or [{"name": ""}]


def layout_cells(runs: Sequence[dict[str, Any]], layout: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per table cell: row, column, metric, mean, std (percent), seeds, jobs."""
    cells = []
    for row in layout_rows(layout):
        for column in layout["columns"]:
            metric = column.get("metric") or row.get("metric") or layout.get("metric", "mIoU")
            members = [run for run in runs if selects(row, run) and selects(column, run)]
            mean, std = mean_and_spread(members, metric)
            cells.append(
                {
                    "row": row["name"],
                    "column": column["name"],
                    "metric": metric,
                    "mean": mean,
                    "std": std,
                    "seeds": len(members),
                    "jobs": ";".join(Path(run["job"]).name for run in members),
                }
            )
    return cells


def layout_markdown(
    cells: Sequence[dict[str, Any]], layout: Mapping[str, Any], unmatched: int, unfinished: int
) -> str:
    columns = [column["name"] for column in layout["columns"]]
    lines = [f"### {layout['title']}", ""] if layout.get("title") else []
    lines += [
        "| " + " | ".join([layout.get("corner", ""), *columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for start in range(0, len(cells), len(columns)):
        row = cells[start : start + len(columns)]
        texts = [f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell["seeds"] else "-" for cell in row]
        lines.append("| " + " | ".join([row[0]["row"], *texts]) + " |")
    seeds = sorted({cell["seeds"] for cell in cells if cell["seeds"]})
    lines += ["", f"Mean ± spread (sample standard deviation) over seeds; seeds per cell: {seeds}."]
    if unmatched:
        lines.append(f"{unmatched} finished job(s) fit no cell of this table.")
    if unfinished:
        lines.append(f"{unfinished} job(s) have no metrics.json yet (failed or still running).")
    return "\n".join(lines) + "\n"


def write_report(
    sweep_dir: str | Path, by: Sequence[str] | None = None, metrics: Sequence[str] = DEFAULT_METRICS
) -> tuple[Path, Path, str]:
    """Write `report.md` and `report.csv` into the sweep folder; return their paths and the table.

    The paper's layout when the jobs' experiment has a `report` section and `by` is not given (CSV:
    one line per cell); otherwise one row per combination of the `by` overrides."""
    runs = collect_runs(sweep_dir)
    layout = report_layout(runs) if by is None else None
    if layout:
        rows = layout_cells(runs, layout)
        unmatched = sum(
            not any(
                selects(row, run) and selects(column, run)
                for row in layout_rows(layout)
                for column in layout["columns"]
            )
            for run in runs
        )
        markdown = layout_markdown(rows, layout, unmatched, len(unfinished_jobs(sweep_dir)))
    else:
        rows = summarize(runs, by, metrics)
        markdown = to_markdown(rows, metrics)
    md_path, csv_path = Path(sweep_dir) / "report.md", Path(sweep_dir) / "report.csv"
    md_path.write_text(markdown)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path, markdown
