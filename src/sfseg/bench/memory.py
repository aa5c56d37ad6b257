"""Peak memory of one inference or training step: on CPU the peak RSS growth over the first call of a
freshly built model in a fresh process, on CUDA torch.cuda.max_memory_allocated.

The CPU measurements run in one child process of the benchmark (`python -m sfseg.bench --memory-children
...`), which imports the benchmark once and forks a process per measurement: each starts with nothing
built and no memory freed before it, as an exec'd process would, without importing torch again."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

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
    its encoder frozen: `frozen`), in its own process, less the file-backed pages the call brought in
    (the library code it runs first).

    Linux: the peak (VmHWM, what ru_maxrss reports) is reset to the current RSS right before the
    call, because a process started by a big parent inherits the parent's ru_maxrss and would then
    show no growth. Code pages are left out because a process forked from one that has run the
    imports maps them anew where an exec'd one had them already (about 6 MB apart at --quick sizes);
    what the call allocates is the same in both. Elsewhere: the ru_maxrss difference.
    """
    call = _first_call(case, cfg, train, frozen)
    gc.collect()
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
        call()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before
    clear_refs.write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
    before, file_before = _proc_status_mb("VmRSS"), _proc_status_mb("RssFile")
    call()
    return _proc_status_mb("VmHWM") - before - (_proc_status_mb("RssFile") - file_before)


def _first_call(case: Case, cfg: BenchConfig, train: bool, frozen: bool) -> Callable[[], object]:
    """A freshly built model's inference (or training step) of `case`, ready to run."""
    device = torch.device("cpu")
    model = build_variant(case.variant, cfg, frozen).train(train)
    if train:
        return training_call(model, case.variant, cfg, device)
    infer, images = inference_call(model, case, cfg, device), bench_images(cfg, device)

    def call() -> None:
        with torch.inference_mode():
            infer(images)

    return call


def cuda_peak_memory(call: Callable[[], object], device: torch.device) -> float:
    """torch.cuda.max_memory_allocated during `call`, minus what was allocated before it (MB)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


CPU_MEMORY_METHOD = (
    "peak RSS growth (VmHWM = ru_maxrss, reset before) over the first call less the library code it "
    "brought in (file-backed pages), each case in a fresh process (forked from one that has imported the "
    "benchmark and run nothing)"
)


class MemoryJob(NamedTuple):
    """One CPU memory measurement: `case`'s inference or (train) training step, on `backbone` (None: the
    configuration's) with its encoder frozen or not."""

    case: Case
    train: bool = False
    backbone: str | None = None
    frozen: bool = False


def measure_cpu_memory(
    cases: list[Case], variants: tuple[str, ...], quick: bool
) -> dict[str, dict[str, float]]:
    """Peak RSS growth of each case's inference and each variant's training step, each in a fresh process
    (`cpu_memory_in_subprocesses`)."""
    jobs = [MemoryJob(case) for case in cases] + [MemoryJob(Case(variant), True) for variant in variants]
    peaks = cpu_memory_in_subprocesses(jobs, quick)
    return {
        "memory": {case.name: peak for case, peak in zip(cases, peaks[: len(cases)], strict=True)},
        "train_memory": dict(zip(variants, peaks[len(cases) :], strict=True)),
    }


def cpu_memory_in_subprocesses(jobs: list[MemoryJob], quick: bool) -> list[float]:
    """`cpu_peak_memory` of each job, each in a fresh process: one child of this process
    (`python -m sfseg.bench --memory-children ...`) imports the benchmark once and forks them
    (`forked_peaks`)."""
    spec = [[job.case.variant, job.case.level_shares, job.train, job.backbone, job.frozen] for job in jobs]
    command = [sys.executable, "-m", "sfseg.bench", "--memory-children", json.dumps(spec)]
    command += [f"--threads={torch.get_num_threads()}", *(["--quick"] if quick else [])]
    # Large blocks are mmapped and unmapped on free, so memory freed while building the model does
    # not sit resident and get reused by the forward unseen.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_memory_jobs(spec: str) -> list[MemoryJob]:
    """--memory-children's JSON: [[variant, level shares or null, train, backbone or null, frozen], ...]."""
    return [
        MemoryJob(Case(variant, tuple(shares) if shares else None), train, backbone, frozen)
        for variant, shares, train, backbone, frozen in json.loads(spec)
    ]


def forked_peaks(jobs: list[MemoryJob], cfg: BenchConfig) -> list[float]:
    """`cpu_peak_memory` of each job, each in a process forked from this one, which has imported the
    benchmark and built nothing: two inference jobs at once (one per core here), training jobs one at
    a time (GBs each)."""
    peaks: dict[int, float] = {}
    for train, at_once in ((False, 2), (True, 1)):
        indices = [index for index, job in enumerate(jobs) if job.train == train]
        for start in range(0, len(indices), at_once):
            started = {index: _fork(jobs[index], cfg) for index in indices[start : start + at_once]}
            peaks |= {index: _collect(*child) for index, child in started.items()}
    return [peaks[index] for index in range(len(jobs))]


def _fork(job: MemoryJob, cfg: BenchConfig) -> tuple[int, int]:
    """A child that measures `job` and writes the peak to a pipe; (its pid, the pipe's read end)."""
    cfg = replace(cfg, backbone=job.backbone) if job.backbone else cfg
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write, exit without running the parent's cleanup
        os.close(read)
        status = 1
        try:
            os.write(write, repr(cpu_peak_memory(job.case, cfg, job.train, job.frozen)).encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write)
    return pid, read


def _collect(pid: int, read: int) -> float:
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not text:
        raise RuntimeError(f"the memory child {pid} failed (exit status {os.waitstatus_to_exitcode(status)})")
    return float(text)
