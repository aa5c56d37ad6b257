"""A checkpoint as a ready-to-use predictor: the network on its device, its classes, palette, L, tau,
fuse rule, and the data its training run used."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from sfseg.analysis import pixel_levels
from sfseg.data.classes import dataset_palette, palette_for
from sfseg.data.real import training_layout
from sfseg.data.transforms import check_test_scale, val_transform
from sfseg.inference.passes import image_logits, sparse_applies, whole_logits
from sfseg.inference.pixels import InputView, fused_logits
from sfseg.inference.sources import read_model
from sfseg.models import PyramidSegmenter
from sfseg.pyramid import IGNORE_INDEX, FuseRule
from sfseg.visualize import pyramid_figure

if TYPE_CHECKING:  # built through Hydra; importing it would import Lightning into every inference process
    from sfseg.data.datamodule import SegmentationDataModule

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# What a written mask holds per class: its 0-based class id, or the dataset's own label value.
LABEL_IDS = ("class", "raw")


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


@dataclass(frozen=True)
class Prediction:
    """One image's prediction at its own size: class ids and the pyramid level each pixel came from."""

    mask: np.ndarray  # [H, W] int64, 0-based class ids
    level_map: np.ndarray  # [H, W] int64, 0 = coarsest level ... L-1 = finest


@dataclass
class Predictor:
    """A trained Specialize-and-Fuse network in eval mode on `device`, with what its checkpoint says."""

    net: PyramidSegmenter
    class_names: list[str]
    tau: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: str | None = None
    ignore_index: int = IGNORE_INDEX
    palette: list[tuple[int, int, int]] = field(default_factory=list)
    # Per class, the raw id or [r, g, b] colour of the training data's label files (None: not recorded).
    label_values: list[int] | list[list[int]] | None = None
    checkpoint: Path | None = None  # the .ckpt or the model folder it was loaded from
    data_config: DictConfig | None = None  # the checkpoint's training run config, when it has one
    sparse_inference: bool = True  # predict/logits compute each level only where the fuse keeps it
    # The model's hyperparameters as stored (SpecializeAndFuseModule's arguments), for writing it again.
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    # Every image is resized by it before the network and its prediction resized back (data.test_scale).
    test_scale: float = 1.0

    def __post_init__(self) -> None:
        autocast(self.device, self.autocast, key="autocast")  # validates the dtype before any work
        self.test_scale = check_test_scale(self.test_scale, "test_scale")
        # A known dataset's own colours first: a checkpoint recorded the palette of its day.
        self.palette = dataset_palette(self.class_names) or self.palette or palette_for(self.class_names)
        self.net = self.net.to(self.device).eval()
        if self.sparse_inference and not sparse_applies(self.net):
            print(
                f"note: the {self.fuse_rule.label} fuse reads every level at every cell; sparse inference applies "
                "to the hard fuse only, so this model runs dense"
            )
            self.sparse_inference = False

    @property
    def fuse_rule(self) -> FuseRule:
        """The net's fuse rule (model.fuse of its training run)."""
        return self.net.fuse_rule

    @property
    def levels(self) -> int:
        return self.net.num_levels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def autocast_context(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.autocast)

    def view(self, size: tuple[int, int]) -> InputView:
        """How an image of `size` reaches the network (resized by the test scale, padded) and back."""
        return InputView.of(size, self.test_scale, self.net.size_divisor)

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray, fuse_levels: bool = True) -> Prediction:
        """An HxWx3 uint8 RGB image of any size -> its class map and per-pixel level map, at its size
        (the network sees it resized by the test scale, as validation and sfseg.eval do)."""
        normalised = val_transform(pad_divisor=None)(image=rgb)["image"]
        images = torch.from_numpy(normalised.transpose(2, 0, 1)).unsqueeze(0).to(self.device)
        view = self.view(rgb.shape[:2])
        with self.autocast_context():
            logits, level_map = image_logits(
                self.net, view.images(images), self.tau, fuse_levels, self.sparse_inference
            )
        levels = pixel_levels(view.cells(level_map), view.size)
        return Prediction(
            mask=view.restore(logits)[0].argmax(0).cpu().numpy(), level_map=levels[0].cpu().numpy()
        )

    @torch.inference_mode()
    def logits(self, images: Tensor, fuse_levels: bool = True) -> Tensor:
        """Fused logits [B, C, H, W] of a normalised image batch of any size (resized by the test scale,
        padded, and brought back to H x W)."""
        with self.autocast_context():
            return whole_logits(
                self.net,
                images.to(self.device),
                self.tau,
                fuse_levels,
                self.sparse_inference,
                self.test_scale,
            )

    @torch.inference_mode()
    def pyramid_figure(self, images: Tensor, labels: Tensor) -> plt.Figure:
        """The two pyramids, the level map and the fused output of normalised images [B, 3, H, W]
        next to their labels [B, H, W], as the network sees them: resized by the test scale (labels
        nearest); the padding to the size divisor is not drawn."""
        view = self.view(labels.shape[-2:])
        images = view.images(images.to(self.device))
        labels = view.labels(labels.to(self.device), self.ignore_index)
        with self.autocast_context():
            out = self.net(images)
        fused, level_map = fused_logits(out, images.shape[-2:], self.tau, rule=self.fuse_rule)
        crop = view.cells
        return pyramid_figure(
            crop(images),
            crop(labels),
            [crop(logits) for logits in out.semantic],
            [crop(logits) for logits in out.unity],
            crop(level_map),
            crop(fused.argmax(1)),
            self.palette,
            tau=self.tau,
            ignore_index=self.ignore_index,
        )

    def label_ids(self, ids: str = "class", key: str = "ids") -> np.ndarray:
        """The value a mask file holds for each class. `class`: uint8 [C], the 0-based class id; `raw`:
        the training dataset's own label value (ADE20K 1..150 with 0 = other, COCO-Stuff, Pascal-Context
        and Cityscapes by their label tables, a data=folder dataset by its classes file), as their
        benchmarks read them: [C] uint8 or uint16 raw ids, or [C, 3] uint8 colours (label_format=colors)."""
        if ids not in LABEL_IDS:
            raise ValueError(f"{key}={ids!r} is not one of {', '.join(LABEL_IDS)}")
        if ids == "class":
            return np.arange(self.num_classes, dtype=np.uint8)
        if self.label_values is not None:
            values = np.asarray(self.label_values)
            return values.astype(np.uint8 if values.ndim == 2 or values.max() < 256 else np.uint16)
        # No label values recorded (synthetic scenes, or a checkpoint older than the record): the layout
        # of its training data, if any.
        target = self.data_config.data.get("_target_") if self.data_config is not None else None
        layout = training_layout(target, self.class_names)
        if layout is None:
            raise ValueError(
                f"{key}=raw: the checkpoint was not trained on a dataset with its own label ids (ADE20K, "
                f"COCO-Stuff, Pascal-Context, Cityscapes, data=folder); its class ids 0..{self.num_classes - 1} "
                f"are the only ids: use {key}=class"
            )
        return layout.raw_ids()

    def datamodule(self, cfg: DictConfig | None = None) -> SegmentationDataModule:
        """The validation data: `cfg.data` (an eval config), else the checkpoint's training run's."""
        cfg = cfg if cfg is not None else self.run_config()
        return _checkpoint_datamodule(cfg, self)

    def run_config(self) -> DictConfig:
        """The config of the checkpoint's training run."""
        if self.data_config is None:
            raise FileNotFoundError(
                f"the model {self.checkpoint} has no training run config (a checkpoint: no config.yaml beside "
                "its checkpoints/ folder; a model folder: no training_config.yaml); evaluate it with "
                "`python -m sfseg.eval ckpt_path=... data=<name>`"
            )
        return self.data_config

    def training_data(self, changes: Mapping[str, Any]) -> DictConfig:
        """The data config of the checkpoint's training run with `changes` (data.<key> values, e.g. a
        root that moved): what `python -m sfseg.eval` scores without `data=`."""
        data = self.run_config().data
        unknown = sorted(set(changes) - set(data))
        if unknown:
            raise ValueError(
                f"data.{unknown[0]}: the training run's data ({data._target_}) has no such key; "
                f"its keys are {', '.join(key for key in data if key != '_target_')}"
            )
        return OmegaConf.merge(data, changes)


def load(
    ckpt_path: str | Path,
    device: str | torch.device = "auto",
    autocast: str | None = None,
    sparse_inference: bool = True,
) -> Predictor:
    """The Predictor of an sfseg model: a checkpoint (a `make train` / `python -m sfseg.train` .ckpt), a
    model folder (`python -m sfseg.export format=pretrained`) or `hf-hub:<owner>/<name>[@<revision>]`,
    that folder on the Hugging Face Hub (`sfseg.inference.sources`).

    The backbone's pretrained weights are not fetched: the model holds every weight.
    sparse_inference=False computes every level at every cell in `predict` and `logits` (same output).
    """
    device = resolve_device(device, "device") if isinstance(device, str) else torch.device(device)
    stored = read_model(ckpt_path)
    hparams = stored.hparams
    net = PyramidSegmenter.from_hparams(hparams, load_backbone_weights=False)
    try:
        net.load_state_dict(stored.state_dict)
    except RuntimeError as error:  # missing, unexpected or misshapen weights
        raise ValueError(
            f"{stored.weights}: its weights do not fit the model it describes ({error})"
        ) from None
    num_classes = hparams["num_classes"]
    return Predictor(
        net=net,
        class_names=list(hparams.get("class_names") or [str(index) for index in range(num_classes)]),
        tau=float(hparams["tau"]),
        device=device,
        autocast=autocast,
        ignore_index=int(hparams.get("ignore_index", IGNORE_INDEX)),
        palette=[tuple(colour) for colour in hparams.get("palette") or ()],
        label_values=hparams.get("label_values"),
        test_scale=float(hparams.get("test_scale", 1.0)),
        checkpoint=stored.path,
        data_config=stored.run_config,
        sparse_inference=sparse_inference,
        hyper_parameters=dict(hparams),
    )


def _checkpoint_datamodule(cfg: DictConfig, predictor: Predictor) -> SegmentationDataModule:
    """`cfg.data` with the checkpoint's L and ignore index (the data group reads them from `model.*`),
    and unpadded validation images: inference rescales them (multi-scale test), then pads."""
    checkpoint_values = {"levels": predictor.levels, "ignore_index": predictor.ignore_index}
    with open_dict(cfg):
        for key, value in checkpoint_values.items():
            given = cfg.model.get(key)
            if given is not None and given != value:
                raise ValueError(
                    f"model.{key}={given} but the checkpoint was trained with {value}; leave model.{key} "
                    "unset: it is taken from the checkpoint"
                )
            cfg.model[key] = value
    datamodule: SegmentationDataModule = instantiate(cfg.data, val_pad=False)
    if datamodule.num_levels != predictor.levels:
        raise ValueError(
            f"data.num_levels={datamodule.num_levels} but the checkpoint has L={predictor.levels} levels; "
            "leave data.num_levels at its default ${model.levels}"
        )
    if datamodule.num_classes != predictor.num_classes:
        raise ValueError(
            f"data={cfg.data._target_} has {datamodule.num_classes} classes but the checkpoint was trained "
            f"on {predictor.num_classes} ({', '.join(predictor.class_names[:5])}, ...); pick its dataset"
        )
    datamodule.match_network(predictor.net.size_divisor)
    return datamodule
