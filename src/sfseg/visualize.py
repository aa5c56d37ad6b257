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
from sfseg.pyramid import IGNORE_INDEX

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
