"""The LightningModule: a timm backbone with the unity and semantic pyramid heads, trained with
relabelled targets (Sec. 3.2, Eq. 1) and evaluated through the fused output (Sec. 3.3, Eq. 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sfseg.inference import Predictor, fused_logits, level_predictions
from sfseg.metrics import PyramidMetrics
from sfseg.models import PyramidOutput, PyramidSegmenter
from sfseg.pyramid import IGNORE_INDEX, RELABEL_POLICIES, pyramid_loss, relabel, unity_logit_threshold
from sfseg.runs import plain

DEFAULT_OPTIMIZER = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "head_lr_mult": 1.0,
}


class SpecializeAndFuseModule(L.LightningModule):
    """Every constructor argument is a plain value (DESIGN 6), so checkpoints load with weights_only."""

    def __init__(
        self,
        num_classes: int,
        backbone: Mapping[str, Any],
        context: Mapping[str, Any],
        relabel: Mapping[str, Any],
        levels: int = 4,
        tau: float = 0.9,
        unity_channels: int = 64,
        semantic_channels: int = 512,
        optimizer: Mapping[str, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        # Plain dicts, not DictConfig, before save_hyperparameters reads the arguments (DESIGN 6).
        backbone, context, relabel, optimizer = (
            plain(backbone),
            plain(context),
            plain(relabel),
            plain(optimizer),
        )
        policy = relabel["policy"]
        if policy not in RELABEL_POLICIES:
            raise ValueError(f"model.relabel.policy={policy!r} is not one of {', '.join(RELABEL_POLICIES)}")
        unity_logit_threshold(tau)  # validates model.tau early
        unknown = set(optimizer or {}) - set(DEFAULT_OPTIMIZER)
        if unknown:
            raise ValueError(
                f"model.optimizer has unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULT_OPTIMIZER)}"
            )
        self.save_hyperparameters()
        self.policy = policy
        self.tau = tau
        self.levels = levels
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.optimizer_config = {**DEFAULT_OPTIMIZER, **(optimizer or {})}
        self.net = PyramidSegmenter.from_hparams(self.hparams)
        self.val_metrics = PyramidMetrics(num_classes, levels, tau, ignore_index)
        self.last_val_scores: dict[str, float] = {}
        self.last_val_per_class: dict[str, list[float]] = {}
        # PyramidMetrics' states (confusion matrices, unity hits, cells per level) of the last validation.
        self.last_val_counts: dict[str, Tensor] = {}

    def forward(self, images: Tensor) -> PyramidOutput:
        return self.net(images)

    def predictor(self, palette: Sequence[tuple[int, int, int]] = ()) -> Predictor:
        """The trained network as a `sfseg.inference.Predictor` (puts it in eval mode)."""
        return Predictor(
            net=self.net,
            class_names=self.class_names,
            tau=self.tau,
            device=self.device,
            ignore_index=self.ignore_index,
            palette=list(palette),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.net(batch["image"])
        targets = relabel(batch["targets"], out.unity, self.policy, self.tau)
        loss = pyramid_loss(out.semantic, out.unity, targets)
        batch_size = batch["image"].shape[0]
        terms = {f"train/ce_level{i}": ce for i, ce in enumerate(loss.ce, start=1)}
        terms.update({f"train/bce_level{i}": bce for i, bce in enumerate(loss.bce, start=1)})
        self._check_finite({"train/loss": loss.total, **terms})
        self.log("train/loss", loss.total, prog_bar=True, batch_size=batch_size)
        self.log_dict(terms, batch_size=batch_size)
        return loss.total

    def _check_finite(self, terms: dict[str, Tensor]) -> None:
        """Stop at the first NaN/inf loss, naming the step and Eq. 1's term; one check per step."""
        values = torch.stack([term.detach().float() for term in terms.values()])
        # Agreed over DDP ranks, so every rank stops at the same step instead of waiting for the others.
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(values).all()), all=True)
        if finite:
            return
        named = dict(zip(terms, values.tolist(), strict=True))
        bad = [f"{name}={value}" for name, value in named.items() if not math.isfinite(value)]
        everything = ", ".join(f"{name}={value:.4g}" for name, value in named.items())
        raise FloatingPointError(
            f"non-finite loss at step {self.global_step}: {', '.join(bad) or 'on another DDP rank'} "
            f"({everything}); lower model.optimizer.lr or check the data"
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Accumulates the split's metrics; returns the fused prediction at label size and the level
        map for callbacks (sfseg.callbacks.WandbPyramidMedia draws them)."""
        out = self.net(batch["image"])
        label = batch["label"]
        targets = batch["targets"]
        loss = pyramid_loss(out.semantic, out.unity, relabel(targets, out.unity, self.policy, self.tau))
        self.log("val/loss", loss.total, batch_size=label.shape[0], sync_dist=True)
        fused, level_map = fused_logits(out, label.shape[-2:], self.tau)
        fused_pred = fused.argmax(1)
        self.val_metrics.update(
            fused_pred=fused_pred,
            level_preds=level_predictions(out, label.shape[-2:]),
            target=label,
            unity_logits=out.unity,
            unity_targets=targets.unity,
            level_map=level_map,
        )
        return {"fused_pred": fused_pred, "level_map": level_map}

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()
        self.last_val_scores = scores
        self.last_val_per_class = self.val_metrics.per_class()
        with self.val_metrics.synced():  # the counts of the whole split, summed over DDP ranks
            self.last_val_counts = {
                name: state.detach().cpu().clone() for name, state in self.val_metrics.metric_state.items()
            }
        self.log_dict({f"val/{name}": value for name, value in scores.items()})
        self.val_metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        backbone_params = list(self.net.backbone.parameters())
        backbone_ids = {id(p) for p in backbone_params}
        head_params = [p for p in self.net.parameters() if id(p) not in backbone_ids]
        optimizer = torch.optim.SGD(
            [
                {"params": backbone_params, "lr": config["lr"]},
                {"params": head_params, "lr": config["lr"] * config["head_lr_mult"]},
            ],
            lr=config["lr"],
            momentum=config["momentum"],
            weight_decay=config["weight_decay"],
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        power = config["poly_power"]

        def poly(step: int) -> float:  # per-iteration poly schedule (Sec. 5.1.1)
            return max(1.0 - step / total_steps, 0.0) ** power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
