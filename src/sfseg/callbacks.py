"""Lightning callbacks: the resumable last checkpoint, the W&B pictures and tables of the pyramids, and
where a training step's time goes."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from sfseg.analysis import pixel_levels
from sfseg.module import SpecializeAndFuseModule
from sfseg.pyramid import level_strides
from sfseg.runs import LAST_CHECKPOINT, write_json
from sfseg.visualize import denormalize


class LastCheckpoint(L.Callback):
    """Keeps `<dirpath>/last.ckpt` current, for `ckpt_path=last`: every `every_n_train_steps` optimizer
    steps, at the end of training, and when the run gets SIGTERM (Lightning then stops at the next batch
    boundary, so the checkpoint loses no step). A SIGKILL loses the steps since the last multiple of
    `every_n_train_steps`. Lightning writes checkpoints through a temporary file, so a kill during a
    save leaves the previous last.ckpt whole."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 100) -> None:
        if every_n_train_steps < 1:
            raise ValueError(
                f"callbacks.last_checkpoint.every_n_train_steps must be >= 1, got {every_n_train_steps}"
            )
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Only SIGTERM: after any other error (a non-finite loss, say) the state is not worth resuming.
        if isinstance(exception, SIGTERMException):
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            self._saved_step = trainer.global_step


class StepTimes(L.Callback):
    """Where the training time goes (`sfseg.gpu_check`'s training stage; any run can add it with
    `+callbacks.step_times._target_=sfseg.callbacks.StepTimes +callbacks.step_times.path=<file>`).

    Per optimizer step: `data_s`, the seconds from the end of the previous step to the start of this one
    (the loader's next batch, its move to the device and its pyramid targets), `step_s`, the step itself
    (forward, loss, backward, optimizer), and its loss. Written as JSON at the end of fit, with the peak
    memory. The device is synchronised at both ends of every step so that the split is real.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.steps: list[dict[str, float]] = []
        self._mark = 0.0
        self._data_s = 0.0

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.steps = []
        self._mark = self._now(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = self._now(pl_module)
        self._data_s, self._mark = now - self._mark, now

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._now(pl_module)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(
            {
                "data_s": self._data_s,
                "step_s": now - self._mark,
                "loss": float(loss),
                "batch": len(batch["image"]),
            }
        )
        self._mark = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        device = pl_module.device
        if device.type == "cuda":
            memory = {
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "memory_method": ("torch.cuda.max_memory_allocated over fit"),
            }
        else:  # ru_maxrss: kB on Linux
            memory = {
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
                "memory_method": "peak resident memory of the training process (ru_maxrss)",
            }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            self.path,
            {"device": str(device), "precision": str(trainer.precision), **memory, "steps": self.steps},
        )


class WandbPyramidMedia(L.Callback):
    """What a scalar logger cannot show, on W&B: after each validation, the first `num_images` val images
    with the ground truth, the fused prediction and the level map (which pyramid level each pixel takes
    its label from) as mask overlays, the per-class IoU table, and `run.summary["best/mIoU"]`.

    Works with any set of loggers and does nothing without a WandbLogger; only rank 0 logs.
    """

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = num_images
        self.best_miou = -math.inf
        self.best_step = -1
        self._images: list[Any] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: SpecializeAndFuseModule) -> None:
        self._images = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: SpecializeAndFuseModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        missing = self.num_images - len(self._images)
        if missing <= 0 or not isinstance(outputs, dict) or self._wandb_logger(trainer) is None:
            return
        for index in range(min(missing, batch["image"].shape[0])):
            self._images.append(
                self._overlay(
                    pl_module,
                    batch["image"][index],
                    batch["label"][index],
                    outputs["fused_pred"][index],
                    outputs["level_map"][index],
                )
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: SpecializeAndFuseModule) -> None:
        logger = self._wandb_logger(trainer)
        if logger is None:
            return
        import wandb

        per_class = pl_module.last_val_per_class
        rows = [
            [name, _finite_or_none(iou), _finite_or_none(acc)]
            for name, iou, acc in zip(pl_module.class_names, per_class["iou"], per_class["acc"], strict=True)
        ]
        media: dict[str, Any] = {
            "val/per_class_iou": wandb.Table(columns=["class", "IoU", "accuracy"], data=rows)
        }
        if self._images:
            media["val/examples"] = self._images
        logger.log_metrics(media, step=trainer.global_step)

        score = trainer.callback_metrics.get("val/mIoU")
        fitting = trainer.state.fn == TrainerFn.FITTING  # not the final validation of the best checkpoint
        if fitting and score is not None and float(score) > self.best_miou:
            self.best_miou, self.best_step = float(score), trainer.global_step
        if self.best_step >= 0:
            logger.experiment.summary["best/mIoU"] = self.best_miou
            logger.experiment.summary["best/step"] = self.best_step

    # The best score travels in the checkpoint, so a resumed run keeps the best of its earlier part.
    def state_dict(self) -> dict[str, Any]:
        return {"best_miou": self.best_miou, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_miou = state_dict["best_miou"]
        self.best_step = state_dict["best_step"]

    @staticmethod
    def _wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return None
        return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)

    @staticmethod
    def _overlay(
        pl_module: SpecializeAndFuseModule, image: Tensor, label: Tensor, fused: Tensor, level_map: Tensor
    ) -> Any:
        import wandb

        ignore_index = pl_module.ignore_index
        class_labels = dict(enumerate(pl_module.class_names))
        class_labels[ignore_index] = "ignore"
        # level_map holds 0..L-1 (coarse to fine) per finest cell; one value per pixel for the overlay.
        level_pixels = pixel_levels(level_map[None], label.shape[-2:])[0]
        strides = level_strides(pl_module.levels)
        level_labels = {index: f"level {index + 1} (stride {stride})" for index, stride in enumerate(strides)}
        return wandb.Image(
            denormalize(image[None])[0],
            masks={
                "ground_truth": {"mask_data": _mask(label), "class_labels": class_labels},
                "prediction": {"mask_data": _mask(fused), "class_labels": class_labels},
                "level_map": {"mask_data": _mask(level_pixels), "class_labels": level_labels},
            },
        )


def _mask(values: Tensor) -> np.ndarray:
    return values.to(torch.int64).cpu().numpy()


def _finite_or_none(value: float) -> float | None:
    """NaN (a class absent from the split) as an empty table cell."""
    return None if math.isnan(value) else value
