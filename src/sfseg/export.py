"""Export entry point: `python -m sfseg.export ckpt_path=<ckpt> [format=onnx|torchscript] [size=[H,W]] [dynamic=true]`.

Writes one model file with input `image` (float32 RGB in 0..255, [N, 3, H, W]) and outputs `mask`
(int64 class ids [N, H, W]) and `level_map` (int64 [N, H/4, W/4], 0 = coarsest level): the ImageNet
normalisation, the network, the checkpoint's fuse rule (Eq. 2 with the checkpoint's tau or `tau=`; the
soft or learned fuse), the bilinear upsampling and the argmax are inside the graph (`sfseg.inference.deployment`). Prints the file, its
size, the ONNX opset and the input and outputs with their shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from sfseg.cli import hydra_main
from sfseg.inference import EXPORT_FORMATS, ExportedModel, export_model, export_size, load
from sfseg.pyramid import check_tau
from sfseg.runs import checkpoint_run_folder


def default_output(ckpt_path: str, format: str, size: Sequence[int], dynamic: bool) -> Path:
    """`<training run folder>/export/model_<H>x<W>` (or `model_dynamic`) with the format's suffix."""
    name = "model_dynamic" if dynamic else f"model_{size[0]}x{size[1]}"
    return checkpoint_run_folder(ckpt_path) / "export" / (name + EXPORT_FORMATS[format])


def run(cfg: DictConfig) -> ExportedModel:
    """Export `cfg.ckpt_path` as `cfg.format`; print and return what was written."""
    if cfg.format not in EXPORT_FORMATS:
        raise ValueError(f"format={cfg.format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    predictor = load(cfg.ckpt_path, device="cpu")
    checkpoint_tau = predictor.tau
    if cfg.tau is not None:
        predictor.tau = check_tau(cfg.tau, "tau")
    size = export_size(cfg.size, predictor.net.size_divisor)  # before the slow part
    output = (
        Path(cfg.output).expanduser()
        if cfg.output
        else default_output(cfg.ckpt_path, cfg.format, size, cfg.dynamic)
    )
    exported = export_model(predictor, output, cfg.format, size, cfg.dynamic, cfg.opset)
    source = (
        "the checkpoint's"
        if predictor.tau == checkpoint_tau
        else f"given; the checkpoint's is {checkpoint_tau}"
    )
    print(f"\nexported {exported.describe()}")
    print(
        f"{predictor.fuse_rule.label} fuse, tau={predictor.tau:g} ({source}), L={predictor.levels} levels, {predictor.num_classes} classes, "
        f"H and W multiples of {predictor.net.size_divisor}"
        + ("" if cfg.dynamic or cfg.format == "torchscript" else f", fixed size {size[0]}x{size[1]}")
    )
    return exported


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
