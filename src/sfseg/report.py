"""Report entry point: `python -m sfseg.report <sweep dir> [--by KEY ...] [--metrics NAME ...]
[--focus NAME CLASS ...]`.

Writes `report.md` and `report.csv` into the sweep folder: the paper's table when the sweep's experiment
has a `report` section (experiment=table6, table7, table8, levels), else one row per combination of the
varied overrides; mean ± spread over seeds (see `sfseg.sweeps`). `--focus` adds the mIoU over a group
of classes only. An Optuna study's folder (`hparams_search=...`, with the sweeper's optimization_results.yaml,
or `--study` while it runs) gets one row per trial instead: its sampled parameters and scores, best first.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from sfseg.sweeps import DEFAULT_METRICS, STUDY_RESULTS, write_report, write_study_report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--by",
        nargs="*",
        help="override keys that make a row, instead of the experiment's layout (default: all varied but seed)",
    )
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS))
    parser.add_argument(
        "--focus",
        nargs="+",
        metavar=("NAME", "CLASS"),
        help="also score these classes only, e.g. --focus look-alike sky water wall sand",
    )
    parser.add_argument(
        "--study",
        action="store_true",
        help=f"an Optuna study (hparams_search) still running; a finished one (with its {STUDY_RESULTS}) "
        "is reported as a study anyway",
    )
    args = parser.parse_args(argv)
    if args.focus is not None and len(args.focus) < 2:
        parser.error("--focus takes a name and at least one class name")
    focus = (args.focus[0], args.focus[1:]) if args.focus else None
    study = (args.sweep_dir / STUDY_RESULTS).is_file() or args.study
    try:
        if study:
            md_path, csv_path, markdown = write_study_report(args.sweep_dir)
        else:
            md_path, csv_path, markdown = write_report(args.sweep_dir, args.by, args.metrics, focus)
    except FileNotFoundError as error:  # no finished job yet
        parser.error(str(error))
    print(markdown)
    print(f"written: {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
