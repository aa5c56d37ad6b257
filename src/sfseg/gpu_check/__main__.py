"""Does sfseg work on this GPU node, and how fast? `python -m sfseg.gpu_check [--minutes 10] [--out gpu_check]`

Runs six stages, each in its own process under its own time limit, all within --minutes; a stage that
fails or runs out of time is reported and the others still run:
  environment  GPU, driver, CUDA, Python and the versions of the stack (and what is missing)
  smoke        every context module at L=1 and L=4: a bf16-autocast training step with finite loss and
               gradients; sparse == dense inference (level maps identical, argmax equal off near ties)
  table5       `sfseg.bench` rows fcn, ocr, ccnet, sf_c2f (dense and sparse), hrnet_w48 at 512x512, as
               ratios to FCN beside the paper's Table 5
  training     100 bf16 steps of hrnet_w48 at 512x512 on the embedded data via `sfseg.train`: images/s,
               peak memory, loss at the start and end, the data loader's share of the step time
  compile      `sfseg.bench --compile-check`: model.compile and model.channels_last against eager, a bf16
               training step and inference of hrnet_w48 at 512x512, the compilation apart
  mechanism    the controlled experiment, `sfseg.ablation --preset mechanism` (fewer seeds when short)
Writes <out>/report.md and <out>/report.json (after every stage), the stages' logs in <out>/logs/ and
their own outputs in <out>/<stage>/. Exits 0 when every stage passed, 1 otherwise.

Needs CUDA; `--device cpu --tiny` runs every stage at toy sizes on the CPU (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from sfseg.gpu_check.runner import all_passed, run_checks, stage_result
from sfseg.gpu_check.sizes import FULL, TINY


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sfseg.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the code path in a minute or two")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of all stages together")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for report.md/.json")
    # One stage in this process (how the parent starts each stage).
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stage-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes {args.minutes:g}: give a positive number of minutes")
    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        parser.error(
            f"no CUDA device is available here (torch {torch.__version__}, {built}): this check is for GPU "
            "nodes. `--device cpu --tiny` runs its stages at toy sizes on the CPU."
        )
    if args.device == "cpu" and not args.tiny:
        parser.error(
            "--device cpu runs only with --tiny: the full sizes (hrnet_w48 at 512x512) are for a GPU"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    sizes = TINY if args.tiny else FULL
    if args.stage:
        outcome = stage_result(args.stage, args.device, sizes, args.out, args.stage_seconds)
        args.stage_result.write_text(json.dumps(outcome, indent=2) + "\n")
        return 0
    command = shlex.join(["python", "-m", "sfseg.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    stage_command = [sys.executable, "-m", "sfseg.gpu_check", "--device", args.device, "--out", str(args.out)]
    stage_command += ["--tiny"] if args.tiny else []
    outcomes = run_checks(args.out, args.device, args.tiny, args.minutes, command, stage_command)
    print(f"written: {args.out / 'report.md'} and {args.out / 'report.json'}")
    return 0 if all_passed(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
