"""Every picture sfseg draws: the two pyramids with the level map and the fused output, Table 9 as a
heatmap, Fig. 3's per-class bars, and the colour maps of masks and level maps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle
from PIL import Image
from torch import Tensor

from sfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sfseg.pyramid import IGNORE_INDEX, PyramidTargets, level_strides, repeat_cells, unity_logit_threshold

# Level colours, coarse to fine (level 1 = dark blue ... level L = yellow), as in Fig. 1.
LEVEL_CMAP = "viridis"
# Unity panels: a cell a coarser level already decided is blank (the fuse never reads this level there).
DECIDED_ABOVE_RGB = (255, 255, 255)
# Unity panels: an undecided cell (unity p < tau) is grey, from dark (p = 0) to light (p just below tau);
# never black, so that the darkest level colour stays apart from it.
UNDECIDED_GREYS = (90, 200)


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


def level_palette(num_levels: int) -> list[tuple[int, int, int]]:
    """One RGB colour per level, coarse to fine, from LEVEL_CMAP."""
    cmap = matplotlib.colormaps[LEVEL_CMAP]
    return [
        tuple(round(255 * c) for c in cmap(level / max(num_levels - 1, 1))[:3]) for level in range(num_levels)
    ]


def level_colours(levels: np.ndarray, num_levels: int) -> np.ndarray:
    """A level map [H, W] (0 = coarsest) as RGB uint8 in the level colours of every picture."""
    return colorize(levels, level_palette(num_levels))


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """A coloured mask blended over an RGB image with opacity `alpha`."""
    return ((1 - alpha) * rgb + alpha * mask).round().astype(np.uint8)


def level_legend(num_levels: int) -> list[Patch]:
    """Legend entries of the level colours: "level l (s=stride)"."""
    colours = level_palette(num_levels)
    return [
        Patch(color=np.asarray(colour) / 255, label=f"level {level} (s={stride})")
        for level, (colour, stride) in enumerate(
            zip(colours, level_strides(num_levels), strict=True), start=1
        )
    ]


def unity_decisions(unity_logits: Sequence[Tensor], tau: float) -> list[np.ndarray]:
    """Per unity level, RGB [B, h_l, w_l, 3] of the fuse's decision at tau (Eq. 2): the level's colour
    where this level is the coarsest with unity >= tau, white where a coarser level already decided,
    and a grey ramp (dark = unity 0, light = just below tau) where the cell stays mixed."""
    threshold = unity_logit_threshold(tau)
    colours = level_palette(len(unity_logits) + 1)
    pictures = []
    above: Tensor | None = None  # decided by a coarser level, at the previous level's resolution
    for level, logits in enumerate(unity_logits):
        logits = logits.detach().float().cpu()
        if above is not None:
            # ceil and cut: maps cut to an image's cells (InputView.cells) may end in part of a coarse cell
            factor = -(-logits.shape[-1] // above.shape[-1])
            above = repeat_cells(above, factor)[..., : logits.shape[-2], : logits.shape[-1]]
        else:
            above = torch.zeros_like(logits, dtype=torch.bool)
        here = (logits >= threshold) & ~above
        darkest, lightest = UNDECIDED_GREYS
        grey = darkest + (torch.sigmoid(logits) / tau).clamp(max=1) * (lightest - darkest)
        rgb = grey.round().to(torch.uint8).unsqueeze(-1).repeat(1, 1, 1, 3)
        rgb[here] = torch.tensor(colours[level], dtype=torch.uint8)
        rgb[above] = torch.tensor(DECIDED_ABOVE_RGB, dtype=torch.uint8)
        pictures.append(rgb.numpy())
        above = above | here
    return pictures


def pyramid_figure(
    images: Tensor,
    labels: Tensor,
    semantic_logits: list[Tensor],
    unity_logits: list[Tensor],
    level_map: Tensor,
    fused_pred: Tensor,
    palette: Sequence[Sequence[int]],
    tau: float = 0.9,
    ignore_index: int = IGNORE_INDEX,
) -> plt.Figure:
    """One row per image: image, ground truth, U^(1..L-1) as the fuse's decision at tau, Y^(1..L),
    level map, fused prediction; a legend of the level colours and of the unity panels below."""
    levels = len(semantic_logits)
    titles = ["image", "ground truth"]
    titles += [f"unity U{level} at τ={tau:g}" for level in range(1, levels)]
    titles += [f"semantic Y{level}" for level in range(1, levels + 1)]
    titles += ["level map", "fused"]
    rows, cols = images.shape[0], len(titles)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + 0.4), squeeze=False)
    rgb = denormalize(images)
    decisions = unity_decisions(unity_logits, tau)
    level_cmap = ListedColormap(np.asarray(level_palette(levels)) / 255)
    for row in range(rows):
        panels: list[tuple[np.ndarray, dict]] = [
            (rgb[row], {}),
            (colorize(labels[row], palette, ignore_index), {}),
        ]
        panels += [(decision[row], {}) for decision in decisions]
        panels += [(colorize(y[row].argmax(0), palette), {}) for y in semantic_logits]
        panels.append(
            (level_map[row].cpu().numpy(), {"cmap": level_cmap, "vmin": -0.5, "vmax": levels - 0.5})
        )
        panels.append((colorize(fused_pred[row], palette), {}))
        for col, (picture, style) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(picture, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
    handles = level_legend(levels)
    if levels > 1:
        handles += [
            Patch(
                facecolor=np.asarray(DECIDED_ABOVE_RGB) / 255,
                edgecolor="black",
                label="unity: decided by a coarser level",
            ),
            Patch(color=np.full(3, UNDECIDED_GREYS[0] / 255), label="unity: mixed (< τ), p = 0"),
            Patch(color=np.full(3, UNDECIDED_GREYS[1] / 255), label="unity: mixed, p just below τ"),
        ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / (1.7 * rows + 0.4), 1, 1))
    return fig


def percent(value: float | None) -> float:
    """A fraction as percent; NaN for a missing score (null in the JSON files)."""
    return math.nan if value is None else 100 * value


def table9_figure(specialization: Mapping[str, Any]) -> plt.Figure:
    """Table 9 as a heatmap: rows l' (whose prediction is scored), columns l (the level the fused map
    took the pixels from), mIoU in percent; the diagonal is outlined."""
    matrix = np.array([[percent(value) for value in row] for row in specialization["table9"]["miou"]])
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


def fig3_figure(specialization: Mapping[str, Any]) -> plt.Figure:
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
        values = np.array([percent(row[name]) for name in classes])
        ax.bar(range(len(classes)), values, color=np.where(values > 0, "tab:green", "tab:red"))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{level_name}\n- fused", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    axes[0, 0].set_title("Fig. 3: IoU of each level minus the fused IoU (percentage points)", fontsize=10)
    fig.tight_layout()
    return fig


def arms_figure(
    per_class: Mapping[str, Mapping[str, Sequence[float]]],
    curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]],
    highlighted: Sequence[str] = (),
    title: str = "",
) -> plt.Figure:
    """Arms of a sweep side by side (e.g. L=1 and L=4): per class, the fused IoU of each arm as a bar at
    the mean over seeds with the spread (sample standard deviation) as an error bar, the `highlighted`
    classes' names in bold (left); each job's val mIoU over the training steps, one line per seed (right).
    per_class: arm -> class -> IoU per seed (percent, NaN where absent); curves: arm -> [(steps, mIoU %)]."""
    arms = list(per_class)
    classes = list(next(iter(per_class.values())))
    colours = plt.get_cmap("tab10")
    fig, (bars_ax, curve_ax) = plt.subplots(
        1, 2, figsize=(0.55 * len(classes) * len(arms) / 2 + 7.5, 4.4), gridspec_kw={"width_ratios": [2, 1]}
    )
    width = 0.8 / len(arms)
    for index, arm in enumerate(arms):
        values = [np.asarray(per_class[arm][name], dtype=float) for name in classes]
        means = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in values]
        spreads = [np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else 0.0 for v in values]
        positions = np.arange(len(classes)) + (index - (len(arms) - 1) / 2) * width
        bars_ax.bar(positions, means, width, yerr=spreads, capsize=2, label=arm, color=colours(index))
    bars_ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    for label in bars_ax.get_xticklabels():
        label.set_fontweight("bold" if label.get_text() in highlighted else "normal")
    bars_ax.set_ylabel("IoU (%), mean ± spread over seeds")
    bars_ax.set_ylim(0, 100)
    bars_ax.legend(fontsize=8)
    for index, arm in enumerate(arms):
        for number, (steps, values) in enumerate(curves.get(arm, ())):
            curve_ax.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                color=colours(index),
                label=arm if number == 0 else None,
            )
    curve_ax.set_xlabel("training step")
    curve_ax.set_ylabel("val mIoU (%), fused")
    curve_ax.set_title("validation during training, one line per seed", fontsize=9)
    curve_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
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


def tau_sweep_figure(rows: Sequence[Mapping[str, float]], checkpoint_tau: float) -> plt.Figure:
    """The tau trade-off of one checkpoint: fused mIoU against the labels the fused map needs per image
    (left) and against the share of finest cells taken from coarser levels (right), one point per tau,
    the checkpoint's own tau starred. Lower tau: coarse levels claim more cells, fewer labels."""
    levels = sum(key.startswith("share_level") for key in rows[0])
    miou = np.array([percent(row["mIoU"]) for row in rows])
    axes_values = (
        ("labels needed per image", np.array([row["labels_per_image"] for row in rows])),
        (
            "finest cells taken from coarser levels (%)",
            np.array([100 * (1 - row[f"share_level{levels}"]) for row in rows]),
        ),
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (label, values) in zip(axes, axes_values, strict=True):
        ax.plot(values, miou, marker="o", color="tab:blue")
        for row, x, y in zip(rows, values, miou, strict=True):
            ax.annotate(f"τ={row['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        mine = [index for index, row in enumerate(rows) if row["tau"] == checkpoint_tau]
        ax.scatter(
            values[mine],
            miou[mine],
            marker="*",
            s=220,
            color="tab:red",
            zorder=3,
            label=f"the checkpoint's τ={checkpoint_tau:g}",
        )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fused mIoU (%)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("The τ trade-off: accuracy against parsimony, from one network pass per image", fontsize=10)
    fig.tight_layout()
    return fig


def unity_calibration_figure(calibration: Mapping[str, Any]) -> plt.Figure:
    """Reliability diagrams of the unity pyramid, one column per unity level: per bin of predicted unity
    probability, the observed share of true unity cells (bars) against the diagonal of a calibrated
    predictor, the bin's mean prediction (dots), tau (dashed) and the ECE; below, how the cells spread
    over the bins. Bars under the diagonal: the level claims unity more often than it holds."""
    levels = calibration["levels"]
    edges = np.asarray(calibration["bin_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig, axes = plt.subplots(
        2,
        max(len(levels), 1),
        figsize=(3.2 * max(len(levels), 1), 4.6),
        squeeze=False,
        gridspec_kw={"height_ratios": (3, 1)},
        sharex=True,
    )
    if not levels:
        axes[0, 0].text(0.5, 0.5, "L=1: no unity pyramid", ha="center", va="center")
    colours = level_palette(len(levels) + 1)
    for column, (name, level) in enumerate(levels.items()):
        top, bottom = axes[0, column], axes[1, column]
        colour = np.asarray(colours[column]) / 255
        observed = np.array([math.nan if value is None else value for value in level["observed"]])
        predicted = np.array([math.nan if value is None else value for value in level["mean_predicted"]])
        top.bar(
            centres,
            np.nan_to_num(observed),
            width=width,
            color=colour,
            alpha=0.7,
            edgecolor="black",
            linewidth=0.5,
            label="observed unity share",
        )
        top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
        top.plot(predicted, observed, "o", color="black", markersize=3, label="mean prediction")
        top.axvline(
            calibration["tau"],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"τ={calibration['tau']:g}",
        )
        ece = level["ece"]
        ece_text = "-" if ece is None or math.isnan(ece) else f"{100 * ece:.1f}%"
        top.set_title(
            f"unity, level {name.removeprefix('level')} (s={level['stride']}): ECE {ece_text}", fontsize=9
        )
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        cells = np.asarray(level["cells"], dtype=float)
        bottom.bar(
            centres, cells / max(cells.sum(), 1), width=width, color=colour, edgecolor="black", linewidth=0.5
        )
        bottom.set_xlabel("predicted unity probability", fontsize=8)
    axes[0, 0].set_ylabel("share of true unity cells")
    axes[1, 0].set_ylabel("share of cells")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return fig


def mask_image(mask: np.ndarray, ids: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A class map [H, W] as a mask file holding ids[class] per pixel: a palette image of 8-bit ids
    (`palette_image`), a 16-bit greyscale image of larger raw ids, or an RGB image when `ids` are the
    dataset's colours [C, 3]."""
    if ids.ndim == 2 or ids.dtype == np.uint16:
        return Image.fromarray(ids[mask])
    return palette_image(mask, ids, palette)


def palette_image(mask: np.ndarray, ids: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A class map [H, W] as a palette ("P") image: each pixel holds ids[class] (the class id itself or
    the dataset's raw id), and palette entry ids[k] is class k's colour, every other entry black, so
    that viewers show the coloured mask and tools read the ids."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[ids] = np.asarray(palette, dtype=np.uint8)[: len(ids)]
    image = Image.fromarray(ids[mask].astype(np.uint8))
    image.putpalette(colours.flatten().tolist())  # an "L" image with a palette becomes "P"
    return image
