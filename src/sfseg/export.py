"""Export entry point: `python -m sfseg.export ckpt_path=<ckpt> [format=onnx|torchscript|pretrained] [size=[H,W]] [dynamic=true]`.

format=pretrained writes a model folder that others load with one line, `sfseg.inference.load(<folder>)`
or `load("hf-hub:<owner>/<name>")` once uploaded (`sfseg.inference.pretrained`): model.safetensors,
config.json (the model's config, class names, palette), training_config.yaml, metrics.json and a model
card README.md. The other formats:

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
from sfseg.inference import (
    EXPORT_FORMATS,
    ExportedModel,
    Predictor,
    export_model,
    export_pretrained,
    export_size,
    load,
    results_folder,
)
from sfseg.pyramid import check_tau

PRETRAINED = "pretrained"  # a model folder (safetensors, config, model card), not a graph
FORMATS = (*EXPORT_FORMATS, PRETRAINED)


def default_output(ckpt_path: str, format: str, size: Sequence[int], dynamic: bool) -> Path:
    """`<training run folder>/export/model_<H>x<W>` (or `model_dynamic`) with the format's suffix, or
    `pretrained/` for format=pretrained; a model folder or hub id: its `results_folder` instead of the run's."""
    if format == PRETRAINED:
        return results_folder(ckpt_path) / "export" / PRETRAINED
    name = "model_dynamic" if dynamic else f"model_{size[0]}x{size[1]}"
    return results_folder(ckpt_path) / "export" / (name + EXPORT_FORMATS[format])


def run(cfg: DictConfig) -> ExportedModel | Path:
    """Export `cfg.ckpt_path` as `cfg.format`; print and return what was written (a model folder for
    format=pretrained)."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    predictor = load(cfg.ckpt_path, device="cpu")
    checkpoint_tau = predictor.tau
    if cfg.tau is not None:
        predictor.tau = check_tau(cfg.tau, "tau")
    if cfg.format == PRETRAINED:
        return write_model_folder(cfg, predictor, checkpoint_tau)
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
    if predictor.test_scale != 1.0:
        print(
            f"note: the model was trained for images resized by its test scale {predictor.test_scale:g} "
            "(data.test_scale); the exported graph maps the pixels it is given, so resize images by that "
            "factor before it, as sfseg.predict does, and its mask back"
        )
    return exported


def write_model_folder(cfg: DictConfig, predictor: Predictor, checkpoint_tau: float) -> Path:
    """format=pretrained: write the model folder, print its files and how to load it; return it."""
    folder = (
        Path(cfg.output).expanduser() if cfg.output else default_output(cfg.ckpt_path, PRETRAINED, (), False)
    )
    written = export_pretrained(predictor, folder)
    print(f"\nexported the model folder {folder}:")
    for path in written:
        print(f"  {path.name:<22} {path.stat().st_size / 2**20:8.2f} MiB")
    tau = (
        "the checkpoint's"
        if predictor.tau == checkpoint_tau
        else f"given; the checkpoint's is {checkpoint_tau}"
    )
    print(f"{predictor.fuse_rule.label} fuse, tau={predictor.tau:g} ({tau}), L={predictor.levels} levels")
    print(
        f"load it with sfseg.inference.load({str(folder)!r}), or upload it to the Hugging Face Hub and "
        'load("hf-hub:<owner>/<name>") (docs/export.md)'
    )
    return folder


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
