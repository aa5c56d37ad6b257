"""A checkpoint as one self-contained model file (ONNX or TorchScript) that maps pixels to class ids:
the ImageNet normalisation, the network, the fuse (the checkpoint's rule: Eq. 2 with tau baked in, or
the soft or learned fuse), the bilinear upsampling to the input size and the argmax are all inside the
graph.

    image      float32 [N, 3, H, W], RGB in 0..255; H and W multiples of the model's size divisor
    mask       int64 [N, H, W], 0-based class ids
    level_map  int64 [N, H/4, W/4], the pyramid level each finest cell was taken from (0 = coarsest)

The graph is `DeployedSegmenter`, which runs the library's own `fused_logits`, so the exported model
and `Predictor.predict` share one code path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, size_pair
from sfseg.inference.loading import Predictor
from sfseg.inference.pixels import fused_logits, round_up
from sfseg.models import PyramidSegmenter
from sfseg.pyramid import FINEST_STRIDE

if TYPE_CHECKING:
    import onnx

EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME = "image"
OUTPUT_NAMES = ("mask", "level_map")


class DeployedSegmenter(nn.Module):
    """RGB images in 0..255 [N, 3, H, W] -> (mask [N, H, W], level_map [N, H/4, W/4]), both int64."""

    def __init__(self, net: PyramidSegmenter, tau: float) -> None:
        super().__init__()
        self.net = net
        self.tau = tau
        # (x - 255 mean) * 1 / (255 std) in float32 is how val_transform's Normalize computes it, so the
        # exported model sees the same normalised pixels as Predictor.predict, to the bit.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.register_buffer("offset", mean, persistent=False)
        self.register_buffer(
            "scale", 1 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255), persistent=False
        )

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        images = (image - self.offset) * self.scale
        logits, level_map = fused_logits(
            self.net(images), images.shape[-2:], self.tau, rule=self.net.fuse_rule
        )
        return logits.argmax(1), level_map


@dataclass(frozen=True)
class ExportedModel:
    """What an export wrote: the file, its format, the ONNX opset (None for TorchScript), the input and
    outputs as (name, dtype, shape) with named free dimensions, and the size in bytes on disk."""

    path: Path
    format: str
    opset: int | None
    inputs: list[tuple[str, str, list[int | str]]]
    outputs: list[tuple[str, str, list[int | str]]]
    size_bytes: int

    def describe(self) -> str:
        opset = f", opset {self.opset}" if self.opset is not None else ""
        lines = [f"{self.path} ({self.format}{opset}, {self.size_bytes / 2**20:.1f} MiB)"]
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines += [
                f"  {kind:<6}  {name:<9}  {dtype:<7}  [{', '.join(map(str, shape))}]"
                for name, dtype, shape in tensors
            ]
        return "\n".join(lines)


def export_size(size: int | Sequence[int], divisor: int) -> tuple[int, int]:
    """The export's example size (H, W), each a multiple of the model's size divisor."""
    height, width = size_pair(size, "size")
    if height % divisor or width % divisor:
        raise ValueError(
            f"size=[{height}, {width}] must be a multiple of the model's size divisor {divisor} on both sides "
            f"(the coarsest pyramid stride and the backbone's); e.g. size=[{round_up(height, divisor)}, "
            f"{round_up(width, divisor)}]"
        )
    return height, width


def check_dynamic_export(net: PyramidSegmenter, height: int, width: int) -> None:
    """Refuse, before the slow export, an example size from which an ONNX graph with free height and
    width would hold at that size only (`Backbone.dynamic_export_size`)."""
    needed = tuple(
        round_up(side, net.size_divisor) for side in net.backbone.dynamic_export_size(height, width)
    )
    if needed != (height, width):
        raise ValueError(
            f"dynamic=true from the example size=[{height}, {width}]: backbone {net.backbone.name!r} has "
            "shifted-window attention (as Swin), and where a block's input spans a single window at the "
            "example the ONNX export fixes that block's mask (onnxruntime then fails at other sizes). "
            f"Export from an example of at least size=[{needed[0]}, {needed[1]}], or at a fixed size=[H,W] "
            "with dynamic=false"
        )


def export_model(
    predictor: Predictor,
    path: str | Path,
    format: str = "onnx",
    size: int | Sequence[int] = 512,
    dynamic: bool = False,
    opset: int | None = None,
) -> ExportedModel:
    """Write the predictor's network, its fuse rule (at `predictor.tau`) included, as ONNX or TorchScript. The
    export runs on the CPU: the predictor's network is moved there.

    size: the example input [H, W]; the model's fixed input size unless `dynamic`, which leaves the batch,
    the height and the width free (ONNX; a TorchScript trace follows its input's size either way).
    opset: the ONNX opset (None: the exporter's default).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    height, width = export_size(size, predictor.net.size_divisor)
    if format == "onnx" and dynamic:
        check_dynamic_export(predictor.net, height, width)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = DeployedSegmenter(predictor.net, predictor.tau).to("cpu").eval()
    # torch.export treats a dimension of size 1 as fixed, so a free batch needs an example of 2.
    example = (
        torch.rand(2 if dynamic else 1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    )
    if format == "onnx":
        return _export_onnx(model, example, path, dynamic, opset, predictor.net.size_divisor)
    return _export_torchscript(model, example, path)


def _export_onnx(
    model: DeployedSegmenter, example: Tensor, path: Path, dynamic: bool, opset: int | None, divisor: int
) -> ExportedModel:
    dynamic_shapes = None
    if dynamic:
        # H and W as multiples of the divisor: the graph's shapes stay exact multiples of the input size.
        batch = torch.export.Dim("batch", min=1)
        rows, cols = torch.export.Dim("rows", min=1), torch.export.Dim("cols", min=1)
        dynamic_shapes = {INPUT_NAME: {0: batch, 2: divisor * rows, 3: divisor * cols}}
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
        )
    program.save(str(path))
    import onnx  # here, not at the top: it takes half a second to import, which no other command needs

    proto = onnx.load(str(path), load_external_data=False)
    if dynamic:
        _name_free_dimensions(proto)
        onnx.save(proto, str(path))

    opset_version = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    files = [path, *path.parent.glob(f"{path.name}.data")]  # weights beyond 2 GB go to a .data file
    return ExportedModel(
        path=path,
        format="onnx",
        opset=opset_version,
        inputs=_described(proto.graph.input),
        outputs=_described(proto.graph.output),
        size_bytes=sum(file.stat().st_size for file in files),
    )


def _described(values: Sequence[onnx.ValueInfoProto]) -> list[tuple[str, str, list[int | str]]]:
    """(name, dtype, shape) of graph inputs or outputs; a free dimension by its name."""
    import onnx

    return [
        (
            value.name,
            onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
            [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim],
        )
        for value in values
    ]


def _name_free_dimensions(proto: onnx.ModelProto) -> None:
    """Call the free dimensions batch, height, width, height/4 and width/4 instead of the exporter's
    symbol expressions (e.g. s40, 32*s39, 8*s94), wherever the graph records them."""
    graph = proto.graph
    (image,), (mask, level_map) = graph.input, graph.output
    positions = [
        (image, 0, "batch"),
        (image, 2, "height"),
        (image, 3, "width"),
        (mask, 1, "height"),
        (mask, 2, "width"),
        (level_map, 1, f"height/{FINEST_STRIDE}"),
        (level_map, 2, f"width/{FINEST_STRIDE}"),
    ]
    names = {value.type.tensor_type.shape.dim[axis].dim_param: name for value, axis, name in positions}
    names.pop("", None)  # a fixed dimension has no symbol
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def _export_torchscript(model: DeployedSegmenter, example: Tensor, path: Path) -> ExportedModel:
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python conditions on sizes (the segmenter's divisibility check, "same
        # size?" before upsampling); they hold for every input size the model accepts.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
    traced.save(str(path))
    free = ["batch", 3, "height", "width"]
    return ExportedModel(
        path=path,
        format="torchscript",
        opset=None,
        inputs=[(INPUT_NAME, "float32", free)],
        outputs=[
            ("mask", "int64", ["batch", "height", "width"]),
            ("level_map", "int64", ["batch", f"height/{FINEST_STRIDE}", f"width/{FINEST_STRIDE}"]),
        ],
        size_bytes=path.stat().st_size,
    )
