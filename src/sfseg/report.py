"""Gather a sweep's jobs into a paper-style table: `python -m sfseg.report <sweep dir> [--by KEY ...]`.

Each job folder holds `.hydra/overrides.yaml` (what the job varied) and `metrics.json` (what it
measured). Jobs that differ only in `seed` are one table row, with the mean and the spread
(sample standard deviation) over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = ("mIoU", "mIoU_finest")


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per finished job: its overrides (key -> value) and its metrics."""
    runs = []
    for metrics_file in sorted(Path(sweep_dir).glob("**/metrics.json")):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        varied = dict(item.split("=", 1) for item in overrides)
        runs.append({"job": str(job), "overrides": varied, "metrics": json.loads(metrics_file.read_text())})
    if not runs:
        raise FileNotFoundError(f"no job with a metrics.json under {sweep_dir}")
    return runs


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
            values = [100 * m["metrics"][metric] for m in members if m["metrics"].get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def to_markdown(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    keys = [key for key in rows[0] if key != "seeds" and not key.endswith(("_mean", "_std"))]
    header = [*keys, "seeds", *(f"{metric} (%)" for metric in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[key]) for key in keys] + [str(row["seeds"])]
        cells += [f"{row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f}" for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    sweep_dir: str | Path, by: Sequence[str] | None = None, metrics: Sequence[str] = DEFAULT_METRICS
) -> tuple[Path, Path, str]:
    """Write `report.md` and `report.csv` into the sweep folder; return their paths and the table."""
    rows = summarize(collect_runs(sweep_dir), by, metrics)
    markdown = to_markdown(rows, metrics)
    md_path, csv_path = Path(sweep_dir) / "report.md", Path(sweep_dir) / "report.csv"
    md_path.write_text(markdown)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path, markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--by", nargs="*", help="override keys that make a row (default: all varied but seed)"
    )
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    md_path, csv_path, markdown = write_report(args.sweep_dir, args.by, args.metrics)
    print(markdown)
    print(f"written: {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
