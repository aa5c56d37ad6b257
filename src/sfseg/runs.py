"""Run folders: what a run writes next to its checkpoints, and how a run or a checkpoint is found again.

A training run folder (`outputs/train/<time>/`, a sweep job's `multirun/<task>/<time>/<job>/`) holds
  config.yaml       the resolved config;  versions.json: packages, CUDA, CPU threads and ISA, commit
  metrics.json      the final validation; val_counts.pt: its summed counts (PyramidMetrics' states)
  checkpoints/      the best checkpoint by val/mIoU and last.ckpt (`ckpt_path=last` resumes from it)
  wandb_run_id      the W&B run id, so that a resumed run continues its W&B run
  .hydra/           Hydra's own record (the composed config, the overrides)
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import secrets
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from sfseg import CONFIG_DIR

REPO_ROOT = Path(CONFIG_DIR).parent
CHECKPOINT_FOLDER = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
WANDB_ID_FILE = "wandb_run_id"
# versions.json: key -> distribution name (torch: torch.__version__, which keeps the build tag).
PACKAGES = {
    "lightning": "lightning",
    "timm": "timm",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "albumentations": "albumentations",
    "torchmetrics": "torchmetrics",
    "wandb": "wandb",
    "numpy": "numpy",
    "sfseg": "sfseg",
}


# ---------------------------------------------------------------------------------------------
# Records


def plain(value: Any) -> Any:
    """A DictConfig/ListConfig as the plain dict/list it stands for; anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as the run used it, interpolations resolved; Hydra's own node is in .hydra/."""
    return {key: plain(cfg[key]) for key in cfg if key != "hydra"}


def save_run_record(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml (resolved) and versions.json, to rerun or compare the run later."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(cfg)))
    write_json(run_dir / "versions.json", package_versions())


def package_versions() -> dict[str, Any]:
    """Python, the packages that shape a run (None if absent), CUDA, torch's CPU threads and instruction
    set, the CPU model, and the git commit of the source."""
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for key, distribution in PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    versions["cuda"] = torch.version.cuda
    # CPU results depend on all three: sums are split over the threads, and the kernels differ per
    # instruction set (AVX2, AVX512, ...) and per CPU model (two AVX512 CPUs: docs/training.md), so any
    # of them changes the numbers a seed gives.
    versions["torch_threads"] = torch.get_num_threads()
    versions["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    versions["cpu"] = cpu_model()
    return {**versions, **git_state(REPO_ROOT)}


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's on Linux, else what the platform module reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_state(repo: Path) -> dict[str, Any]:
    """The commit of `repo` and whether tracked files differ from it; None without git or a repository."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(repo), *args],
                capture_output=True,
                text=True,
                timeout=10,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # read only: no index refresh
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """JSON with NaN written as null (an absent class or an empty level has no score)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value

    path.write_text(json.dumps(clean(data), indent=2) + "\n")


def write_validation(run_dir: Path, metrics: Mapping[str, Any], counts: Mapping[str, torch.Tensor]) -> None:
    """metrics.json and val_counts.pt of a run's final validation."""
    write_json(run_dir / "metrics.json", metrics)
    torch.save(dict(counts), run_dir / "val_counts.pt")


def print_summary(metrics: Mapping[str, Any], levels: int, run_dir: Path) -> None:
    """The headline numbers of a finished training run and where its files are."""
    rows = [("fused mIoU", metrics["mIoU"]), ("finest-only mIoU", metrics["mIoU_finest"])]
    rows += [(f"level {level} mIoU", metrics[f"mIoU_level{level}"]) for level in range(1, levels + 1)]
    rows += [(f"best single level (level {metrics['best_level']})", metrics["mIoU_best_level"])]
    rows += [("oracle fuse mIoU", metrics["mIoU_oracle"])]
    rows += [
        (f"{key.removeprefix('mIoU_fuse_')} fuse mIoU", value)
        for key, value in metrics.items()
        if key.startswith("mIoU_fuse_")
    ]
    rows += [("pixel accuracy", metrics["pixel_acc"])]
    rows += [
        (f"share of cells, level {level}", metrics[f"share_level{level}"]) for level in range(1, levels + 1)
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 12))
    for name, value in rows:
        print(f"{name:<{width}}  {100 * value:8.2f} %")
    print("-" * (width + 12))
    print(f"run folder : {run_dir}")
    print(f"checkpoint : {metrics['checkpoint']}")
    print(f"metrics    : {run_dir / 'metrics.json'}")
    print(f"pictures   : {run_dir / 'pyramid.png'}\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def evaluated_checkpoint(best: str, last: Path) -> str:
    """The best checkpoint by val/mIoU; without one (no validation during fit), last.ckpt, which holds
    the final weights; "" if neither exists."""
    return best or (str(last) if last.is_file() else "")


def resolve_ckpt_path(ckpt_path: str | None, last: Path) -> str | None:
    """`last` is the run folder's last.ckpt. Without one, an error: Lightning itself would only warn
    and train from scratch."""
    if ckpt_path != "last":
        return ckpt_path
    if not last.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last: there is no {last}. Resume a run by running it again in its own folder: "
            "hydra.run.dir=<that run folder> ckpt_path=last (a sweep: the same hydra.sweep.dir and "
            "overrides), or give ckpt_path=<path to a .ckpt>"
        )
    return str(last)


def checkpoint_run_folder(ckpt_path: str | Path) -> Path:
    """The training run folder of a checkpoint: the parent of its `checkpoints/` folder (as
    `make train` writes it), else the folder the checkpoint lies in."""
    folder = Path(ckpt_path).expanduser().parent
    return folder.parent if folder.name == CHECKPOINT_FOLDER else folder


def latest_checkpoint(root: str | Path = REPO_ROOT / "outputs" / "train") -> Path:
    """The newest `<root>/*/checkpoints/last.ckpt` (what `make train` writes)."""
    candidates = sorted(
        Path(root).glob(f"*/{CHECKPOINT_FOLDER}/{LAST_CHECKPOINT}"), key=lambda path: path.stat().st_mtime
    )
    if not candidates:
        raise FileNotFoundError(
            f"no */checkpoints/last.ckpt under {root}: run `make train` first, or point SFSEG_CKPT at a .ckpt"
        )
    return candidates[-1]


def run_data_config(ckpt_path: str | Path) -> DictConfig | None:
    """The resolved config of a checkpoint's training run (`<run folder>/config.yaml`, plain values: it
    needs none of train's resolvers, e.g. trainer=ddp's per-device batch), or None when the checkpoint
    does not sit in a run folder."""
    config_path = checkpoint_run_folder(ckpt_path) / "config.yaml"
    return OmegaConf.load(config_path) if config_path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Weights & Biases run identity


def configure_wandb(cfg: DictConfig, run_dir: Path) -> None:
    """Complete a W&B logger's config: the run id kept in the run folder (a resumed run continues its
    W&B run), the run folder's name as the run name, and for sweep jobs one group per sweep."""
    hydra_cfg = HydraConfig.get()
    for logger_cfg in (cfg.get("logger") or {}).values():
        if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
            continue
        with open_dict(logger_cfg):
            logger_cfg.id = logger_cfg.get("id") or wandb_run_id(run_dir)
            logger_cfg.name = logger_cfg.get("name") or run_dir.name
            if not logger_cfg.get("group") and hydra_cfg.mode == RunMode.MULTIRUN:
                logger_cfg.group = f"{cfg.task_name}-{Path(hydra_cfg.sweep.dir).name}"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, made on its first run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


@contextmanager
def finishing_wandb(loggers: Sequence[Logger]) -> Iterator[None]:
    """End the W&B run with the job, so that the next job of a sweep gets its own run (DESIGN 6)."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        yield
        return
    import wandb

    try:
        yield
    except BaseException:
        wandb.finish(exit_code=1)
        raise
    wandb.finish()
