"""A trained model as a folder that others load in one line (`sfseg.inference.load(<folder>)`, or
`load("hf-hub:<owner>/<name>")` once the folder is on the Hugging Face Hub): the weights as safetensors,
the model's config with its classes and palette, the training run's config and metrics, and a model card
(README.md). `python -m sfseg.export format=pretrained` writes it; `sfseg.inference.sources` reads it.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from sfseg.data.real import training_layout
from sfseg.inference.loading import Predictor
from sfseg.inference.sources import (
    CARD_FILE,
    CLASS_KEYS,
    CONFIG_FILE,
    FOLDER_FORMAT,
    METRICS_FILE,
    TRAINING_CONFIG_FILE,
    WEIGHTS_FILE,
    read_json,
)
from sfseg.runs import checkpoint_run_folder, write_json

# The headline numbers of a run's metrics.json that the model card shows, in percent.
CARD_METRICS = {
    "mIoU": "mIoU (fused)",
    "mIoU_finest": "mIoU (finest level only)",
    "pixel_acc": "pixel accuracy",
    "mean_acc": "mean accuracy",
}


@dataclass(frozen=True)
class TrainingRecord:
    """What is known of the run that trained a model: its resolved config, its final validation
    (metrics.json) and the command line that ran it; None where the source does not say."""

    config: DictConfig | None
    metrics: Mapping[str, Any] | None
    command: str | None


def training_record(predictor: Predictor) -> TrainingRecord:
    """The record of a checkpoint's training run folder (config.yaml, metrics.json, .hydra/overrides.yaml),
    or the one a model folder carries (training_config.yaml, metrics.json, config.json)."""
    source = predictor.checkpoint
    if source is None:
        return TrainingRecord(predictor.data_config, None, None)
    if source.is_dir():
        metrics_path, command = source / METRICS_FILE, read_json(source / CONFIG_FILE).get("training_command")
    else:
        run_folder = checkpoint_run_folder(source)
        metrics_path, command = run_folder / METRICS_FILE, training_command(run_folder)
    metrics = read_json(metrics_path) if metrics_path.is_file() else None
    return TrainingRecord(predictor.data_config, metrics, command)


def training_command(run_folder: Path) -> str | None:
    """`python -m sfseg.train <overrides>` as Hydra recorded the run's overrides (.hydra/overrides.yaml)."""
    path = run_folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    return shlex.join(["python", "-m", "sfseg.train", *yaml.safe_load(path.read_text())])


def export_pretrained(predictor: Predictor, folder: str | Path) -> list[Path]:
    """Write `predictor` (at its tau) as a model folder; return the files written."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    record = training_record(predictor)
    weights = {key: value.detach().cpu().contiguous() for key, value in predictor.net.state_dict().items()}
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, model_config(predictor, record))
    written = [folder / WEIGHTS_FILE, folder / CONFIG_FILE]
    if record.config is not None:
        (folder / TRAINING_CONFIG_FILE).write_text(OmegaConf.to_yaml(record.config))
        written.append(folder / TRAINING_CONFIG_FILE)
    if record.metrics is not None:
        write_json(folder / METRICS_FILE, record.metrics)
        written.append(folder / METRICS_FILE)
    (folder / CARD_FILE).write_text(model_card(predictor, record))
    return [*written, folder / CARD_FILE]


def model_config(predictor: Predictor, record: TrainingRecord) -> dict[str, Any]:
    """config.json: the model's hyperparameters (tau: the predictor's), its classes, palette and raw
    label ids, and how it was trained."""
    model = {key: value for key, value in predictor.hyper_parameters.items() if key not in CLASS_KEYS}
    return {
        "format": FOLDER_FORMAT,
        "sfseg_version": importlib.metadata.version("sfseg"),
        "model": {**model, "tau": predictor.tau},
        "class_names": list(predictor.class_names),
        "palette": [list(colour) for colour in predictor.palette],
        "label_values": predictor.label_values,
        "training_command": record.command,
    }


def dataset_name(predictor: Predictor, config: DictConfig | None) -> str:
    """The training data's name: its dataset's (ade20k, cityscapes, ...), else its datamodule's
    (SyntheticContextDataModule: synthetic_context)."""
    target = config.data.get("_target_") if config is not None and "data" in config else None
    layout = training_layout(target, predictor.class_names)
    if layout is not None:
        return layout.name
    if target is None:
        return "unknown data"
    words = re.findall(r"[A-Z][a-z0-9]*", target.rsplit(".", 1)[-1].removesuffix("DataModule"))
    return "_".join(words).lower()


def model_card(predictor: Predictor, record: TrainingRecord) -> str:
    """README.md: what the model is, how well its training run scored it, how it was trained and how to
    use it; with the Hugging Face Hub's metadata header."""
    hparams = predictor.hyper_parameters
    dataset = dataset_name(predictor, record.config)
    backbone = hparams.get("backbone", {}).get("name", "?")
    source = predictor.checkpoint.name if predictor.checkpoint is not None else "?"
    rows = [
        ("dataset", f"{dataset} ({predictor.num_classes} classes)"),
        ("backbone", backbone),
        ("context module", hparams.get("context", {}).get("name", "none")),
        ("pyramid levels L", str(predictor.levels)),
        ("fuse rule", f"{predictor.fuse_rule.label}, tau = {predictor.tau:g}"),
        ("trained with", f"`{record.command}`" if record.command else "not recorded"),
        ("weights from", f"`{source}`"),
    ]
    lines = [
        "---",
        "library_name: sfseg",
        "pipeline_tag: image-segmentation",
        f"tags: [image-segmentation, semantic-segmentation, sfseg, {dataset}]",
        "---",
        "",
        f"# Specialize and Fuse: {backbone} on {dataset}, L={predictor.levels}",
        "",
        'A semantic segmentation model of sfseg, the reference platform of "Specialize and Fuse: Pyramidal '
        'Output Representation for Semantic Segmentation" (ICCV 2021).',
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        *metrics_section(record.metrics),
        *usage_section(),
    ]
    return "\n".join(lines) + "\n"


def metrics_section(metrics: Mapping[str, Any] | None) -> list[str]:
    if metrics is None:
        return [
            "## Validation",
            "",
            "Not recorded: the model was not exported from a training run folder.",
            "",
        ]
    shown = {label: metrics[key] for key, label in CARD_METRICS.items() if metrics.get(key) is not None}
    evaluated = Path(str(metrics.get("checkpoint") or "?")).name
    return [
        "## Validation",
        "",
        f"The training run's final validation (`metrics.json`, checkpoint `{evaluated}`, step "
        f"{metrics.get('step', '?')}), single scale, whole image:",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
        "| " + " | ".join(f"{100 * value:.2f}" for value in shown.values()) + " |",
        "",
    ]


def usage_section() -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "from sfseg.inference import load",
        'model = load("hf-hub:<owner>/<name>")  # or load("<this folder>")',
        "result = model.predict(rgb)  # HxWx3 uint8 -> result.mask [H, W] class ids, result.level_map",
        "```",
        "",
        "```bash",
        "python -m sfseg.predict ckpt_path=hf-hub:<owner>/<name> input=photos/",
        "python -m sfseg.eval ckpt_path=hf-hub:<owner>/<name> data.root=<the dataset on this machine>",
        "```",
        "",
        f"Files: `{WEIGHTS_FILE}` (weights), `{CONFIG_FILE}` (the model's config, class names, palette, raw "
        f"label ids), `{TRAINING_CONFIG_FILE}` (the training run's resolved config), `{METRICS_FILE}` (its "
        "final validation).",
    ]
