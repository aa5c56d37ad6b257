"""What `ckpt_path` may name, read into one record: a Lightning checkpoint (`python -m sfseg.train`), a
model folder (`python -m sfseg.export format=pretrained`), or `hf-hub:<owner>/<name>[@<revision>]`, that
folder on the Hugging Face Hub, resolved through huggingface_hub's cache (offline too, once downloaded).

A model folder holds
    model.safetensors      the network's weights
    config.json            the model's resolved config (a checkpoint's hyperparameters) with its class
                           names, palette and raw label ids
    training_config.yaml   the training run's resolved config (its data: what `sfseg.eval` scores)
    metrics.json           the training run's final validation
    README.md              the model card
the first two needed to load it. A missing or unreadable file is an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sfseg.runs import checkpoint_run_folder, run_data_config

HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_CONFIG_FILE = "training_config.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, TRAINING_CONFIG_FILE, METRICS_FILE, CARD_FILE)
FOLDER_FORMAT = "sfseg-pretrained"
# What config.json keeps beside the model's config: what the model predicts and how to draw and write it.
CLASS_KEYS = ("class_names", "palette", "label_values")
# What every sfseg model's hyperparameters hold (SpecializeAndFuseModule's arguments).
REQUIRED_HPARAMS = ("num_classes", "backbone", "context", "levels", "tau")


@dataclass(frozen=True)
class StoredModel:
    """A model as stored: its hyperparameters (as a checkpoint's), the network's weights, where they were
    read (`path`, the file each error names) and its training run's config, when known."""

    hparams: Mapping[str, Any]
    state_dict: Mapping[str, Tensor]
    path: Path
    weights: Path
    run_config: DictConfig | None


def is_hub_id(ckpt_path: str | Path) -> bool:
    return str(ckpt_path).startswith(HUB_PREFIX)


def read_model(ckpt_path: str | Path) -> StoredModel:
    """The stored model `ckpt_path` names (a .ckpt, a model folder or a hub id)."""
    path = hub_snapshot(str(ckpt_path)) if is_hub_id(ckpt_path) else Path(ckpt_path).expanduser()
    if path.is_dir():
        return read_model_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file or model folder")
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> StoredModel:
    """A `python -m sfseg.train` checkpoint and the config of the training run folder it lies in."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's unpickling errors have no common base class
        raise ValueError(f"ckpt_path={path}: not a checkpoint torch can read ({error})") from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(hparams, Mapping) or any(key not in hparams for key in REQUIRED_HPARAMS):
        raise ValueError(
            f"ckpt_path={path}: not an sfseg checkpoint (its hyper_parameters lack "
            f"{', '.join(REQUIRED_HPARAMS)}); give a .ckpt written by `python -m sfseg.train`"
        )
    prefix = "net."  # SpecializeAndFuseModule.net; its metrics keep no state in the checkpoint
    state_dict = {
        key.removeprefix(prefix): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    return StoredModel(hparams, state_dict, path, path, run_data_config(path))


def read_model_folder(folder: Path) -> StoredModel:
    """A model folder of `python -m sfseg.export format=pretrained`."""
    config = read_json(required_file(folder, CONFIG_FILE))
    config = config if isinstance(config, Mapping) else {}
    model = config.get("model")
    if (
        config.get("format") != FOLDER_FORMAT
        or not isinstance(model, Mapping)
        or any(key not in model for key in REQUIRED_HPARAMS)
    ):
        raise ValueError(
            f"{folder / CONFIG_FILE}: not an sfseg model config (format {FOLDER_FORMAT!r} with the model's "
            f"{', '.join(REQUIRED_HPARAMS)}); write the folder with `python -m sfseg.export format=pretrained`"
        )
    hparams = {**model, **{key: config.get(key) for key in CLASS_KEYS}}
    weights = required_file(folder, WEIGHTS_FILE)
    run_config = None
    if (folder / TRAINING_CONFIG_FILE).is_file():
        try:
            run_config = OmegaConf.load(folder / TRAINING_CONFIG_FILE)
        except Exception as error:  # OmegaConf raises the YAML parser's errors, of several kinds
            raise ValueError(
                f"{folder / TRAINING_CONFIG_FILE}: not a readable YAML file ({error})"
            ) from error
    return StoredModel(hparams, read_safetensors(weights), folder, weights, run_config)


def required_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; a model folder holds {', '.join(MODEL_FILES[:2])} (written by `python -m "
            "sfseg.export format=pretrained`)"
        )
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from error


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


def hub_snapshot(model_id: str) -> Path:
    """The local folder of `hf-hub:<owner>/<name>[@<revision>]`, from huggingface_hub's cache or the Hub."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = model_id.removeprefix(HUB_PREFIX).partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(MODEL_FILES)))
    except HFValidationError as error:
        raise ValueError(
            f"ckpt_path={model_id}: not a Hub model id hf-hub:<owner>/<name> ({error})"
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE=1 forbids downloading it: run once with the network (HF_HUB_OFFLINE unset)"
            if constants.HF_HUB_OFFLINE
            else "the Hub cannot be reached: run once with the network"
        )
        raise FileNotFoundError(
            f"ckpt_path={model_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}, or "
            f"download it first with `hf download {repo_id}` (into that cache, HF_HUB_CACHE)"
        ) from None


def results_folder(ckpt_path: str | Path) -> Path:
    """Where a model's results go when a command is given no output: a checkpoint's training run folder
    (`runs.checkpoint_run_folder`); `<folder>_results` beside a model folder; for a hub id,
    `outputs/hf-hub/<owner>--<name>` in the working directory. A local path that does not exist is an
    error (before Hydra makes a run folder next to a typo)."""
    if is_hub_id(ckpt_path):
        repo_id = str(ckpt_path).removeprefix(HUB_PREFIX).partition("@")[0]
        return Path("outputs") / "hf-hub" / repo_id.replace("/", "--")
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        return path.parent / f"{path.name}_results"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file or model folder")
    return checkpoint_run_folder(path)
