"""Check a dataset up front: every image/label pair of the train and val splits, all problems at once.

    python -m sfseg.data.validate data=ade20k data.root=/data/ADEChallengeData2016 [--split val] [--workers 8]

Takes the same Hydra overrides as `python -m sfseg.train` (so it checks exactly what a run would
read). Reports empty splits, unpaired files, undecodable images or labels, image/label size mismatches
and label values (or colours) no class stands for, with their pixel counts, one line per file; exits 1
if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from tqdm import tqdm

from sfseg import CONFIG_DIR
from sfseg.data.datasets import LayoutError
from sfseg.data.real import FileDataModule


def find_problems(
    datamodule: FileDataModule, parts: list[str], workers: int
) -> tuple[list[str], dict[str, int]]:
    """Every problem of the given parts ("train", "val") and the number of pairs checked per part."""
    scans = datamodule.scan(parts)
    datasets = datamodule.build_datasets(scans)
    problems: list[str] = []
    counts: dict[str, int] = {}
    for part in parts:
        problems += scans[part].problems
        if not scans[part].samples:
            problems.append(datamodule.empty_split(part))
        dataset = datasets[part]
        counts[part] = len(dataset)
        # Decoding is mostly C code that releases the GIL: threads give a near-linear speed-up.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(dataset.check, range(len(dataset)))
            problems += [
                problem for problem in tqdm(results, total=len(dataset), desc=part, unit="pair") if problem
            ]
    return problems, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfseg.data.validate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=ade20k data.root=/path")
    parser.add_argument(
        "--split", choices=["train", "val", "both"], default="both", help="which part to check"
    )
    parser.add_argument("--workers", type=int, default=4, help="threads decoding files")
    args = parser.parse_args(argv)

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as error:  # a data config that cannot work, e.g. a bad data.classes
        print(f"error: {error.__cause__ or error}", file=sys.stderr)
        return 1
    if not isinstance(datamodule, FileDataModule):
        print(
            f"error: data={cfg.data._target_} is not a dataset on disk; nothing to validate", file=sys.stderr
        )
        return 1
    parts = ["train", "val"] if args.split == "both" else [args.split]
    try:
        problems, counts = find_problems(datamodule, parts, args.workers)
    except LayoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    checked = ", ".join(f"{part} {count} pairs" for part, count in counts.items())
    if problems:
        print(
            f"{len(problems)} problem(s) in {datamodule.layout.name} at {datamodule.root} ({checked}):",
            file=sys.stderr,
        )
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"ok: {datamodule.layout.name} at {datamodule.root}: {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
