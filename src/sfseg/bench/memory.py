"""Peak memory of one inference or training step: on CPU the peak RSS growth over the first call of a
freshly built model in a fresh process, on CUDA torch.cuda.max_memory_allocated."""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sfseg.bench.harness import BenchConfig, bench_images
from sfseg.bench.variants import Case, build_variant, inference_call, training_call


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**10  # reported in kB
    raise KeyError(field)


def cpu_peak_memory(case: Case, cfg: BenchConfig, train: bool, frozen: bool = False) -> float:
    """Peak-RSS growth (MB) over the first inference (or training step) of a freshly built model (with
    its encoder frozen: `frozen`), in its own process.

    Linux: the peak (VmHWM, what ru_maxrss reports) is reset to the current RSS right before the
    call, because a process started by a big parent inherits the parent's ru_maxrss through
    exec and would then show no growth. Elsewhere: the ru_maxrss difference.
    """
    device = torch.device("cpu")
    model = build_variant(case.variant, cfg, frozen).train(train)
    if train:
        call = training_call(model, case.variant, cfg, device)
    else:
        infer, images = inference_call(model, case, cfg, device), bench_images(cfg, device)

        def call() -> None:
            with torch.inference_mode():
                infer(images)

    gc.collect()
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
        before = _proc_status_mb("VmRSS")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
    call()
    if clear_refs.exists():
        return _proc_status_mb("VmHWM") - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before


def cpu_memory_in_subprocess(
    case: Case, quick: bool, train: bool = False, backbone: str | None = None, frozen: bool = False
) -> float:
    """`cpu_peak_memory` in a fresh `python -m sfseg.bench` process (on `backbone`: another than the
    configuration's)."""
    child_args = [
        "--memory-child",
        case.variant,
        f"--threads={torch.get_num_threads()}",
        *(["--quick"] if quick else []),
        *(["--child-train"] if train else []),
        *([f"--child-backbone={backbone}"] if backbone else []),
        *(["--child-frozen"] if frozen else []),
        *([f"--child-shares={','.join(map(str, case.level_shares))}"] if case.level_shares else []),
    ]
    command = [sys.executable, "-m", "sfseg.bench", *child_args]
    # Large blocks are mmapped and unmapped on free, so memory freed while building the model does
    # not sit resident and get reused by the forward unseen.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def cuda_peak_memory(call: Callable[[], object], device: torch.device) -> float:
    """torch.cuda.max_memory_allocated during `call`, minus what was allocated before it (MB)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_cpu_memory(
    cases: list[Case], variants: tuple[str, ...], quick: bool
) -> dict[str, dict[str, float]]:
    """Peak RSS growth of each case's inference and each variant's training step, in fresh processes:
    two inference children at once (one per core here), training children one at a time (GBs each)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = pool.map(lambda case: cpu_memory_in_subprocess(case, quick), cases)
        memory = dict(zip((case.name for case in cases), measured, strict=True))
    train_memory = {
        variant: cpu_memory_in_subprocess(Case(variant), quick, train=True) for variant in variants
    }
    return {"memory": memory, "train_memory": train_memory}
