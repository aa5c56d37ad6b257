"""Benchmark harness (not a test): what the pyramid costs next to the plain single-output path.

    python -m sfseg.bench [--device cpu|cuda] [--out bench] [--quick] [--threads N] [--ckpt CKPT] [--profile]
                          [--variants fcn,sf_c2f,...] [--backbones convnext_tiny,vit_small_patch16_224,...]
                          [--compile-check] [--training [--training-config "OVERRIDES"]...]

Writes <out>/results.json and <out>/results.md with, measured side by side in one run:
  (a) build_targets + relabel(true_positive) against a clone() of the same label batch;
  (b) fuse against an argmax over the finest logits (what a single-output model does instead);
  (c) Table 5 in full: backbone + FCNHead (`fcn`, the reference of every ratio) against
      `ocr` / `ccnet`, the single-output "HRNet48 + OCR / + CCNet" rows (L=1, dense only), and the
      Specialize-and-Fuse heads at L=4 with context none / anl / anl_multi / c2f / ocr / ccnet
      (`sf_none` ... `sf_ccnet`): inference latency, peak memory and GMACs on the dense path and, for
      the sf_ rows, on the sparse path (sfseg.inference.image_logits) at forced shares of undecided
      finest cells and, with --ckpt, at the shares a trained checkpoint gives on its validation split;
      training step time (with OCR's auxiliary loss where the model has it) and peak memory;
      parameters. --variants picks rows (fcn is always measured);
  (d) with --profile, torch.profiler's top operators of FCN and of c2f sparse.
With --training, instead of (a)-(d), where the time of `sfseg.train` runs goes (each --training-config a
list of its overrides; none: the embedded default, `make train`), piece by piece (sfseg.bench.training).
With --backbones, instead of (a)-(d), the Backbones table: the S&F model (L=4, c2f) on each named
backbone (any model.backbone.name) and on the reference (hrnet_w48): parameters, GMACs of a dense
inference, and the training step time relative to the reference's.
With --compile-check, instead of (a)-(d), model.compile and model.channels_last against eager: each
setting's training step and dense and sparse inference relative to eager, its first call (which holds
the compilation) apart, and whether its output is eager's; on a CPU the embedded default's network at
its training size (float32), on CUDA hrnet_w48 at 512x512 (bf16 autocast), with --quick a toy network.
Times are medians over repeats after warm-up, with the variants interleaved (the order rotates
every round) so that drift of the machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sfseg.bench.backbones import parse_backbones
from sfseg.bench.harness import QUICK, BenchConfig
from sfseg.bench.memory import forked_peaks, parse_memory_jobs
from sfseg.bench.profiling import PROFILE_SHARE
from sfseg.bench.results import run, to_markdown, write_results
from sfseg.bench.variants import MODEL_VARIANTS, parse_variants


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sfseg.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json/.md")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's); 1 keeps timings steady on a shared box"
    )
    parser.add_argument(
        "--ckpt", type=Path, help="a trained checkpoint: add sparse rows at its validation split's shares"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"add torch.profiler tables (FCN, c2f sparse at {PROFILE_SHARE})",
    )
    parser.add_argument(
        "--variants",
        help=f"comma list of Table 5 rows to measure (default: all): {', '.join(MODEL_VARIANTS)}; "
        "fcn is always measured (the ratios are to it)",
    )
    parser.add_argument(
        "--backbones",
        help="comma list of model.backbone.name values (sfseg's or any timm model's): measure the Backbones "
        "table (S&F on each and on the reference, hrnet_w48; --quick: hrnet_w18_small) instead of Table 5",
    )
    parser.add_argument(
        "--frozen-memory",
        help="with --backbones: comma list of its rows whose training step's peak memory to measure, the "
        "encoder frozen and not (on CPU each in a fresh process)",
    )
    parser.add_argument(
        "--training",
        action="store_true",
        help="where the time of a sfseg.train run goes (the embedded default, or each --training-config)",
    )
    parser.add_argument(
        "--training-config",
        action="append",
        default=[],
        help='sfseg.train overrides of one measured run, space-separated (e.g. "data.batch_size=16"); repeat it',
    )
    parser.add_argument(
        "--compile-check",
        action="store_true",
        help="measure model.compile and model.channels_last against eager (training step, dense and sparse "
        "inference; CPU: the embedded default's network, CUDA: hrnet_w48 at 512x512 in bf16) instead of Table 5",
    )
    parser.add_argument("--memory-children", help=argparse.SUPPRESS)  # sfseg.bench.memory's own child
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.variants = parse_variants(args.variants)
        args.backbones = parse_backbones(args.backbones) if args.backbones is not None else None
        args.frozen_memory = parse_backbones(args.frozen_memory) if args.frozen_memory is not None else ()
    except ValueError as error:
        parser.error(str(error))
    if sum(map(bool, (args.compile_check, args.backbones, args.training))) > 1:
        parser.error(
            "--compile-check, --backbones and --training each measure their own table instead of Table 5: give one"
        )
    if args.memory_children:
        return args
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.ckpt is not None and not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such checkpoint file")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    if args.memory_children:
        print(json.dumps(forked_peaks(parse_memory_jobs(args.memory_children), cfg)))
        return None
    device = torch.device(args.device)
    training = [config.split() for config in args.training_config] or [[]] if args.training else None
    results = run(
        cfg,
        device,
        args.quick,
        args.ckpt,
        args.profile,
        args.variants,
        args.backbones,
        args.frozen_memory,
        args.compile_check,
        training,
    )
    write_results(args.out, results)
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
