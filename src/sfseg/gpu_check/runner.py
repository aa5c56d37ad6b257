"""Runs the stages of `python -m sfseg.gpu_check`, each in its own process under a time limit.

The parent process imports only the standard library, torch and this package's `sizes` and `report`, so
that it runs, and says what is missing, on a Python that lacks the rest of sfseg's stack: the environment
stage lists what is missing, and a stage that needs it fails with the import error while the others
still run. Only a stage's own process imports `stages`, which needs the whole stack.

A stage's process is started as `python -m sfseg.gpu_check --stage NAME ...`, in a new session, and its
whole process group (its own children too: the benchmark, the training runs, their loader workers) is
stopped when it runs out of time, so that a hang costs that stage's limit and no more.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import sfseg
from sfseg.gpu_check.report import write_report
from sfseg.gpu_check.sizes import FULL, TINY, CheckSizes

# A stage with less time than this left in the budget is skipped, not started.
MIN_STAGE_S = 20
# A stopped stage's processes get this long after SIGTERM (a training run saves and exits) before SIGKILL.
STOP_GRACE_S = 10
# The packages the stages import, by their distribution names (import name, where it differs).
STACK = {
    "torch": "torch",
    "torchvision": "torchvision",
    "lightning": "lightning",
    "timm": "timm",
    "torchmetrics": "torchmetrics",
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "albumentations": "albumentations",
    "opencv-python-headless": "cv2",
    "onnx": "onnx",
    "numpy": "numpy",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
}
MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
INSTALL_HINT = "install from a wheelhouse: docs/gpu.md, 'Clusters without internet'"


def installed_versions() -> dict[str, str | None]:
    """Each STACK package's version, None where it cannot be imported."""
    versions: dict[str, str | None] = {}
    for distribution, module in STACK.items():
        try:
            versions[distribution] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except ImportError:
            versions[distribution] = None
    return versions


def gpu_facts() -> dict[str, Any]:
    """The first CUDA device: name, memory, compute capability, bf16 support, and the driver's version
    (from nvidia-smi, when it is on PATH)."""
    properties = torch.cuda.get_device_properties(0)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
        driver = driver.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    return {
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "gpu_count": torch.cuda.device_count(),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "driver": driver,
    }


def environment(device: str) -> tuple[dict[str, Any], list[str]]:
    """The environment stage: machine, Python, CUDA and the stack's versions; missing packages (and on
    CUDA, no bf16) are its problems."""
    versions = installed_versions()
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": versions,
    }
    problems = []
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        problems.append(
            f"not importable here: {', '.join(missing)}; the other stages need them: {INSTALL_HINT}"
        )
    if device == "cuda":
        result |= gpu_facts()
        if not result["bf16_supported"]:
            problems.append(
                f"{result['gpu']} does not support bfloat16, which the smoke test and training use"
            )
    return result, problems


def stage_result(name: str, device: str, sizes: CheckSizes, out: Path, seconds: float) -> dict[str, Any]:
    """Run stage `name` in this process (the child's side); {"result": ..., "problems": [...]}."""
    if name == "environment":
        result, problems = environment(device)
    else:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        result, problems = stage_function(name)(sizes, torch.device(device), folder, seconds)
    return {"result": result, "problems": problems}


def stage_function(name: str) -> Callable[[CheckSizes, torch.device, Path, float], tuple[dict, list[str]]]:
    """Stage `name`'s function, imported in the stage's own process only: the parent runs without the
    stack these need, and only the smoke stage needs the models in its own process (the others run
    the project's commands)."""
    if name == "smoke":
        from sfseg.gpu_check.smoke import smoke

        return smoke
    from sfseg.gpu_check.stages import COMMAND_STAGES

    return COMMAND_STAGES[name]


def child_environment() -> dict[str, str]:
    """The stages' environment: this sfseg first on the path, nothing that would reach the network."""
    source = str(Path(sfseg.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
    }


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of `process`, then, after STOP_GRACE_S, SIGKILL whatever of it is left
    (loader workers, a benchmark's children)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_S)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has exited
    process.wait()


def log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_stage(name: str, command: list[str], limit_s: float, out: Path) -> dict[str, Any]:
    """Start a stage's process, wait at most `limit_s`, and say how it went."""
    log_path, result_path = out / "logs" / f"{name}.log", out / "logs" / f"{name}.json"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    start = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, "--stage-result", str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_environment(),
        )
        try:
            returncode = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
        stop_group(process)  # also after a normal exit: a stage leaves nothing running
    outcome: dict[str, Any] = {
        "name": name,
        "seconds": round(time.monotonic() - start, 1),
        "limit_s": round(limit_s),
        "log": str(log_path),
        "result": None,
        "problems": [],
    }
    if returncode is None:
        outcome |= {
            "status": "timed out",
            "problems": [f"stopped after {limit_s:.0f} s"],
            "error": log_tail(log_path),
        }
    elif returncode != 0 or not result_path.is_file():
        missing = MISSING_MODULE.findall(log_path.read_text(errors="replace"))
        problem = f"cannot import {missing[-1]}: {INSTALL_HINT}" if missing else f"exit status {returncode}"
        outcome |= {
            "status": "failed",
            "problems": [problem],
            "error": log_tail(log_path),
        }
    else:
        child = json.loads(result_path.read_text())
        outcome |= child | {"status": "failed" if child["problems"] else "passed"}
    return outcome


def run_checks(
    out: Path, device: str, tiny: bool, minutes: float, command: str, stage_command: list[str]
) -> list[dict[str, Any]]:
    """Run every stage within the `minutes` budget, rewriting the report after each one; return the
    stages' outcomes. `stage_command + [--stage NAME --stage-seconds S]` starts one stage."""
    sizes = TINY if tiny else FULL
    start = time.monotonic()
    deadline = start + 60 * minutes
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "tiny": tiny,
        "minutes": minutes,
        "torch": torch.__version__,
        "sizes": asdict(sizes),
    }
    outcomes: list[dict[str, Any]] = []
    for name, stage_limit in sizes.stage_limits_s.items():
        limit = min(stage_limit, deadline - time.monotonic())
        if limit < MIN_STAGE_S:
            skipped = f"{max(limit, 0):.0f} s left of --minutes {minutes:g}"
            outcomes.append(
                {"name": name, "status": "skipped", "seconds": 0, "limit_s": 0, "problems": [skipped]}
            )
        else:
            print(f"gpu_check: {name} (at most {limit:.0f} s) ...", flush=True)
            stage = [*stage_command, "--stage", name, "--stage-seconds", str(round(limit))]
            outcomes.append(run_stage(name, stage, limit, out))
            print(f"gpu_check: {name} {outcomes[-1]['status']} in {outcomes[-1]['seconds']} s", flush=True)
        write_report(out, meta | {"seconds": round(time.monotonic() - start, 1)}, outcomes)
    return outcomes


def all_passed(outcomes: list[Mapping[str, Any]]) -> bool:
    return all(outcome["status"] == "passed" for outcome in outcomes)
