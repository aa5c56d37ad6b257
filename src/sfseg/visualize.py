"""Pictures of the two pyramids: image, ground truth, unity pyramid, semantic pyramid, level map, fused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from sfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sfseg.pyramid import IGNORE_INDEX, PyramidTargets, level_strides, repeat_cells

# Level-map colours, coarse to fine (level 1 = dark blue ... level L = yellow), as in Fig. 1.
LEVEL_CMAP = "viridis"


def denormalize(images: Tensor) -> np.ndarray:
    """[B,3,H,W] ImageNet-normalised floats -> [B,H,W,3] uint8."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    rgb = (images.float() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(0, 2, 3, 1).cpu().numpy()


def colorize(
    label: Tensor | np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Label map [H,W] -> RGB uint8 [H,W,3]; ignored pixels are black."""
    label = label.cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[ignore_index] = 0
    return table[np.clip(label, 0, 255)]


def pyramid_figure(
    images: Tensor,
    labels: Tensor,
    semantic_logits: list[Tensor],
    unity_logits: list[Tensor],
    level_map: Tensor,
    fused_pred: Tensor,
    palette: Sequence[Sequence[int]],
    ignore_index: int = IGNORE_INDEX,
) -> plt.Figure:
    """One row per image: image, ground truth, U^(1..L-1), Y^(1..L), level map, fused prediction."""
    levels = len(semantic_logits)
    titles = ["image", "ground truth"]
    titles += [f"unity U{level}" for level in range(1, levels)]
    titles += [f"semantic Y{level}" for level in range(1, levels + 1)]
    titles += [f"level map (1 dark…{levels} yellow)", "fused"]
    rows, cols = images.shape[0], len(titles)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    rgb = denormalize(images)
    for row in range(rows):
        panels: list[tuple[np.ndarray, dict]] = [
            (rgb[row], {}),
            (colorize(labels[row], palette, ignore_index), {}),
        ]
        panels += [
            (torch.sigmoid(u[row].float()).cpu().numpy(), {"cmap": "gray", "vmin": 0, "vmax": 1})
            for u in unity_logits
        ]
        panels += [(colorize(y[row].argmax(0), palette), {}) for y in semantic_logits]
        panels.append(
            (level_map[row].cpu().numpy(), {"cmap": LEVEL_CMAP, "vmin": 0, "vmax": max(levels - 1, 1)})
        )
        panels.append((colorize(fused_pred[row], palette), {}))
        for col, (picture, style) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(picture, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The dataset browser (python -m sfseg.data.browse): ground-truth pyramids and split statistics.

IGNORED_GREYS = (96, 176)  # diagonal stripes of these two greys mark ignored pixels and cells


def hatch_ignored(rgb: np.ndarray, ignored: np.ndarray, period: int = 8) -> np.ndarray:
    """A copy of an [H, W, 3] uint8 picture with its ignored pixels painted in diagonal grey stripes."""
    rows, cols = np.indices(ignored.shape)
    stripes = np.where((rows + cols) // (period // 2) % 2 == 0, *IGNORED_GREYS).astype(np.uint8)
    out = rgb.copy()
    out[ignored] = stripes[ignored][:, None]
    return out


def target_panels(
    label: Tensor, targets: PyramidTargets, palette: Sequence[Sequence[int]]
) -> list[tuple[str, np.ndarray]]:
    """One sample's ground-truth pyramids (Sec. 3.1) as (title, [H, W, 3] picture) at label size: the
    labels (= the per-pixel targets of level L), the unity targets U^(1..L-1) (white unity, black mix)
    and the semantic targets Y^(1..L-1) (class colours); ignored pixels and cells hatched grey.

    label: [H, W]; targets: of that label as a batch of one."""
    ignore = targets.ignore_index
    levels = targets.num_levels
    strides = level_strides(levels)[:-1]  # the cell levels 1..L-1
    labels = hatch_ignored(colorize(label, palette, ignore), (label == ignore).cpu().numpy())
    panels = [(f"labels = Y{levels} (per pixel)", labels)]
    for level, (unity, stride) in enumerate(zip(targets.unity, strides, strict=True), 1):
        cells = repeat_cells(unity[0], stride).cpu().numpy()
        valid = cells != ignore
        share = (cells == 1).sum() / max(valid.sum(), 1)
        white_unity = np.repeat(np.where(cells == 1, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
        panels.append((f"U{level} (stride {stride}): {share:.0%} unity", hatch_ignored(white_unity, ~valid)))
    for level, (semantic, stride) in enumerate(zip(targets.semantic[:-1], strides, strict=True), 1):
        cells = repeat_cells(semantic[0], stride)
        pictured = hatch_ignored(colorize(cells, palette, ignore), (cells == ignore).cpu().numpy())
        panels.append((f"Y{level} (stride {stride})", pictured))
    return panels


def target_pyramid_figure(
    image: Tensor,
    label: Tensor,
    targets: PyramidTargets,
    palette: Sequence[Sequence[int]],
    class_names: Sequence[str],
    title: str = "",
    max_legend: int = 24,
) -> plt.Figure:
    """One training sample after augmentation: the image, then `target_panels`, and a legend of the
    classes in the labels (the most frequent `max_legend`)."""
    panels = [("image", denormalize(image[None])[0]), *target_panels(label, targets, palette)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 3.2), squeeze=False)
    for ax, (name, picture) in zip(axes[0], panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    present = torch.bincount(label[label != targets.ignore_index].flatten(), minlength=len(class_names))
    shown = [int(index) for index in present.argsort(descending=True) if present[index] > 0][:max_legend]
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.asarray(palette[index]) / 255) for index in shown]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=np.asarray(IGNORED_GREYS[0]).repeat(3) / 255))
    names = [class_names[index] for index in shown] + ["ignored (grey stripes)"]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(names) // 8), 1, 0.95))
    return fig


def statistics_figure(
    class_names: Sequence[str],
    pixel_share: Sequence[float],
    unity_levels: Sequence[str],
    unity_share: Sequence[float],
    title: str = "",
) -> plt.Figure:
    """Bar charts of a split: each class's share of the valid pixels (most frequent first) and the
    share of unity cells among the cells with a valid pixel at each pyramid level."""
    order = np.argsort(pixel_share)[::-1]
    fig, (classes_ax, unity_ax) = plt.subplots(
        2, 1, figsize=(max(8.0, 0.13 * len(class_names)), 7.5), gridspec_kw={"height_ratios": [3, 2]}
    )
    classes_ax.bar(range(len(order)), 100 * np.asarray(pixel_share)[order], color="tab:blue")
    classes_ax.set_xticks(range(len(order)), [class_names[index] for index in order], rotation=90, fontsize=6)
    classes_ax.set_xlim(-0.6, len(order) - 0.4)
    classes_ax.set_ylabel("share of valid pixels (%)")
    classes_ax.set_title(title, fontsize=9)
    if unity_levels:
        unity_ax.bar(unity_levels, 100 * np.asarray(unity_share), color="tab:green")
        unity_ax.set_ylim(0, 100)
        unity_ax.set_ylabel("unity cells (%)")
    else:
        unity_ax.text(0.5, 0.5, "one level: no unity pyramid", ha="center", va="center")
        unity_ax.set_axis_off()
    fig.tight_layout()
    return fig
