"""The LightningModule: a timm backbone with the unity and semantic pyramid heads, trained with
relabelled targets (Sec. 3.2, Eq. 1) and evaluated through the fused output (Sec. 3.3, Eq. 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sfseg.data.transforms import check_test_scale
from sfseg.inference import (
    InputView,
    Predictor,
    compared_rules,
    fused_logits,
    level_predictions,
    rule_predictions,
)
from sfseg.metrics import PyramidMetrics
from sfseg.models import PyramidOutput, PyramidSegmenter
from sfseg.models.segmenter import fuse_config
from sfseg.pyramid import (
    IGNORE_INDEX,
    RELABEL_POLICIES,
    SEMANTIC_LOSSES,
    FuseRule,
    Ohem,
    PyramidLoss,
    PyramidTargets,
    build_targets,
    fuse,
    pyramid_loss,
    relabel,
    semantic_ce,
    unity_logit_threshold,
)
from sfseg.runs import plain

DEFAULT_OPTIMIZER = {
    "name": "sgd",
    "lr": 0.01,
    "momentum": 0.9,  # SGD's
    "betas": (0.9, 0.999),  # AdamW's
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "head_lr_mult": 1.0,
    "warmup_steps": 0,
    "warmup_ratio": 1e-6,
}
OPTIMIZERS = ("sgd", "adamw")
# HRNet-OCR's LOSS.BALANCE_WEIGHTS [0.4, 1]: the weight of its auxiliary head's CE (model.context.aux_weight).
OCR_AUX_WEIGHT = 0.4


# model.loss.class_weights computed from the training split by sfseg.builder before the module is built:
# SegNet's median frequency balancing, and its square root (milder: on CamVid the full weights make the
# small classes over-predicted, docs/real/camvid.md): each method's power of SegNet's weights.
CLASS_WEIGHT_POWERS = {"median_frequency": 1.0, "sqrt_median_frequency": 0.5}
CLASS_WEIGHT_METHODS = tuple(CLASS_WEIGHT_POWERS)
LOSS_KEYS = {"ce": set(), "ohem": {"thresh", "min_kept"}}
WEIGHT_KEYS = {"class_weights", "level_weights"}


@dataclass(frozen=True)
class LossSettings:
    """model.loss as Eq. 1's criterion: `ohem` (HRNet-OCR's config) or plain CE (None: the paper's
    text) on every semantic CE term, each term weighted by class (`class_weights`, [C]) and the L terms
    by level (`level_weights`, [L]); None: unweighted, as Eq. 1."""

    ohem: Ohem | None = None
    class_weights: tuple[float, ...] | None = None
    level_weights: tuple[float, ...] | None = None


def loss_settings(config: Mapping[str, Any] | None, num_classes: int, levels: int) -> LossSettings:
    """model.loss checked: `name` ce or ohem (with thresh, min_kept); `class_weights` null or C numbers
    >= 0 (median_frequency is turned into them by sfseg.builder from the train split); `level_weights`
    null or L numbers >= 0 with a positive sum."""
    config = dict(config or {"name": "ce"})
    name = config.pop("name", None)
    if name not in SEMANTIC_LOSSES:
        raise ValueError(f"model.loss.name={name!r} is not one of {', '.join(SEMANTIC_LOSSES)}")
    allowed = LOSS_KEYS[name] | WEIGHT_KEYS
    if set(config) - allowed:
        raise ValueError(
            f"model.loss has unknown keys {sorted(set(config) - allowed)} for model.loss.name={name}; "
            f"allowed: {sorted(allowed)}"
        )
    class_weights, level_weights = config.pop("class_weights", None), config.pop("level_weights", None)
    if class_weights in CLASS_WEIGHT_METHODS:
        raise ValueError(
            f"model.loss.class_weights={class_weights} is computed from the train split when a run starts "
            "(sfseg.builder.build); a module built without it needs the weights themselves"
        )
    if isinstance(class_weights, str):
        raise ValueError(
            f"model.loss.class_weights={class_weights!r} is not one of null, {', '.join(CLASS_WEIGHT_METHODS)} "
            f"or a list of {num_classes} weights"
        )
    return LossSettings(
        ohem=Ohem(**config) if name == "ohem" else None,
        class_weights=weight_list(class_weights, num_classes, "model.loss.class_weights", "classes"),
        level_weights=weight_list(level_weights, levels, "model.loss.level_weights", "levels (model.levels)"),
    )


def weight_list(value: Any, count: int, key: str, what: str) -> tuple[float, ...] | None:
    """None, or `count` numbers >= 0 with a positive sum, as a tuple of floats."""
    if value is None:
        return None
    numbers = value if isinstance(value, Sequence) and not isinstance(value, str) else None
    if (
        numbers is None
        or len(numbers) != count
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in numbers)
        or not sum(numbers) > 0
    ):
        raise ValueError(f"{key} must be null or {count} numbers >= 0 (one per {what}), got {value!r}")
    return tuple(float(w) for w in numbers)


def optimizer_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """model.optimizer checked, over DEFAULT_OPTIMIZER: `name` sgd (with `momentum`) or adamw (with
    `betas`), `lr` > 0 for the backbone and `head_lr_mult` times it for the heads, `weight_decay` >= 0,
    the per-step poly schedule's `poly_power` >= 0, and a linear warmup over `warmup_steps` from
    `warmup_ratio` times the scheduled lr (mmsegmentation's linear warmup; 0 steps: none)."""
    unknown = set(config or {}) - set(DEFAULT_OPTIMIZER)
    if unknown:
        raise ValueError(
            f"model.optimizer has unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULT_OPTIMIZER)}"
        )
    config = {**DEFAULT_OPTIMIZER, **(config or {})}
    if config["name"] not in OPTIMIZERS:
        raise ValueError(f"model.optimizer.name={config['name']!r} is not one of {', '.join(OPTIMIZERS)}")
    for key, low, low_included in [
        ("lr", 0, False),
        ("head_lr_mult", 0, True),
        ("weight_decay", 0, True),
        ("poly_power", 0, True),
        ("warmup_ratio", 0, False),
    ]:
        value = config[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value < low
            or (value == low and not low_included)
        ):
            raise ValueError(
                f"model.optimizer.{key} must be a number {'>=' if low_included else '>'} {low}, got {value!r}"
            )
    if config["warmup_ratio"] > 1:
        raise ValueError(f"model.optimizer.warmup_ratio must be at most 1, got {config['warmup_ratio']!r}")
    steps = config["warmup_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"model.optimizer.warmup_steps must be a whole number >= 0, got {steps!r}")
    betas = config["betas"]
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise ValueError(f"model.optimizer.betas must be two numbers in [0, 1), got {betas!r}")
    return config


def lr_factor(step: int, total_steps: int, power: float, warmup_steps: int, warmup_ratio: float) -> float:
    """The lr at `step` over the base lr: the poly schedule (Sec. 5.1.1) max(1 - step/total, 0)^power,
    during the first `warmup_steps` scaled by a linear ramp from `warmup_ratio` to 1 (mmsegmentation's
    `warmup='linear'`: 1 - (1 - step/warmup_steps)(1 - warmup_ratio))."""
    factor = max(1.0 - step / total_steps, 0.0) ** power
    if step < warmup_steps:
        factor *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return factor


def eq1_loss(out: PyramidOutput, targets: PyramidTargets, settings: LossSettings) -> PyramidLoss:
    """Eq. 1 of a pyramid output on (relabelled) targets, with model.loss's OHEM and weights."""
    return pyramid_loss(
        out.semantic, out.unity, targets, settings.ohem, settings.class_weights, settings.level_weights
    )


def auxiliary_weight(context: Mapping[str, Any]) -> float:
    """model.context.aux_weight: the weight of OCR's auxiliary CE in the total loss (0.4); OCR only."""
    weight = context.get("aux_weight", OCR_AUX_WEIGHT if context["name"] == "ocr" else None)
    if context["name"] != "ocr":
        if weight is not None:
            raise ValueError(
                f"model.context.aux_weight applies to model.context.name=ocr only, not {context['name']!r}"
            )
        return 0.0
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ValueError(f"model.context.aux_weight must be a number >= 0, got {weight!r}")
    return float(weight)


def training_network(hparams: Mapping[str, Any]) -> PyramidSegmenter:
    """The network of the `model` config as training runs it: with model.channels_last, in that memory
    format; with model.compile, its dense parts compiled. Both say how the network runs (its training
    steps and validation), not what it is: a checkpoint holds the same keys either way, and
    `sfseg.inference.load` builds the plain eager network from it."""
    settings = {key: hparams.get(key, False) for key in ("compile", "channels_last")}
    for key, value in settings.items():
        if not isinstance(value, bool):
            raise ValueError(f"model.{key}={value!r} is not one of true, false")
    net = PyramidSegmenter.from_hparams(hparams)
    if settings["channels_last"]:
        net.use_channels_last()
    if settings["compile"]:
        net.compile_dense()
    return net


def training_loss(
    out: PyramidOutput,
    targets: PyramidTargets,
    policy: str,
    tau: float,
    settings: LossSettings | None = None,
    aux_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    fuse_rule: FuseRule | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of one batch: Eq. 1 on the targets relabelled by `policy` (with model.loss's
    `settings`), plus OCR's weighted auxiliary CE when the net has that head, plus the CE of the net's
    learned fuse (`fuse_rule`, default learned with its default Up()) when the net has a fuse gate.
    Returns the total and its terms by their logged names."""
    loss = eq1_loss(out, relabel(targets, out.unity, policy, tau), settings or LossSettings())
    total = loss.total
    terms = {f"train/ce_level{i}": ce for i, ce in enumerate(loss.ce, start=1)}
    terms.update({f"train/bce_level{i}": bce for i, bce in enumerate(loss.bce, start=1)})
    if out.gate_logits is not None:
        # The learned fuse's output against the finest labels (before relabelling: every pixel counts).
        # The pyramids enter detached, so this CE trains the gate only and leaves the pyramids as Eq. 1
        # trains them.
        semantic = [logits.detach() for logits in out.semantic]
        unity = [logits.detach() for logits in out.unity]
        fused, _ = fuse(semantic, unity, tau, fuse_rule or FuseRule("learned"), out.gate_logits)
        terms["train/fuse_ce"] = semantic_ce(fused, targets.semantic[-1], ignore_index)
        total = total + terms["train/fuse_ce"]
    if out.auxiliary is not None:
        # OCR's auxiliary head, against the finest labels before relabelling: it must find the
        # object regions everywhere. Plain CE, as HRNet-OCR trains it even with OHEM.
        aux = semantic_ce(out.auxiliary, targets.semantic[-1], ignore_index)
        terms["train/ocr_aux_ce"] = aux
        total = total + aux_weight * aux
    return total, terms


class SpecializeAndFuseModule(L.LightningModule):
    """Every constructor argument is a plain value (DESIGN 6), so checkpoints load with weights_only.

    `class_names`, `palette` and `label_values` (per class, the raw id or [r, g, b] colour of the
    dataset's own label files) are the training data's, kept in the checkpoint so that evaluation and
    prediction name the classes, colour the masks and write the dataset's own ids without the data;
    so is `test_scale` (data.test_scale), the factor every image is resized by before the network at
    validation, evaluation and prediction (predictions are resized back to the image's own size).
    """

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
        loss: Mapping[str, Any] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        label_values: Sequence[int] | Sequence[Sequence[int]] | None = None,
        fuse: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        test_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # Plain dicts, not DictConfig, before save_hyperparameters reads the arguments (DESIGN 6).
        backbone, context, relabel, optimizer, loss, fuse, decoder = (
            plain(backbone),
            plain(context),
            plain(relabel),
            plain(optimizer),
            plain(loss),
            plain(fuse),
            plain(decoder),
        )
        policy = relabel["policy"]
        if policy not in RELABEL_POLICIES:
            raise ValueError(f"model.relabel.policy={policy!r} is not one of {', '.join(RELABEL_POLICIES)}")
        unity_logit_threshold(tau)  # validates model.tau early
        self.optimizer_config = optimizer_config(optimizer)
        self.loss_settings = loss_settings(loss, num_classes, levels)
        self.fuse_settings = fuse_config(fuse)
        self.aux_weight = auxiliary_weight(context)
        self.save_hyperparameters()
        self.policy = policy
        self.tau = tau
        self.levels = levels
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        # The factor validation, sfseg.eval and sfseg.predict resize images by (data.test_scale).
        self.test_scale = check_test_scale(test_scale)
        self.net = training_network(self.hparams)
        # Every training-free rule (and the net's learned one) is scored on the same pyramids.
        self.compared_rules = compared_rules(self.net)
        rules = [rule.label for rule in self.compared_rules]
        self.val_metrics = PyramidMetrics(num_classes, levels, tau, ignore_index, rules, self.test_scale)
        self.last_val_scores: dict[str, float] = {}
        self.validated_step = -1  # the training step of the last validation during fit
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
            test_scale=self.test_scale,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.net(batch["image"])
        total, terms = training_loss(
            out,
            batch["targets"],
            self.policy,
            self.tau,
            self.loss_settings,
            self.aux_weight,
            self.ignore_index,
            self.net.fuse_rule,
        )
        batch_size = batch["image"].shape[0]
        self._check_finite({"train/loss": total, **terms})
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log_dict(terms, batch_size=batch_size)
        return total

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
        label = batch["label"]
        # The images reach the network as sfseg.eval and sfseg.predict give them (resized by the test
        # scale, padded); every prediction is scored on the labels at their own size.
        view = InputView.of(label.shape[-2:], self.test_scale, self.net.size_divisor)
        out = self.net(view.images(batch["image"]))
        targets = build_targets(view.labels(label, self.ignore_index), self.levels, self.ignore_index)
        loss = eq1_loss(out, relabel(targets, out.unity, self.policy, self.tau), self.loss_settings)
        self.log("val/loss", loss.total, batch_size=label.shape[0], sync_dist=True)
        fused, level_map = fused_logits(out, view, self.tau, rule=self.net.fuse_rule)
        fused_pred = fused.argmax(1)
        level_map = view.cells(level_map)
        self.val_metrics.update(
            fused_pred=fused_pred,
            level_preds=level_predictions(out, view),
            target=label,
            unity_logits=out.unity,
            unity_targets=targets.unity,
            level_map=level_map,
            rule_preds=rule_predictions(out, view, self.tau, self.compared_rules),
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
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.validated_step = self.global_step

    def build_optimizer(self) -> torch.optim.Optimizer:
        """model.optimizer's SGD or AdamW over the parameter groups: encoder, heads (head_lr_mult) and
        the learned fuse's gate (model.fuse.lr_mult)."""
        config = self.optimizer_config
        # A frozen encoder's parameters need no gradient and are in no group (model.backbone.freeze).
        backbone_params = [p for p in self.net.backbone.parameters() if p.requires_grad]
        gate_params = list(self.net.fuse_gate.parameters()) if self.net.fuse_gate is not None else []
        own_groups = {id(p) for p in self.net.backbone.parameters()} | {id(p) for p in gate_params}
        head_params = [p for p in self.net.parameters() if id(p) not in own_groups]
        groups = [
            {"params": backbone_params, "lr": config["lr"]},
            {"params": head_params, "lr": config["lr"] * config["head_lr_mult"]},
        ]
        if gate_params:
            # The fuse loss's gradient is small wherever the levels agree (most cells), so with the heads'
            # lr the gate barely moves under SGD; model.fuse.lr_mult scales its lr (docs/fuse.md).
            groups.append(
                {"params": gate_params, "lr": config["lr"] * self.fuse_settings.get("lr_mult", 1.0)}
            )
        if config["name"] == "adamw":
            return torch.optim.AdamW(
                groups, lr=config["lr"], betas=tuple(config["betas"]), weight_decay=config["weight_decay"]
            )
        return torch.optim.SGD(
            groups, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
        )

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        optimizer = self.build_optimizer()
        schedule = partial(
            lr_factor,
            total_steps=max(int(self.trainer.estimated_stepping_batches), 1),
            power=config["poly_power"],
            warmup_steps=config["warmup_steps"],
            warmup_ratio=config["warmup_ratio"],
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
