"""Evaluation entry point: `python -m sfseg.eval ckpt_path=<ckpt> data=<name> [eval.*]` (Hydra).

The model is rebuilt from the checkpoint's hyperparameters and the data pipeline follows its L.
Predictions are whole-image (padded to the model's size divisor, cropped back) or sliding-window
(`eval.mode=slide`), optionally multi-scale + flip (`eval.scales`, `eval.flip`: softmax probabilities
averaged at the original resolution), from the fused output or the finest level only (`eval.fuse=false`,
Table 8's "auxiliary supervision"). A single-scale whole-image pass of the fused pyramid also feeds
the specialization analysis (Sec. 5.5). The eval folder (default `<training run>/eval`, see
`default_eval_folder`) gets metrics.json, per_class.csv, specialization.json, table9.png and fig3.png.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from matplotlib.patches import Rectangle
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from sfseg.data.datamodule import SegmentationDataModule
from sfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sfseg.metrics import PyramidMetrics, SegmentationMetrics
from sfseg.models import PyramidSegmenter
from sfseg.module import SpecializeAndFuseModule
from sfseg.pyramid import build_targets, fuse, level_strides
from sfseg.train import CONFIG_DIR, write_json
from sfseg.visualize import save_figure

REPO_ROOT = Path(CONFIG_DIR).parent
EVAL_MODES = ("whole", "slide")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Settings, device, checkpoint and data


def _pair(value: int | Sequence[int], key: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(side) for side in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{key} must be a positive int or [H, W], got {value}")
    return pair


@dataclass(frozen=True)
class InferenceSettings:
    """How the evaluated prediction is made (the `eval` group of conf/eval.yaml)."""

    mode: str = "whole"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval.mode={self.mode!r} is not one of {', '.join(EVAL_MODES)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(
                f"eval.scales must be a non-empty list of positive factors, got {list(self.scales)}"
            )
        if any(step > crop for step, crop in zip(self.stride, self.crop_size, strict=True)):
            raise ValueError(
                f"eval.stride={list(self.stride)} must not exceed eval.crop_size={list(self.crop_size)} "
                "(pixels between windows would get no prediction)"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> InferenceSettings:
        return cls(
            mode=cfg.mode,
            crop_size=_pair(cfg.crop_size, "eval.crop_size"),
            stride=_pair(cfg.stride, "eval.stride"),
            scales=tuple(float(scale) for scale in cfg.scales),
            flip=bool(cfg.flip),
            fuse=bool(cfg.fuse),
        )

    @property
    def single_pass(self) -> bool:
        """One whole-image pass at the original scale: the analysis pass already gives the prediction."""
        return self.mode == "whole" and self.scales == (1.0,) and not self.flip


def default_eval_folder(ckpt_path: str, mode: str, scales: Sequence[float], flip: bool, fuse: bool) -> str:
    """`<training run folder>/eval` plus a suffix per non-default setting (_slide, _ms, _flip,
    _finest), so that e.g. Table 8's fused and finest-only results sit side by side."""
    if not Path(ckpt_path).expanduser().is_file():  # before Hydra creates a run folder next to a typo
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    name = "eval"
    name += "_slide" if mode == "slide" else ""
    name += "_ms" if [float(scale) for scale in scales] != [1.0] else ""
    name += "_flip" if flip else ""
    name += "" if fuse else "_finest"
    return str(checkpoint_run_folder(ckpt_path) / name)


# conf/eval.yaml's hydra.run.dir calls it; registered at import, before Hydra composes the config.
OmegaConf.register_new_resolver("sfseg_eval_folder", default_eval_folder, replace=True)


def checkpoint_run_folder(ckpt_path: str | Path) -> Path:
    """The training run folder of a checkpoint: the parent of its `checkpoints/` folder (as
    `make train` writes it), else the folder the checkpoint lies in."""
    folder = Path(ckpt_path).expanduser().parent
    return folder.parent if folder.name == "checkpoints" else folder


def latest_checkpoint(root: str | Path = REPO_ROOT / "outputs" / "train") -> Path:
    """The newest `<root>/*/checkpoints/last.ckpt` (what `make train` writes)."""
    candidates = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"no */checkpoints/last.ckpt under {root}: run `make train` first, or point SFSEG_CKPT at a .ckpt"
        )
    return candidates[-1]


def resolve_device(name: str, key: str = "eval.device") -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:<index>`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:<index>") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={name!r} is not supported; use auto, cpu, cuda or cuda:<index>")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name!r} but CUDA is not available here; use {key}=cpu")
    return device


def autocast(
    device: torch.device, dtype: str | None, key: str = "eval.autocast"
) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` (bfloat16 or float16), or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"{key}={dtype!r} is not one of null, {', '.join(AUTOCAST_DTYPES)}")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


def load_model(ckpt_path: str | Path, device: torch.device | str = "cpu") -> SpecializeAndFuseModule:
    """The LightningModule of a checkpoint, rebuilt from its hyperparameters, in eval mode on `device`."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    model = SpecializeAndFuseModule.load_from_checkpoint(path, map_location=torch.device(device))
    return model.eval()


def instantiate_datamodule(cfg: DictConfig, model: SpecializeAndFuseModule) -> SegmentationDataModule:
    """`cfg.data` with the checkpoint's L and ignore index (the data group reads them from `model.*`)."""
    checkpoint_values = {"levels": model.levels, "ignore_index": model.ignore_index}
    with open_dict(cfg):
        for key, value in checkpoint_values.items():
            given = cfg.model.get(key)
            if given is not None and given != value:
                raise ValueError(
                    f"model.{key}={given} but the checkpoint was trained with {value}; leave model.{key} "
                    "unset: it is taken from the checkpoint"
                )
            cfg.model[key] = value
    # Unpadded originals: evaluation rescales them (multi-scale test) and pads to the model's divisor.
    datamodule: SegmentationDataModule = instantiate(cfg.data, val_pad=False)
    if datamodule.num_levels != model.levels:
        raise ValueError(
            f"data.num_levels={datamodule.num_levels} but the checkpoint has L={model.levels} levels; "
            "leave data.num_levels at its default ${model.levels}"
        )
    if datamodule.num_classes != model.hparams.num_classes:
        raise ValueError(
            f"data={cfg.data._target_} has {datamodule.num_classes} classes but the checkpoint was trained "
            f"on {model.hparams.num_classes} ({', '.join(model.class_names[:5])}, ...); pick its dataset"
        )
    return datamodule


def checkpoint_datamodule(ckpt_path: str | Path, model: SpecializeAndFuseModule) -> SegmentationDataModule:
    """The datamodule a checkpoint's training run used, from the run's `.hydra/config.yaml`."""
    config_path = checkpoint_run_folder(ckpt_path) / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: the checkpoint {ckpt_path} is not in a training run folder; "
            "evaluate it with `python -m sfseg.eval ckpt_path=... data=<name>`"
        )
    return instantiate_datamodule(OmegaConf.load(config_path), model)


# ---------------------------------------------------------------------------------------------
# Inference: whole image, sliding window, multi-scale + flip


def round_up(length: int, divisor: int) -> int:
    return -(-length // divisor) * divisor


def pad_images(images: Tensor, height: int, width: int) -> Tensor:
    """Pad normalised images [B, 3, h, w] at the bottom and right to height x width with black, as
    `val_transform` pads (image 0 before normalisation)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype)
    batch, channels, old_height, old_width = images.shape
    padded = (-mean / std).view(1, channels, 1, 1).repeat(batch, 1, height, width)
    padded[..., :old_height, :old_width] = images
    return padded


def whole_logits(net: PyramidSegmenter, images: Tensor, tau: float, fuse_levels: bool = True) -> Tensor:
    """Logits [B, C, H, W] of the whole image, padded to the model's size divisor and cropped back."""
    height, width = images.shape[-2:]
    divisor = net.size_divisor
    padded = pad_images(images, round_up(height, divisor), round_up(width, divisor))
    logits, _ = net.predict(padded, tau, fuse_levels)
    return logits[..., :height, :width]


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Window offsets along one side: every `step`, the last one flush with the end."""
    last = max(length - window, 0)
    return sorted({min(index * step, last) for index in range(-(-last // step) + 1)})


def slide_logits(
    net: PyramidSegmenter,
    images: Tensor,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
    tau: float,
    fuse_levels: bool = True,
) -> Tensor:
    """Logits [B, C, H, W] averaged over crop_size windows every `stride` pixels; an image smaller
    than a window is padded to it. Each window is predicted whole (fused within the window)."""
    if any(side % net.size_divisor for side in crop_size):
        raise ValueError(
            f"eval.crop_size={list(crop_size)} must be a multiple of the model's size divisor {net.size_divisor}"
        )
    height, width = images.shape[-2:]
    (crop_h, crop_w), (step_h, step_w) = crop_size, stride
    padded = pad_images(images, max(height, crop_h), max(width, crop_w))
    total: Tensor | None = None
    count = torch.zeros(padded.shape[-2:], device=images.device)
    for top in window_starts(padded.shape[-2], crop_h, step_h):
        for left in window_starts(padded.shape[-1], crop_w, step_w):
            logits, _ = net.predict(padded[..., top : top + crop_h, left : left + crop_w], tau, fuse_levels)
            if total is None:
                total = logits.new_zeros(logits.shape[:2] + padded.shape[-2:], dtype=torch.float32)
            total[..., top : top + crop_h, left : left + crop_w] += logits.float()
            count[top : top + crop_h, left : left + crop_w] += 1
    return (total / count)[..., :height, :width]


def predict_logits(net: PyramidSegmenter, images: Tensor, settings: InferenceSettings, tau: float) -> Tensor:
    """Logits [B, C, H, W] at the images' own size, whole or sliding-window as `settings.mode` says."""
    if settings.mode == "slide":
        return slide_logits(net, images, settings.crop_size, settings.stride, tau, settings.fuse)
    return whole_logits(net, images, tau, settings.fuse)


def tta_probabilities(
    net: PyramidSegmenter, images: Tensor, settings: InferenceSettings, tau: float
) -> Tensor:
    """Softmax probabilities [B, C, H, W] averaged over `settings.scales` (x flip), each taken at the
    original resolution: the logits of a rescaled (and flipped) image are flipped back and resized
    bilinearly to H x W before the softmax."""
    height, width = images.shape[-2:]
    total: Tensor | None = None
    views = 0
    for scale in settings.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images
        if size != (height, width):
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if settings.flip else (False,):
            logits = predict_logits(net, scaled.flip(-1) if flipped else scaled, settings, tau).float()
            if flipped:
                logits = logits.flip(-1)
            if size != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probabilities = logits.softmax(1)
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views


# ---------------------------------------------------------------------------------------------
# Evaluation over a split


@dataclass
class Evaluation:
    """What `evaluate` accumulated over a split.

    prediction: the evaluated prediction (whole/slide, scales, flip, fused or finest-only);
    pyramid: the single-scale whole-image fused pyramid, for the specialization analysis.
    """

    prediction: SegmentationMetrics
    pyramid: PyramidMetrics
    class_names: list[str]
    tau: float
    num_images: int

    def scores(self) -> dict[str, Any]:
        """mIoU, pixel and mean accuracy, per-class IoU and accuracy keyed by class name."""
        scores = self.prediction.compute()
        return {
            "mIoU": scores["mIoU"],
            "pixel_acc": scores["pixel_acc"],
            "mean_acc": scores["mean_acc"],
            "per_class_iou": dict(zip(self.class_names, scores["iou"], strict=True)),
            "per_class_acc": dict(zip(self.class_names, scores["acc"], strict=True)),
            "num_images": self.num_images,
        }

    def specialization(self) -> dict[str, Any]:
        """The Sec. 5.5 analysis with level and class names, as written to specialization.json."""
        report = self.pyramid.specialization_report()
        levels = self.pyramid.num_levels
        names = [f"level{level}" for level in range(1, levels + 1)]
        cells, labels = report["cells"], report["labels"]
        finest_cells = int(cells.sum())
        return {
            "levels": levels,
            "strides": level_strides(levels),
            "tau": self.tau,
            "pyramid_scores": self.pyramid.compute(),
            "table9": {
                "rows": "level whose own semantic prediction is scored (l')",
                "columns": "level the fused map took the pixels from (l)",
                "miou": report["table9"].tolist(),
                "pixels_per_column": report["group_pixels"].tolist(),
            },
            "fig3": {
                "fused_iou": dict(zip(self.class_names, report["fused_iou"].tolist(), strict=True)),
                "iou_minus_fused": {
                    name: dict(zip(self.class_names, row, strict=True))
                    for name, row in zip(names, report["iou_minus_fused"].tolist(), strict=True)
                },
            },
            "parsimony": {
                "finest_cells": finest_cells,
                "finest_cells_per_level": dict(zip(names, cells.tolist(), strict=True)),
                "share_per_level": dict(
                    zip(names, (cells.double() / max(finest_cells, 1)).tolist(), strict=True)
                ),
                "labels_per_level": dict(zip(names, labels.tolist(), strict=True)),
                "labels": int(labels.sum()),
                "labels_per_finest_cell": int(labels.sum()) / max(finest_cells, 1),
            },
            "unity": {
                "precision": dict(zip(names[:-1], report["unity_precision"].tolist(), strict=True)),
                "recall": dict(zip(names[:-1], report["unity_recall"].tolist(), strict=True)),
            },
        }


@torch.inference_mode()
def evaluate(
    model: SpecializeAndFuseModule,
    loader: DataLoader,
    settings: InferenceSettings | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Run the model over a loader of {"image", "label"} batches and accumulate the metrics."""
    settings = settings or InferenceSettings()
    device = torch.device(device)
    net = model.net.to(device).eval()
    num_classes, tau = model.hparams.num_classes, model.tau
    prediction = SegmentationMetrics(num_classes, model.ignore_index).to(device)
    pyramid = PyramidMetrics(num_classes, model.levels, tau, model.ignore_index).to(device)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if images.shape[-2:] != labels.shape[-2:]:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} and label size {tuple(labels.shape[-2:])} differ "
                "in a batch of the data's val split"
            )
        with autocast(device, autocast_dtype):
            fused_pred, finest_pred = _analyse(net, images, labels, pyramid, tau, model.ignore_index)
            if settings.single_pass:
                pred = fused_pred if settings.fuse else finest_pred
            else:
                pred = tta_probabilities(net, images, settings, tau).argmax(1)
        prediction.update(pred, labels)
    return Evaluation(prediction, pyramid, list(model.class_names), tau, len(loader.dataset))


def _analyse(
    net: PyramidSegmenter,
    images: Tensor,
    labels: Tensor,
    metrics: PyramidMetrics,
    tau: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """The single-scale whole-image pass: update the pyramid metrics, return the fused and the
    finest-only predictions [B, H, W]. Padding is labelled ignore, so it is never scored."""
    height, width = labels.shape[-2:]
    padded_height, padded_width = round_up(height, net.size_divisor), round_up(width, net.size_divisor)
    out = net(pad_images(images, padded_height, padded_width))
    padded_labels = F.pad(labels, (0, padded_width - width, 0, padded_height - height), value=ignore_index)
    fused_logits, level_map = fuse(out.semantic, out.unity, tau)
    to_label_size = SpecializeAndFuseModule._to_label_size  # the same upsampling as validation
    fused_pred = to_label_size(fused_logits, padded_labels)
    level_preds = [to_label_size(logits, padded_labels) for logits in out.semantic]
    metrics.update(
        fused_pred=fused_pred,
        level_preds=level_preds,
        target=padded_labels,
        unity_logits=out.unity,
        unity_targets=build_targets(padded_labels, net.num_levels, ignore_index).unity,
        level_map=level_map,
    )
    return fused_pred[..., :height, :width], level_preds[-1][..., :height, :width]


# ---------------------------------------------------------------------------------------------
# Reports: per-class table, Table 9 heatmap, Fig. 3 bars


def _percent(value: float | None) -> float:
    """A fraction as percent; NaN for a missing score (NaN in memory, null in the JSON files)."""
    return math.nan if value is None else 100 * value


def per_class_table(scores: dict[str, Any]) -> str:
    """The per-class IoU / accuracy table (percent; '-' for a class absent from the split)."""
    names = list(scores["per_class_iou"])
    summary = (("mIoU", "mIoU"), ("pixel accuracy", "pixel_acc"), ("mean accuracy", "mean_acc"))
    width = max(len("class"), *(len(name) for name in names), *(len(label) for label, _ in summary))

    def cell(value: float | None) -> str:
        value = _percent(value)
        return f"{'-':>8}" if math.isnan(value) else f"{value:8.2f}"

    lines = [f"{'class':<{width}}  {'IoU %':>8}  {'Acc %':>8}", "-" * (width + 20)]
    lines += [
        f"{name:<{width}}  {cell(scores['per_class_iou'][name])}  {cell(scores['per_class_acc'][name])}"
        for name in names
    ]
    lines.append("-" * (width + 20))
    lines += [f"{label:<{width}}  {cell(scores[key])}" for label, key in summary]
    return "\n".join(lines)


def write_per_class_csv(path: Path, scores: dict[str, Any]) -> Path:
    """class,iou,acc (fractions; empty for a class absent from the split)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "acc"])
        for name, iou in scores["per_class_iou"].items():
            acc = scores["per_class_acc"][name]
            writer.writerow([name, *("" if math.isnan(_percent(v)) else f"{v:.6f}" for v in (iou, acc))])
    return path


def table9_figure(specialization: dict[str, Any]) -> plt.Figure:
    """Table 9 as a heatmap: rows l' (whose prediction is scored), columns l (the level the fused map
    took the pixels from), mIoU in percent; the diagonal is outlined."""
    matrix = np.array([[_percent(value) for value in row] for row in specialization["table9"]["miou"]])
    levels = len(matrix)
    ticks = [f"{level}\n(s={stride})" for level, stride in enumerate(specialization["strides"], start=1)]
    fig, ax = plt.subplots(figsize=(1.3 * levels + 2.4, 1.1 * levels + 1.6))
    top = max(np.nanmax(matrix, initial=0), 1)
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=top)
    for row in range(levels):
        for col in range(levels):
            value = matrix[row, col]
            missing = math.isnan(value)
            # Dark text on the bright end of viridis and on the blank cells of an empty group.
            colour = "black" if missing or value > 0.6 * top else "white"
            text = "-" if missing else f"{value:.1f}"
            ax.text(col, row, text, ha="center", va="center", color=colour, fontsize=9)
        ax.add_patch(Rectangle((row - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(levels), ticks, fontsize=8)
    ax.set_yticks(range(levels), ticks, fontsize=8)
    ax.set_xlabel("l: level the fused map took the pixels from")
    ax.set_ylabel("l': level whose prediction is scored")
    ax.set_title("Table 9: mIoU (%) of each level on each group", fontsize=10)
    fig.colorbar(image, ax=ax, label="mIoU (%)")
    fig.tight_layout()
    return fig


def fig3_figure(specialization: dict[str, Any]) -> plt.Figure:
    """Fig. 3: per class (present in the ground truth), IoU of each level minus the fused IoU, in
    percentage points; one row of bars per level, green where the level beats the fused output."""
    differences = specialization["fig3"]["iou_minus_fused"]
    classes = [
        name
        for name in specialization["fig3"]["fused_iou"]
        if any(row[name] is not None and not math.isnan(row[name]) for row in differences.values())
    ]
    levels = len(differences)
    fig, axes = plt.subplots(
        levels,
        1,
        figsize=(max(6.0, 0.3 * len(classes) + 1.5), 1.5 * levels + 1.4),
        sharex=True,
        squeeze=False,
    )
    for ax, (level_name, row) in zip(axes[:, 0], differences.items(), strict=True):
        values = np.array([_percent(row[name]) for name in classes])
        ax.bar(range(len(classes)), values, color=np.where(values > 0, "tab:green", "tab:red"))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{level_name}\n- fused", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    axes[0, 0].set_title("Fig. 3: IoU of each level minus the fused IoU (percentage points)", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The entry point


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on `cfg.data`'s val split; write and return the metrics."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    settings = InferenceSettings.from_config(cfg.eval)
    device = resolve_device(cfg.eval.device)
    autocast(device, cfg.eval.autocast)  # validates the key before the long part
    model = load_model(cfg.ckpt_path, device)
    datamodule = instantiate_datamodule(cfg, model)
    datamodule.setup("validate")
    evaluation = evaluate(model, datamodule.val_dataloader(), settings, device, cfg.eval.autocast)

    scores = evaluation.scores()
    metrics = {
        **scores,
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "data": cfg.data._target_,
        "inference": {**asdict(settings), "device": str(device), "autocast": cfg.eval.autocast},
    }
    specialization = evaluation.specialization()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    write_per_class_csv(out_dir / "per_class.csv", scores)
    write_json(out_dir / "specialization.json", specialization)
    save_figure(table9_figure(specialization), out_dir / "table9.png")
    save_figure(fig3_figure(specialization), out_dir / "fig3.png")

    print("\n" + per_class_table(scores))
    print(f"\n{evaluation.num_images} images, {_describe(settings)}")
    for name in ("metrics.json", "per_class.csv", "specialization.json", "table9.png", "fig3.png"):
        print(f"  {out_dir / name}")
    return metrics


def _describe(settings: InferenceSettings) -> str:
    mode = settings.mode
    if mode == "slide":
        mode += f" {list(settings.crop_size)} windows every {list(settings.stride)}"
    flip = "flip" if settings.flip else "no flip"
    output = "fused" if settings.fuse else "finest level only"
    return f"{mode}, scales {list(settings.scales)}, {flip}, {output}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    return run(cfg)["mIoU"]


if __name__ == "__main__":
    main()
