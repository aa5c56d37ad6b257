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

`--focus NAME CLASS [CLASS ...]` adds the mIoU over those classes only (fused, and finest level), from each
job's `val_counts.pt`: metrics `mIoU[NAME]` and `mIoU_finest[NAME]`, and, in the paper's layout, the table
again on those classes. `mechanism_report` is what `python -m sfseg.ablation --preset mechanism` writes:
the L=1 / L=4 table, Table 9 and the share of cells of one L=4 job, the fuse's headroom, and the issue's
goals checked; `fuse_report` (`--preset mechanism_fuse`, `fuse_default`) compares the fuse rules on the
same pyramids (docs/fuse.md).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from sfseg.analysis import class_iou, specialization_miou
from sfseg.pyramid import FuseRule
from sfseg.visualize import arms_figure, save_figure

DEFAULT_METRICS = ("mIoU", "mIoU_finest")
# The fuse's headroom columns (docs/fuse.md): metric, header. mIoU_fuse_<rule>: that rule on the same
# pyramids; a column is shown when some job has its metric.
HEADROOM_COLUMNS = (
    ("mIoU", "fused"),
    ("mIoU_fuse_hard", "hard"),
    ("mIoU_fuse_soft", "soft"),
    ("mIoU_fuse_hard_bilinear", "hard, bilinear Up"),
    ("mIoU_fuse_soft_bilinear", "soft, bilinear Up"),
    ("mIoU_fuse_learned", "learned"),
    ("mIoU_level1", "level 1 alone"),
    ("mIoU_best_level", "best single level"),
    ("mIoU_oracle", "oracle"),
)
MISSED_COLUMNS = (
    ("missed_share_mixed", "missed, mixed cells"),
    ("missed_share_pure", "missed, one-class cells"),
)


def job_order(job: str | Path) -> list[Any]:
    """Hydra numbers a sweep's jobs 0, 1, ..., 10: order them by number, not as text (10 before 2)."""
    return [int(chunk) if chunk.isdigit() else chunk for chunk in re.split(r"(\d+)", str(job))]


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per finished job, in job-number order: its overrides (key -> value), its metrics and
    its config."""
    runs = []
    for metrics_file in sorted(Path(sweep_dir).glob("**/metrics.json"), key=job_order):
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


def focus_metric(metric: str, name: str) -> str:
    """The name of `metric` restricted to the classes of focus group `name`: mIoU -> mIoU[name]."""
    return f"{metric}[{name}]"


def add_focus_metrics(runs: Sequence[dict[str, Any]], groups: Mapping[str, Sequence[str]]) -> None:
    """Add `mIoU[name]` and `mIoU_finest[name]` for each focus group to each run's metrics: the mean IoU
    over the group's classes only, of the fused output and of the finest level, from the job's
    val_counts.pt (read once per job). Where the counts have them, the same for the headroom
    (`mIoU_level1`, `mIoU_best_level`, `mIoU_oracle`, `mIoU_fuse_<rule>`)."""
    for run in runs:
        class_names = list(run["metrics"]["per_class_iou"])
        missing = [cls for classes in groups.values() for cls in classes if cls not in class_names]
        if missing:
            raise ValueError(f"focus classes {missing} are not classes of job {run['job']}: {class_names}")
        ious = class_ious(load_counts(run["job"]), run["metrics"])
        for name, classes in groups.items():
            picked = [class_names.index(cls) for cls in classes]
            for metric, iou in ious.items():
                run["metrics"][focus_metric(metric, name)] = float(torch.nanmean(iou[picked]))


def class_ious(counts: Mapping[str, torch.Tensor], metrics: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Per-class IoU [C] behind each mIoU metric a job's counts hold: mIoU (fused), mIoU_finest, and,
    from counts with the fuse's headroom, mIoU_level1, mIoU_best_level (the level best over all
    classes), mIoU_oracle and mIoU_fuse_<rule> (the rules in the order of the job's metrics)."""
    iou = class_iou(counts["confmat"])  # rows: fused, level 1 .. level L
    result = {"mIoU": iou[0], "mIoU_finest": iou[-1]}
    if "oracle" not in counts:
        return result
    rules = [key.removeprefix("mIoU_fuse_") for key in metrics if key.startswith("mIoU_fuse_")]
    result.update(
        {
            "mIoU_level1": iou[1],
            "mIoU_best_level": iou[int(metrics["best_level"])],
            "mIoU_oracle": class_iou(counts["oracle"]),
            **{
                f"mIoU_fuse_{rule}": row
                for rule, row in zip(rules, class_iou(counts["rule_confmat"]), strict=True)
            },
        }
    )
    return result


def load_counts(job: str | Path) -> dict[str, torch.Tensor]:
    """The final validation's counts that train() saves (PyramidMetrics' states)."""
    path = Path(job) / "val_counts.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the job did not finish its final validation")
    return torch.load(path, map_location="cpu", weights_only=True)


def focus_layout(layout: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The same table with every cell's metric restricted to focus group `name`."""

    def restrict(entry: Mapping[str, Any]) -> dict[str, Any]:
        return (
            {**entry, "metric": focus_metric(entry["metric"], name)} if entry.get("metric") else dict(entry)
        )

    title = layout.get("title")
    return {
        **layout,
        "title": f"{title}, {name} classes only" if title else f"{name} classes only",
        "metric": focus_metric(layout.get("metric", "mIoU"), name),
        "rows": [restrict(row) for row in layout_rows(layout)],
        "columns": [restrict(column) for column in layout["columns"]],
    }


def write_report(
    sweep_dir: str | Path,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    focus: tuple[str, Sequence[str]] | None = None,
    columns: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> tuple[Path, Path, str]:
    """Write `report.md` and `report.csv` into the sweep folder; return their paths and the table.

    The paper's layout when the jobs' experiment has a `report` section and `by` is not given (CSV:
    one line per cell); otherwise one row per combination of the `by` overrides. `focus` (a name and
    class names) adds the mIoU over those classes: a second table in the layout, more columns otherwise.
    `columns` keeps only the layout's columns of those names (e.g. the paper's four of Table 6);
    `notes` (markdown lines) follow the tables."""
    runs = collect_runs(sweep_dir)
    if focus:
        add_focus_metrics(runs, dict([focus]))
    layout = report_layout(runs) if by is None else None
    if layout and columns is not None:
        unknown = sorted(set(columns) - {column["name"] for column in layout["columns"]})
        if unknown:
            raise ValueError(
                f"columns {unknown} are not columns of the report layout {layout.get('title')!r}"
            )
        layout = {**layout, "columns": [column for column in layout["columns"] if column["name"] in columns]}
    if layout:
        layouts = [layout, focus_layout(layout, focus[0])] if focus else [layout]
        rows, parts = [], []
        for table in layouts:
            cells = layout_cells(runs, table)
            unmatched = sum(
                not any(
                    selects(row, run) and selects(column, run)
                    for row in layout_rows(table)
                    for column in table["columns"]
                )
                for run in runs
            )
            parts.append(layout_markdown(cells, table, unmatched, len(unfinished_jobs(sweep_dir))))
            rows += cells
        markdown = "\n".join(parts)
    else:
        if focus:
            metrics = [*metrics, *(focus_metric(metric, focus[0]) for metric in metrics)]
        rows = summarize(runs, by, metrics)
        markdown = to_markdown(rows, metrics)
    if notes:
        markdown += "\n" + "\n".join(notes) + "\n"
    md_path, csv_path = Path(sweep_dir) / "report.md", Path(sweep_dir) / "report.csv"
    md_path.write_text(markdown)
    write_csv(csv_path, rows)
    return md_path, csv_path, markdown


def job_seconds(job: str | Path) -> float:
    """Wall-clock seconds of one finished job: from Hydra writing its `.hydra/overrides.yaml` (the job's
    start) to train() writing its metrics.json (after the final validation)."""
    job = Path(job)
    return (job / "metrics.json").stat().st_mtime - (job / ".hydra" / "overrides.yaml").stat().st_mtime


def jobs_markdown(runs: Sequence[dict[str, Any]], focus_name: str | None = None) -> list[str]:
    """One row per job: mIoU (%) of the fused output, of level 1 alone and of the finest level alone
    (and the fused mIoU over focus group `focus_name`, from `add_focus_metrics`), its steps and its
    wall-clock minutes (`job_seconds`)."""
    header = ["job", "seed", "fused"]
    header += [f"fused, {focus_name}"] if focus_name else []
    header += ["level 1 alone", "finest alone", "steps", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for run in sorted(runs, key=lambda run: job_order(run["job"])):
        metrics = run["metrics"]
        values = [metrics["mIoU"]]
        values += [metrics[focus_metric("mIoU", focus_name)]] if focus_name else []
        values += [metrics.get("mIoU_level1", metrics["mIoU"]), metrics["mIoU_finest"]]
        texts = [format_percent(100 * value) for value in values]
        seed = config_value(run["config"], "seed")
        texts += [str(metrics.get("step", "-")), f"{job_seconds(run['job']) / 60:.1f}"]
        lines.append(f"| {Path(run['job']).name} | {seed} | " + " | ".join(texts) + " |")
    return lines


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_percent(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN (no pixels) as "-"


def table9_markdown(job: str | Path) -> str:
    """Table 9 of one pyramid job in the paper's layout (rows: the level l' whose prediction is scored;
    columns: the level l the fused map took the pixels from; finest first), with the share of pixels and
    of finest cells each level takes."""
    counts = load_counts(job)
    table = 100 * specialization_miou(counts["specialization"])  # [predicting, assigned], 0 = level 1
    levels = table.shape[0]
    pixels = counts["specialization"][:, 0].sum(dim=(-2, -1)).double()
    cells = counts["cells"].double()
    order = range(levels - 1, -1, -1)
    lines = [
        "| l' \\ l | " + " | ".join(str(level + 1) for level in order) + " |",
        "|" + "---|" * (levels + 1),
    ]
    for predicting in order:
        texts = [format_percent(float(table[predicting, assigned])) for assigned in order]
        lines.append(f"| {predicting + 1} | " + " | ".join(texts) + " |")
    for name, amounts in (("pixels taken (%)", pixels), ("finest cells taken (%)", cells)):
        shares = 100 * amounts / amounts.sum().clamp(min=1)
        lines.append(f"| {name} | " + " | ".join(f"{float(shares[level]):.1f}" for level in order) + " |")
    return "\n".join(lines) + "\n"


def table9_of_first_job(runs: Sequence[dict[str, Any]], levels_of: Mapping[str, int], top: int) -> list[str]:
    """Markdown lines: Table 9 and the shares of the first job (by job number) with L = `top`; none for
    top = 1."""
    if top == 1:
        return []
    shown = min((run for run in runs if levels_of[run["job"]] == top), key=lambda run: job_order(run["job"]))
    return [
        "",
        f"### Table 9 of one L={top} job ({Path(shown['job']).name}): mIoU (%) of level l' on the "
        "pixels the fused map takes from level l",
        "",
        table9_markdown(shown["job"]).rstrip(),
    ]


def write_mechanism_report(
    sweep_dir: str | Path, groups: Mapping[str, Sequence[str]], notes: Sequence[str] = ()
) -> tuple[Path, Path, str]:
    """Write the report of `python -m sfseg.ablation --preset mechanism` (report.md, and report.csv with
    one line per L); return their paths and the markdown.

    report.md: fused and finest-only mIoU per L, overall and over each class group (mean ± spread over
    seeds), `notes` (markdown lines), per-class IoU, Table 9 and the share of cells of one job of the
    largest L, and the goals of the controlled experiment checked (L=1 against the largest L)."""
    runs = collect_runs(sweep_dir)
    add_focus_metrics(runs, groups)
    metrics = [*DEFAULT_METRICS, *(focus_metric(m, name) for name in groups for m in DEFAULT_METRICS)]
    rows = sorted(summarize(runs, ["model.levels"], metrics), key=lambda row: int(row["model.levels"]))
    kinds = {"mIoU": "fused", "mIoU_finest": "finest only"}
    header = ["L", "seeds"]
    header += [f"all classes: {kinds[m]}" for m in DEFAULT_METRICS]
    header += [f"{name}: {kinds[m]}" for name in groups for m in DEFAULT_METRICS]
    lines = [
        "### Single output (L=1) vs specialize & fuse: mIoU (%), model/context=none",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        texts = [f"{row[f'{m}_mean']:.2f} ± {row[f'{m}_std']:.2f}" for m in metrics]
        lines.append(f"| {row['model.levels']} | {row['seeds']} | " + " | ".join(texts) + " |")
    members = "; ".join(f"{name}: {', '.join(classes)}" for name, classes in groups.items())
    lines += [
        "",
        "Mean ± spread (sample standard deviation) over seeds. Finest only: the finest level's own "
        f"prediction. A group's mIoU is over its classes ({members}).",
    ]
    if notes:
        lines += ["", *notes]

    levels_of = {run["job"]: int(run["config"]["model"]["levels"]) for run in runs}  # the resolved config
    lines += ["", "### Per-class IoU of the fused output (%, mean over seeds)", ""]
    lines += per_class_markdown(runs, levels_of)
    top = max(levels_of.values())
    lines += table9_of_first_job(runs, levels_of, top)
    lines += ["", *headroom_markdown(runs, groups)]
    lines += ["### Goals", "", *mechanism_goals(runs, levels_of, top)]
    markdown = "\n".join(lines) + "\n"
    md_path, csv_path = Path(sweep_dir) / "report.md", Path(sweep_dir) / "report.csv"
    md_path.write_text(markdown)
    write_csv(csv_path, rows)
    return md_path, csv_path, markdown


def fuse_rule_of(run: Mapping[str, Any]) -> str:
    """The job's fuse rule (`FuseRule.label` of model.fuse); `hard` for jobs from before it was a setting."""
    return FuseRule(
        config_value(run["config"], "model.fuse.name") or "hard",
        config_value(run["config"], "model.fuse.upsample"),
    ).label


def headroom_rows(runs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """The pyramid jobs (L > 1) grouped by L and fuse rule (resolved config), with `<metric>_mean` and
    `<metric>_std` (percent, over seeds) per metric and the best single level of each job."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in runs:
        levels = int(run["config"]["model"]["levels"])
        if levels > 1:
            groups.setdefault((levels, fuse_rule_of(run)), []).append(run)
    rows = []
    for (levels, rule), members in sorted(groups.items()):
        row: dict[str, Any] = {"model.levels": levels, "model.fuse.name": rule, "seeds": len(members)}
        row["best_levels"] = ",".join(str(run["metrics"].get("best_level", "-")) for run in members)
        for metric in metrics:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_and_spread(members, metric)
        rows.append(row)
    return rows


def headroom_metrics(runs: Sequence[dict[str, Any]], group: str | None = None) -> list[tuple[str, str]]:
    """The headroom columns (metric, header) some job has, over all classes or one focus group's."""
    columns = [
        (metric if group is None else focus_metric(metric, group), header)
        for metric, header in HEADROOM_COLUMNS
    ]
    if group is None:
        columns += list(MISSED_COLUMNS)
    return [
        (metric, header)
        for metric, header in columns
        if any(run["metrics"].get(metric) is not None for run in runs)
    ]


def headroom_markdown(runs: Sequence[dict[str, Any]], groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The fuse's headroom of the pyramid jobs (L > 1) as markdown lines, one table over all classes and
    one per focus group (their metrics added by `add_focus_metrics`): per L and fuse rule, mean ± spread
    over seeds of the fused mIoU, every compared rule on the same pyramids, level 1 alone, the best single
    level, the oracle fuse, and the pixels the fuse missed. Nothing without pyramid jobs."""
    if not any(int(run["config"]["model"]["levels"]) > 1 for run in runs):
        return []
    lines = []
    for scope, group in [("all classes", None), *((f"{name} classes", name) for name in groups)]:
        columns = headroom_metrics(runs, group)
        rows = headroom_rows(runs, [metric for metric, _ in columns])
        header = ["L", "fuse", "seeds", *(name for _, name in columns)]
        lines += [
            f"### The fuse's headroom, {scope}: mIoU (%) on the same pyramids",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in rows:
            texts = [f"{row[f'{metric}_mean']:.2f} ± {row[f'{metric}_std']:.2f}" for metric, _ in columns]
            lines.append(
                f"| {row['model.levels']} | {row['model.fuse.name']} | {row['seeds']} | "
                + " | ".join(texts)
                + " |"
            )
        lines.append("")
    best = "; ".join(
        f"L={row['model.levels']} {row['model.fuse.name']}: {row['best_levels']}"
        for row in headroom_rows(runs, [])
    )
    lines += [
        "Mean ± spread over seeds. fused: the job's own fuse rule (model.fuse); hard, soft, learned: that "
        "rule applied to the same pyramids (hard and soft with Eq. 2's nearest Up() unless marked bilinear; "
        "learned: only jobs that trained its gate, with its own Up()); level 1 alone: "
        "level 1's prediction, upsampled; best single level: each job's best level by mIoU over all classes "
        f"(per job: {best}); oracle: right wherever some level's own prediction is (docs/fuse.md). missed: "
        "the share of all valid pixels that the fused output gets wrong while some level gets them right, "
        "in level-1 cells that hold several classes / one class in the ground truth.",
        "",
    ]
    return lines


def fuse_goals(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Each rule on the pyramid jobs against level 1 alone and against hard (Eq. 2): the difference of the
    means over seeds, the per-job differences (same pyramids), and beats / matches / loses to, beyond
    the larger of the two seed spreads (sample standard deviations)."""
    pyramids = [run for run in runs if int(run["config"]["model"]["levels"]) > 1]
    rules = [
        metric.removeprefix("mIoU_fuse_")
        for metric, _ in HEADROOM_COLUMNS
        if metric.startswith("mIoU_fuse_")
        and pyramids
        and all(run["metrics"].get(metric) is not None for run in pyramids)
    ]
    if not rules:
        return ["Needs pyramid jobs (L > 1) that score the fuse rules (mIoU_fuse_<rule> in metrics.json)."]
    lines = []
    for rule in rules:
        for reference, name in (("mIoU_level1", "level 1 alone"), ("mIoU_fuse_hard", "hard")):
            if reference == f"mIoU_fuse_{rule}":
                continue
            rule_mean, rule_std = mean_and_spread(pyramids, f"mIoU_fuse_{rule}")
            reference_mean, reference_std = mean_and_spread(pyramids, reference)
            difference, spread = rule_mean - reference_mean, max(rule_std, reference_std)
            per_job = [
                100 * (run["metrics"][f"mIoU_fuse_{rule}"] - run["metrics"][reference]) for run in pyramids
            ]
            verdict = "beats" if difference > spread else "loses to" if difference < -spread else "matches"
            lines.append(
                f"- {rule} - {name}: {difference:+.2f} mIoU (per job: {', '.join(f'{d:+.2f}' for d in per_job)}; "
                f"larger seed spread {spread:.2f}, {len(pyramids)} job(s)): **{rule} {verdict} {name}**"
            )
    if len(pyramids) == 1:
        lines.append("One job: no seed spread, so a direction, not a result.")
    return lines


def write_fuse_report(
    sweep_dir: str | Path, groups: Mapping[str, Sequence[str]] | None = None, notes: Sequence[str] = ()
) -> tuple[Path, Path, str]:
    """Write the report of `python -m sfseg.ablation --preset mechanism_fuse` / `fuse_default` (report.md,
    and report.csv with one line per L and fuse rule); return their paths and the markdown.

    report.md: `notes`, the fuse's headroom over all classes and over each class group (`headroom_markdown`)
    and each rule checked against level 1 alone and against hard (`fuse_goals`)."""
    runs = collect_runs(sweep_dir)
    groups = dict(groups or {})
    add_focus_metrics(runs, groups)
    lines = ["## Fuse rules on the same pyramids", ""]
    if notes:
        lines += [*notes, ""]
    lines += headroom_markdown(runs, groups)
    lines += ["### Each rule against level 1 alone and against hard", "", *fuse_goals(runs)]
    markdown = "\n".join(lines) + "\n"
    metrics = [metric for group in (None, *groups) for metric, _ in headroom_metrics(runs, group)]
    md_path, csv_path = Path(sweep_dir) / "report.md", Path(sweep_dir) / "report.csv"
    md_path.write_text(markdown)
    write_csv(csv_path, headroom_rows(runs, metrics))
    return md_path, csv_path, markdown


def per_class_markdown(
    runs: Sequence[dict[str, Any]],
    levels_of: Mapping[str, int],
    spread: bool = False,
    apart: Sequence[str] = (),
) -> list[str]:
    """One row per class, one column per L: the fused output's IoU (%), mean over the seeds of that L
    (`spread`: ± the sample standard deviation). The classes of `apart` come first, in bold, and the
    others after a separator row."""
    levels = sorted(set(levels_of.values()))
    classes = list(runs[0]["metrics"]["per_class_iou"])
    others = [cls for cls in classes if cls not in apart]
    lines = [
        "| class | " + " | ".join(f"L={level}" for level in levels) + " |",
        "|" + "---|" * (len(levels) + 1),
    ]
    for cls in [*(cls for cls in classes if cls in apart), *others]:
        if apart and others and cls == others[0]:
            lines.append("| *other classes* |" + " |" * len(levels))
        texts = []
        for level in levels:
            values = [
                100 * run["metrics"]["per_class_iou"][cls]
                for run in runs
                if levels_of[run["job"]] == level and run["metrics"]["per_class_iou"][cls] is not None
            ]
            if not values:
                texts.append("-")
                continue
            deviation = statistics.stdev(values) if len(values) > 1 else 0.0
            texts.append(f"{statistics.fmean(values):.2f}" + (f" ± {deviation:.2f}" if spread else ""))
        lines.append(f"| {f'**{cls}**' if cls in apart else cls} | " + " | ".join(texts) + " |")
    return lines


def mechanism_goals(runs: Sequence[dict[str, Any]], levels_of: Mapping[str, int], top: int) -> list[str]:
    """The three goals of the controlled experiment, each with its numbers and met / not met."""

    def verdict(met: bool) -> str:
        return "**met**" if met else "**not met**"

    single = [run for run in runs if levels_of[run["job"]] == 1]
    pyramids = [run for run in runs if levels_of[run["job"]] == top]
    if not single or top == 1:
        return ["Needs jobs with L=1 and with L>1."]
    single_mean, single_std = mean_and_spread(single, "mIoU")
    pyramid_mean, pyramid_std = mean_and_spread(pyramids, "mIoU")
    gain, spread = pyramid_mean - single_mean, max(single_std, pyramid_std)
    lines = [
        f"1. L={top} fused - L=1 = {gain:+.2f} mIoU; 3 x the larger seed spread = {3 * spread:.2f} "
        f"({len(single)} and {len(pyramids)} seeds): {verdict(gain > 3 * spread and min(len(single), len(pyramids)) > 1)}"
    ]
    diagonal = []
    for run in pyramids:
        table = specialization_miou(load_counts(run["job"])["specialization"])
        diagonal.append((100 * float(table[0, 0]), 100 * float(table[-1, 0])))
    wins = sum(coarse > finest for coarse, finest in diagonal)
    first_coarse, first_finest = diagonal[0]
    lines.append(
        f"2. Table 9, coarsest column: on the pixels taken from level 1, level 1 scores {format_percent(first_coarse)} "
        f"and the finest level {format_percent(first_finest)} (the job shown); level 1 is ahead in {wins} of "
        f"{len(diagonal)} L={top} jobs: {verdict(wins == len(diagonal))}"
    )
    coarse_shares = [
        100 * sum(run["metrics"][f"share_level{level}"] for level in range(1, top)) for run in pyramids
    ]
    mean_share = statistics.fmean(coarse_shares)
    lines.append(
        f"3. Share of finest cells taken from the coarse levels 1..{top - 1}: {mean_share:.1f} % "
        f"(per job: {', '.join(f'{share:.1f}' for share in coarse_shares)}): {verdict(min(coarse_shares) > 50)}"
    )
    return lines


STUDY_RESULTS = "optimization_results.yaml"  # what Hydra's Optuna sweeper writes into the sweep folder


def study_parameters(job: str | Path) -> list[str]:
    """The keys an Optuna study samples (hydra.sweeper.params of the trial's .hydra/hydra.yaml)."""
    hydra = yaml.safe_load((Path(job) / ".hydra" / "hydra.yaml").read_text())["hydra"]
    return list((hydra.get("sweeper") or {}).get("params") or {})


def write_study_report(sweep_dir: str | Path) -> tuple[Path, Path, str]:
    """The report of an Optuna study (`hparams_search=...`): one row per finished trial, best first, with
    its sampled parameters, fused / finest / level-1 mIoU, steps and minutes, then the search space and
    the sweeper's best parameters. Writes report.md and report.csv into the sweep folder."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    keys = study_parameters(runs[0]["job"])
    space = yaml.safe_load((Path(runs[0]["job"]) / ".hydra" / "hydra.yaml").read_text())["hydra"]["sweeper"]
    rows = []
    for run in sorted(runs, key=lambda run: -run["metrics"]["mIoU"]):
        metrics = run["metrics"]
        row = {"trial": Path(run["job"]).name, **{key: run["overrides"].get(key, "") for key in keys}}
        row.update(
            {
                "mIoU": metrics["mIoU"],
                "mIoU_finest": metrics["mIoU_finest"],
                "mIoU_level1": metrics.get("mIoU_level1", metrics["mIoU"]),
                "steps": metrics.get("step"),
                "minutes": job_seconds(run["job"]) / 60,
            }
        )
        rows.append(row)
    header = ["trial", *keys, "fused", "finest only", "level 1", "steps", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        scores = [format_percent(100 * row[key]) for key in ("mIoU", "mIoU_finest", "mIoU_level1")]
        texts = [row["trial"], *(short_number(row[key]) for key in keys), *scores]
        lines.append("| " + " | ".join([*texts, str(row["steps"]), f"{row['minutes']:.1f}"]) + " |")
    lines += ["", "mIoU (%) of each trial's final validation. The search space (Hydra's Optuna sweeper):", ""]
    lines += [f"- `{key}`: `{value}`" for key, value in space["params"].items()]
    sampler = space.get("sampler") or {}
    lines += [
        "",
        f"{len(runs)} trials finished of {space.get('n_trials')}; sampler {sampler.get('_target_')} "
        f"(seed {sampler.get('seed')}, {sampler.get('n_startup_trials')} random trials first).",
    ]
    unfinished = unfinished_jobs(sweep_dir)
    if unfinished:
        lines.append(f"{len(unfinished)} trial(s) have no metrics.json (failed or still running).")
    results_file = sweep_dir / STUDY_RESULTS
    if results_file.is_file():
        results = yaml.safe_load(results_file.read_text())
        best = ", ".join(f"`{key}={short_number(value)}`" for key, value in results["best_params"].items())
        lines += [
            "",
            f"Best (the sweeper's {STUDY_RESULTS}): {best}, fused mIoU {100 * results['best_value']:.2f} %.",
        ]
    markdown = "\n".join(lines) + "\n"
    md_path, csv_path = sweep_dir / "report.md", sweep_dir / "report.csv"
    md_path.write_text(markdown)
    write_csv(csv_path, rows)
    return md_path, csv_path, markdown


def short_number(value: Any) -> str:
    """A sampled value as text, floats to 4 significant digits ("0.002289851" -> "0.00229")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if float(number).is_integer() and "." not in str(value) else f"{number:.4g}"


LEVELS_METRICS = (
    ("mIoU", "fused"),
    ("mIoU_finest", "finest only"),
    ("mIoU_level1", "level 1 alone"),
    ("mIoU_oracle", "oracle fuse"),
)


def validation_curve(job: str | Path) -> tuple[list[int], list[float]]:
    """A job's val mIoU (%) at each validation during training (its csv/metrics.csv), by step."""
    path = Path(job) / "csv" / "metrics.csv"
    if not path.is_file():
        return [], []
    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/mIoU")]
    return [int(row["step"]) for row in rows], [100 * float(row["val/mIoU"]) for row in rows]


def write_levels_report(
    sweep_dir: str | Path, small: tuple[str, Sequence[str]], title: str = ""
) -> tuple[Path, Path, str]:
    """The report of an L=1 vs L>1 sweep on real data (`python -m sfseg.ablation --preset camvid`):
    report.md, report.csv (one line per L) and report.png; returns their paths (md, csv) and the markdown.

    report.md: per L, mean ± spread over seeds of the fused, finest-only, level-1 and oracle-fuse mIoU,
    the fused mIoU over the `small` classes and over the others, and the minutes per job; per-class IoU
    (mean ± spread) with the small classes apart; Table 9 and the share of cells of one job of the
    largest L; each job's scores, steps and minutes. report.png: `arms_figure` (per-class IoU of each L
    with its spread; val mIoU over the steps)."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    name, small_classes = small
    classes = list(runs[0]["metrics"]["per_class_iou"])
    others = (f"other {len(classes) - len(small_classes)}", [c for c in classes if c not in small_classes])
    add_focus_metrics(runs, dict([small, others]))
    levels_of = {run["job"]: int(run["config"]["model"]["levels"]) for run in runs}
    columns = [*LEVELS_METRICS, (focus_metric("mIoU", name), f"fused, {name} classes")]
    columns.append((focus_metric("mIoU", others[0]), f"fused, {others[0]} classes"))
    rows, table = levels_table(runs, levels_of, columns)
    lines = [f"### {title or 'Single output (L=1) vs the pyramid'}: mIoU (%)", "", *table]
    lines += [
        "",
        "Mean ± spread (sample standard deviation) over seeds. Finest only: the finest level's own prediction "
        "(Table 8's auxiliary supervision); level 1 alone: the coarsest level's; oracle fuse: right wherever "
        f"some level is (docs/fuse.md). {name} classes: {', '.join(small_classes)}.",
        "",
        "### Per-class IoU of the fused output (%, mean ± spread over seeds)",
        "",
        *per_class_markdown(runs, levels_of, spread=True, apart=small_classes),
    ]
    top = max(levels_of.values())
    lines += table9_of_first_job(runs, levels_of, top)
    lines += [
        "",
        "### Each job: mIoU (%), steps and wall-clock minutes (start-up and validations included)",
        "",
    ]
    lines += jobs_markdown(runs)
    save_figure(levels_figure(runs, levels_of, small_classes, title), sweep_dir / "report.png")
    lines += ["", "![per-class IoU and validation curves](report.png)"]
    markdown = "\n".join(lines) + "\n"
    md_path, csv_path = sweep_dir / "report.md", sweep_dir / "report.csv"
    md_path.write_text(markdown)
    write_csv(csv_path, rows)
    return md_path, csv_path, markdown


def levels_table(
    runs: Sequence[dict[str, Any]], levels_of: Mapping[str, int], columns: Sequence[tuple[str, str]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per L, mean ± spread over seeds of each (metric, header) column and the mean minutes per job: the
    rows (`summarize`'s, with minutes_mean) and their markdown table."""
    metrics = [metric for metric, _ in columns]
    rows = sorted(summarize(runs, ["model.levels"], metrics), key=lambda row: int(row["model.levels"]))
    header = ["L", "seeds", *(label for _, label in columns), "minutes per job"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        jobs = [job for job, level in levels_of.items() if str(level) == row["model.levels"]]
        row["minutes_mean"] = statistics.fmean(job_seconds(job) / 60 for job in jobs)
        texts = [f"{row[f'{m}_mean']:.2f} ± {row[f'{m}_std']:.2f}" for m in metrics]
        texts.append(f"{row['minutes_mean']:.1f}")
        lines.append(f"| {row['model.levels']} | {row['seeds']} | " + " | ".join(texts) + " |")
    return rows, lines


def levels_figure(
    runs: Sequence[dict[str, Any]], levels_of: Mapping[str, int], small_classes: Sequence[str], title: str
) -> Any:
    """`arms_figure` of a levels sweep: one arm per L, its per-class IoU per seed and validation curves."""
    levels = sorted(set(levels_of.values()))
    arms = {f"L={level}": [run for run in runs if levels_of[run["job"]] == level] for level in levels}
    classes = list(runs[0]["metrics"]["per_class_iou"])

    def iou(run: dict[str, Any], cls: str) -> float:
        value = run["metrics"]["per_class_iou"][cls]
        return float("nan") if value is None else 100 * value

    per_class = {
        arm: {cls: [iou(run, cls) for run in members] for cls in classes} for arm, members in arms.items()
    }
    curves = {arm: [validation_curve(run["job"]) for run in members] for arm, members in arms.items()}
    return arms_figure(per_class, curves, small_classes, title)
