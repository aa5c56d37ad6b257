"""The paper's central claim on the embedded default (`make ablation-quick`).

Trains, at the same step budget and two seeds each, the single output (L=1) and the pyramidal
output (L=4, true_positive relabel), both with the coarse-to-fine context module, as one Hydra
multirun, then writes the table of fused and finest-only mIoU (mean ± spread over seeds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from sfseg.sweeps import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (the same for all)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--out", type=Path, default=None, help="sweep folder (default multirun/ablation_quick/<time>)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args()
    out = args.out or Path("multirun/ablation_quick") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    command = [
        sys.executable,
        "-m",
        "sfseg.train",
        "-m",
        "task_name=ablation_quick",
        "model/context=c2f",
        "model/relabel=true_positive",
        "model.levels=1,4",
        f"seed={args.seeds}",
        f"trainer.max_steps={args.steps}",
        f"hydra.sweep.dir={out}",
        *args.overrides,
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    md_path, csv_path, markdown = write_report(out, by=["model.levels"])
    print(markdown)
    print(f"written: {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
