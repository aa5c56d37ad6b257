"""The pyramid math of Specialize and Fuse, as pure tensor functions.

Everything here works on tensors only (CPU or CUDA, float32 or under autocast), so the model, the
training loop, the tests, the notebooks and the benchmarks all call the same code.

Conventions (DESIGN 1): levels are ordered coarse to fine, list index 0 is the paper's level 1 and
index L-1 is level L. Level l has stride s_l = 4 * 2^(L-l); level L has the backbone's stride 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FINEST_STRIDE = 4
IGNORE_INDEX = 255
RELABEL_POLICIES = ("naive", "oracle", "true_positive")
SEMANTIC_LOSSES = ("ce", "ohem")  # model.loss.name: Eq. 1's plain CE, or HRNet-OCR's OHEM CE
# model.fuse.name (docs/fuse.md): Eq. 2 (`hard`, the paper's); `soft`, each level's class probabilities
# weighted by the probability that it is the coarsest unity level; `learned`, weights from a small gate
# trained on the detached pyramids (models.heads.FuseGate).
FUSE_RULES = ("hard", "soft", "learned")
# model.fuse.upsample: how a coarser level's semantic map reaches the finest cells (Eq. 2's Up()).
UPSAMPLE_MODES = ("nearest", "bilinear")
# Each rule's Up() unless model.fuse.upsample says otherwise: nearest for Eq. 2 (DESIGN 1) and its soft
# reading, bilinear for the learned fuse (docs/fuse.md says why).
DEFAULT_UPSAMPLE = {"hard": "nearest", "soft": "nearest", "learned": "bilinear"}


def level_strides(num_levels: int, finest_stride: int = FINEST_STRIDE) -> list[int]:
    """Strides s_1..s_L, coarse to fine: s_l = finest_stride * 2^(L-l)."""
    if num_levels < 1:
        raise ValueError(f"model.levels must be >= 1, got {num_levels}")
    return [finest_stride * 2 ** (num_levels - 1 - i) for i in range(num_levels)]


def check_tau(tau: float, key: str = "model.tau") -> float:
    """A unity threshold in (0, 1), as a float; `key` names the setting in the error."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"{key} must be in the open interval (0, 1), got {tau}")
    return float(tau)


def unity_logit_threshold(tau: float) -> float:
    """The logit z with sigmoid(z) == tau: "predicted unity >= tau" is "logit >= this"."""
    tau = check_tau(tau)
    return math.log(tau / (1.0 - tau))


def repeat_cells(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling of the last two dims by an integer factor, exact for any dtype."""
    if factor == 1:
        return x
    *lead, h, w = x.shape
    return x[..., :, None, :, None].expand(*lead, h, factor, w, factor).reshape(*lead, h * factor, w * factor)


def _factor(fine: Tensor, coarse: Tensor) -> int:
    return fine.shape[-1] // coarse.shape[-1]


@dataclass(frozen=True)
class PyramidTargets:
    """Ground-truth pyramids (Sec. 3.1).

    semantic: L LongTensors; levels 1..L-1 are [B, H/s_l, W/s_l] with mix and empty cells ignored,
        level L is the per-pixel label map [B, H, W] (supervised at input resolution, DESIGN 1).
    unity: L-1 LongTensors [B, H/s_l, W/s_l]: 1 unity cell, 0 mix cell, ignore_index no valid pixel.
    """

    semantic: list[Tensor]
    unity: list[Tensor]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_levels(self) -> int:
        return len(self.semantic)


def build_targets(labels: Tensor, num_levels: int, ignore_index: int = IGNORE_INDEX) -> PyramidTargets:
    """Build the semantic and unity pyramids from per-pixel labels [B, H, W] (Sec. 3.1).

    A cell's valid pixels are those not equal to ignore_index. The per-cell min and max label over
    the valid pixels are pooled once to the finest cell level and then 2x2 per coarser level, so
    the whole pyramid costs about one pass over the labels.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    strides = level_strides(num_levels)
    height, width = labels.shape[-2:]
    if height % strides[0] or width % strides[0]:
        raise ValueError(
            f"label size {height}x{width} must be divisible by the coarsest stride {strides[0]} "
            f"(model.levels={num_levels}); pad inputs to a multiple of it"
        )
    labels = labels.long()
    if num_levels == 1:
        return PyramidTargets(semantic=[labels], unity=[], ignore_index=ignore_index)
    low, high = _label_bounds(labels, ignore_index)
    semantic: list[Tensor] = []
    unity: list[Tensor] = []
    cell = 1  # low/high start at pixel resolution
    for stride in reversed(strides[:-1]):  # fine to coarse: 8, 16, ...
        factor = stride // cell
        low = _pool_cells(low, factor, torch.amin)
        high = _pool_cells(high, factor, torch.amax)
        cell = stride
        has_valid = high > 0
        is_unity = has_valid & (low + 1 == high)
        unity.append(torch.where(has_valid, is_unity.long(), ignore_index))
        semantic.append(torch.where(is_unity, (high + ignore_index).long(), ignore_index))
    semantic.reverse()
    unity.reverse()
    semantic.append(labels)
    return PyramidTargets(semantic=semantic, unity=unity, ignore_index=ignore_index)


def _label_bounds(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Labels as uint8 (low, high) whose per-cell min of low and max of high skip ignored pixels:
    a cell with a valid pixel has high > 0, and it holds one class exactly when low + 1 == high.

    In uint8 arithmetic (mod 256), `label - ignore_index` maps the ignore index to 0 and every class
    to 1..255, and one less maps it to 255 and every class to 0..254. So a plain max (min) over a
    cell skips its ignored pixels, with no masks, on 1-byte values: the cheapest reduction there is."""
    _check_label_range(labels, ignore_index)
    high = labels.to(torch.uint8) - ignore_index
    return high - 1, high


def mixed_cells(labels: Tensor, stride: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per stride x stride cell of labels [B, H, W] (H, W multiples of stride): whether its valid pixels
    hold more than one class (a mix cell, Sec. 3.1), [B, H/stride, W/stride] bool. A cell without a
    valid pixel is not mixed."""
    low, high = _label_bounds(labels.long(), ignore_index)
    low, high = _pool_cells(low, stride, torch.amin), _pool_cells(high, stride, torch.amax)
    return (high > 0) & (low + 1 != high)


def _check_label_range(labels: Tensor, ignore_index: int) -> None:
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be in 0..255, got {ignore_index}")
    low, high = torch.aminmax(labels)
    if low < 0 or high > 255:
        raise ValueError(
            f"label values must be in 0..255 (class ids and the ignore index), got {int(low)}..{int(high)}"
        )


def _pool_cells(x: Tensor, factor: int, reduce) -> Tensor:
    batch, height, width = x.shape
    cells = x.view(batch, height // factor, factor, width // factor, factor)
    return reduce(cells, dim=(2, 4))


@torch.no_grad()
def relabel(
    targets: PyramidTargets, unity_logits: list[Tensor], policy: str, tau: float = 0.9
) -> PyramidTargets:
    """Mark cells "done by coarser" as ignore in both pyramids (Sec. 3.2, Table 7; DESIGN 1).

    A cell is done by coarser when an ancestor k < l satisfies the policy:
      naive: never; oracle: the ancestor is a ground-truth unity cell;
      true_positive: the ancestor is a ground-truth unity cell and its predicted unity >= tau.
    Never carries gradient; returns new targets and leaves the input untouched.
    """
    if policy not in RELABEL_POLICIES:
        raise ValueError(f"model.relabel.policy={policy!r} is not one of {', '.join(RELABEL_POLICIES)}")
    levels = targets.num_levels
    if policy == "naive" or levels == 1:
        return PyramidTargets(list(targets.semantic), list(targets.unity), targets.ignore_index)
    if policy == "true_positive":
        if len(unity_logits) != levels - 1:
            raise ValueError(f"expected {levels - 1} unity logit maps, got {len(unity_logits)}")
        threshold = unity_logit_threshold(tau)
    ignore = targets.ignore_index

    semantic: list[Tensor] = []
    unity: list[Tensor] = []
    done: Tensor | None = None  # done-by-coarser mask at the previous unity level's resolution
    for level in range(levels):
        sem = targets.semantic[level]
        semantic.append(sem if done is None else _ignore_cells(sem, done, ignore))
        if level == levels - 1:
            break
        gt_unity = targets.unity[level]
        unity.append(gt_unity if done is None else _ignore_cells(gt_unity, done, ignore))
        accept = gt_unity == 1
        if policy == "true_positive":
            logits = unity_logits[level]
            if logits.shape != gt_unity.shape:
                raise ValueError(
                    f"unity logits of level {level + 1} have shape {tuple(logits.shape)}, "
                    f"targets {tuple(gt_unity.shape)}"
                )
            accept &= logits.detach().float() >= threshold
        done = accept if done is None else repeat_cells(done, _factor(gt_unity, done)) | accept
    return PyramidTargets(semantic, unity, ignore)


def _cells(x: Tensor, factor: int) -> Tensor:
    """View [..., h*factor, w*factor] as [..., h, factor, w, factor]: one slot per coarse cell.

    The factor is a plain int, so under torch.export the shapes stay simple multiples of the input
    size (a factor computed from two symbolic sizes makes the export several times slower)."""
    *lead, height, width = x.shape
    return x.reshape(*lead, height // factor, factor, width // factor, factor)


def _coarse_slots(x: Tensor) -> Tensor:
    """View [..., h, w] as [..., h, 1, w, 1], to broadcast a coarse map over `_cells` of a finer one."""
    return x[..., :, None, :, None]


def _ignore_cells(target: Tensor, coarse_mask: Tensor, ignore: int) -> Tensor:
    """Set to ignore every element of `target` under a True cell of the coarser `coarse_mask`."""
    masked = torch.where(_coarse_slots(coarse_mask), ignore, _cells(target, _factor(target, coarse_mask)))
    return masked.reshape(target.shape)


@dataclass(frozen=True)
class FuseRule:
    """How the two pyramids become one prediction (model.fuse, docs/fuse.md): the rule's name
    (FUSE_RULES) and Up(), how a coarser level's semantic map reaches the finest cells (UPSAMPLE_MODES;
    None: the rule's DEFAULT_UPSAMPLE)."""

    name: str = "hard"
    upsample: str | None = None

    def __post_init__(self) -> None:
        if self.name not in FUSE_RULES:
            raise ValueError(f"model.fuse.name={self.name!r} is not one of {', '.join(FUSE_RULES)}")
        if self.upsample is None:
            object.__setattr__(self, "upsample", DEFAULT_UPSAMPLE[self.name])
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(
                f"model.fuse.upsample={self.upsample!r} is not one of {', '.join(UPSAMPLE_MODES)}"
            )

    @property
    def label(self) -> str:
        """The rule's name, with its Up() when that is not the rule's default (e.g. hard_bilinear)."""
        return self.name if self.upsample == DEFAULT_UPSAMPLE[self.name] else f"{self.name}_{self.upsample}"

    @property
    def sparse(self) -> bool:
        """Whether sparse inference computes this fuse exactly: each finest cell comes from one level that
        the unity pyramid alone picks and reads that level's own cell only (Eq. 2 with nearest Up)."""
        return self.name == "hard" and self.upsample == "nearest"

    @property
    def reads_tau(self) -> bool:
        return self.name == "hard"

    @property
    def trained(self) -> bool:
        """Whether the rule has a part trained with the net (the learned fuse's gate)."""
        return self.name == "learned"


# The rules that need no trained part: evaluation scores each of them on the same pyramids.
TRAINING_FREE_FUSE_RULES = (
    FuseRule("hard"),
    FuseRule("soft"),
    FuseRule("hard", "bilinear"),
    FuseRule("soft", "bilinear"),
)


def fuse(
    semantic_logits: list[Tensor],
    unity_logits: list[Tensor],
    tau: float = 0.9,
    rule: FuseRule | str = "hard",
    gate_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fuse the two pyramids into one prediction at the finest level with `rule` (docs/fuse.md; a name
    takes the rule's default Up()).

    hard (Eq. 2, the default): each finest cell takes the semantic logits of the coarsest level whose
        predicted unity >= tau; level L always accepts.
    soft: each level's class probabilities weighted by u_l * prod_{k<l} (1 - u_k) (u: predicted unity
        probability; level L takes prod_{k<L} (1 - u_k)); tau is not read.
    learned: each level's class probabilities weighted by softmax(gate_logits) over the levels, the
        [B, L, h_L, w_L] output of the net's fuse gate (`PyramidOutput.gate_logits`); tau is not read.
    Up() (rule.upsample): nearest repeats a coarse cell over its finest cells; bilinear interpolates each
    level's logits to the finest cells, as "level l alone" is upsampled to the image.

    Returns the fused logits [B, C, h_L, w_L] (soft, learned: the log of the mixed probabilities, in
    float32) and the level map [B, h_L, w_L], levels 0..L-1 (0 = coarsest): the level each finest cell
    was taken from (soft, learned: the level of the largest weight).
    """
    rule = FuseRule(rule) if isinstance(rule, str) else rule
    levels = len(semantic_logits)
    if len(unity_logits) != levels - 1:
        raise ValueError(
            f"fuse needs L-1={levels - 1} unity maps for L={levels} levels, got {len(unity_logits)}"
        )
    if levels == 1:  # one level: every rule takes it
        finest = semantic_logits[0]
        return finest, finest.new_zeros(finest.shape[:1] + finest.shape[2:], dtype=torch.long)
    if rule.name == "hard":
        fused, level_map = _hard_fuse(semantic_logits, unity_logits, tau)
        if rule.upsample == "bilinear":
            upsampled = upsample_levels(semantic_logits, "bilinear")
            fused = upsampled[0]
            for level in range(1, levels):
                fused = torch.where((level_map == level).unsqueeze(1), upsampled[level], fused)
        return fused, level_map
    if rule.name == "soft":
        log_weights = soft_level_log_weights(unity_logits, levels)
    else:
        if gate_logits is None:
            raise ValueError(
                "the learned fuse needs the fuse gate's level logits (PyramidOutput.gate_logits), and this "
                "output has none: the net was built without model/fuse=learned"
            )
        log_weights = gate_logits.float().log_softmax(1)
    probabilities = [logits.softmax(1) for logits in upsample_levels(semantic_logits, rule.upsample)]
    return mix_levels(probabilities, log_weights), log_weights.argmax(1)


def upsample_levels(semantic_logits: list[Tensor], mode: str) -> list[Tensor]:
    """Each level's logits at the finest cells, [B, C, h_L, w_L] float32 (Up() of `fuse`): nearest repeats
    each cell; bilinear interpolates (align_corners=False, as the upsampling to the image)."""
    size = semantic_logits[-1].shape[-2:]
    factors = [stride // FINEST_STRIDE for stride in level_strides(len(semantic_logits))]
    if mode == "nearest":
        return [
            repeat_cells(logits.float(), factor)
            for logits, factor in zip(semantic_logits, factors, strict=True)
        ]
    return [
        logits.float()
        if factor == 1
        else F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        for logits, factor in zip(semantic_logits, factors, strict=True)
    ]


def _hard_fuse(
    semantic_logits: list[Tensor], unity_logits: list[Tensor], tau: float
) -> tuple[Tensor, Tensor]:
    """Eq. 2 evaluated coarse to fine: a cell decided at a coarser level (its unity >= tau) keeps that
    level's logits; the others take this level's. Each step works at its own level's resolution and
    never materialises an upsampled copy, so the cost is about one pass over the finest logits."""
    levels = len(semantic_logits)
    threshold = unity_logit_threshold(tau)
    strides = level_strides(levels)
    fused = semantic_logits[0]
    level_map = torch.zeros(fused.shape[:1] + fused.shape[2:], dtype=torch.long, device=fused.device)
    decided = unity_logits[0].float() >= threshold
    for level in range(1, levels):
        logits = semantic_logits[level]
        factor = strides[level - 1] // strides[level]  # 2: each level halves the stride
        fused = _keep_decided(decided.unsqueeze(1), fused, logits, factor)
        level_map = repeat_cells(level_map, factor).masked_fill(~repeat_cells(decided, factor), level)
        if level < levels - 1:
            decided = repeat_cells(decided, factor) | (unity_logits[level].float() >= threshold)
    return fused, level_map


def soft_level_log_weights(unity_logits: list[Tensor], num_levels: int) -> Tensor:
    """The soft fuse's weights, as logs [B, L, h_L, w_L] (float32) at the finest cells: level l < L
    weighs u_l * prod_{k<l} (1 - u_k), the probability that l is the coarsest unity level if the levels'
    unity predictions were independent, and level L the rest, prod_{k<L} (1 - u_k). Weights sum to 1.
    Computed with log-sigmoids, so a confident unity logit never gives log(0)."""
    factors = [stride // FINEST_STRIDE for stride in level_strides(num_levels)]
    log_weights = []
    log_rest: Tensor | None = None  # log prod_{k<l} (1 - u_k) at the finest cells
    for logits, factor in zip(unity_logits, factors, strict=False):
        logits = repeat_cells(logits.float(), factor)
        log_unity, log_mixed = F.logsigmoid(logits), F.logsigmoid(-logits)
        log_weights.append(log_unity if log_rest is None else log_rest + log_unity)
        log_rest = log_mixed if log_rest is None else log_rest + log_mixed
    log_weights.append(log_rest)
    return torch.stack(log_weights, 1)


def mix_levels(probabilities: list[Tensor], log_weights: Tensor) -> Tensor:
    """log(sum_l w_l * p_l) [B, C, h_L, w_L] in float32: the levels' class probabilities at the finest
    cells (L maps [B, C, h_L, w_L]) mixed per cell with weights exp(log_weights) [B, L, h_L, w_L] (summing
    to 1 over L). A log, so it serves as logits (its softmax is the mixture itself)."""
    weights = log_weights.exp()
    mixed = sum(p * weights[:, level : level + 1] for level, p in enumerate(probabilities))
    return mixed.clamp(min=torch.finfo(torch.float32).tiny).log()


def fuse_features(probabilities: list[Tensor], unity_logits: list[Tensor]) -> Tensor:
    """What the learned fuse's gate reads per finest cell, [B, 4L-2, h_L, w_L] float32, each in [0, 1],
    from the levels' class probabilities at the finest cells (L maps [B, C, h_L, w_L]) and the unity
    logits: per level its top class probability (L) and normalised entropy (L), per level l < L the
    probability that it agrees with the finest level, sum_c p_l(c) p_L(c) (L-1), and its unity
    probability (nearest, L-1)."""
    factors = [stride // FINEST_STRIDE for stride in level_strides(len(probabilities))]
    max_entropy = math.log(max(probabilities[0].shape[1], 2))
    top = [p.amax(1) for p in probabilities]
    entropy = [-(p * p.clamp(min=1e-12).log()).sum(1) / max_entropy for p in probabilities]
    agreement = [(p * probabilities[-1]).sum(1) for p in probabilities[:-1]]
    unity = [
        repeat_cells(torch.sigmoid(logits.float()), factor)
        for logits, factor in zip(unity_logits, factors, strict=False)
    ]
    return torch.stack([*top, *entropy, *agreement, *unity], 1)


def _keep_decided(decided: Tensor, coarse: Tensor, fine: Tensor, factor: int) -> Tensor:
    """where(Up(decided), Up(coarse), fine) for nearest Up, via broadcasting views (no upsampled copy)."""
    kept = torch.where(_coarse_slots(decided), _coarse_slots(coarse), _cells(fine, factor))
    return kept.reshape(fine.shape)


def kept_cells(
    unity_logits: list[Tensor],
    finest_shape: Sequence[int],
    tau: float = 0.9,
    device: torch.device | None = None,
) -> list[Tensor]:
    """Eq. 2 as masks: per level, coarse to fine, the cells [B, h_l, w_l] whose semantic logits the fuse
    keeps, i.e. no coarser level decided them (predicted unity >= tau) and their own unity is >= tau
    (level L: every cell no coarser level decided). Every finest cell lies under exactly one kept cell,
    and the level map is l exactly under the kept cells of level l. finest_shape: [B, h_L, w_L]."""
    threshold = unity_logit_threshold(tau)
    kept: list[Tensor] = []
    undecided: Tensor | None = None  # cells no coarser level decided, at the current level's resolution
    for logits in unity_logits:
        accept = logits.float() >= threshold
        if undecided is not None:
            undecided = repeat_cells(undecided, _factor(accept, undecided))
            accept &= undecided
        kept.append(accept)
        undecided = ~accept if undecided is None else undecided & ~accept
    if undecided is None:
        kept.append(torch.ones(tuple(finest_shape), dtype=torch.bool, device=device))
    else:
        kept.append(repeat_cells(undecided, finest_shape[-1] // undecided.shape[-1]))
    return kept


@dataclass(frozen=True)
class Ohem:
    """Online hard example mining of the semantic CE terms (model.loss=ohem), HRNet-OCR's protocol.

    thresh: elements whose true-class probability is below it are kept (model.loss.thresh);
    min_kept: at least this many of a level's valid elements per batch are kept (model.loss.min_kept).
    """

    thresh: float = 0.9
    min_kept: int = 131072

    def __post_init__(self) -> None:
        if isinstance(self.thresh, bool) or not isinstance(self.thresh, int | float):
            raise ValueError(f"model.loss.thresh must be a number in (0, 1], got {self.thresh!r}")
        if not 0.0 < self.thresh <= 1.0:
            raise ValueError(f"model.loss.thresh must be in (0, 1], got {self.thresh}")
        if isinstance(self.min_kept, bool) or not isinstance(self.min_kept, int) or self.min_kept < 1:
            raise ValueError(f"model.loss.min_kept must be an integer >= 1, got {self.min_kept!r}")


def ohem_keep(probability: Tensor, valid: Tensor, thresh: float, min_kept: int) -> Tensor:
    """The elements OHEM keeps, with the semantics of HRNet-OCR's OhemCrossEntropy
    (lib/core/criterion.py of HRNet/HRNet-Semantic-Segmentation, branch HRNet-OCR).

    probability: the softmax probability of the true class per element; valid: the non-ignored ones.
    Over the n valid elements of the whole batch, sorted ascending, threshold =
    max(thresh, sorted[min(min_kept, n - 1)]) and the valid elements strictly below it are kept: all
    those under `thresh`, and at least the min_kept hardest (ties aside). With n <= min_kept the
    threshold is max(thresh, the largest probability), as there. No valid element: nothing is kept.
    """
    probability = probability.float()
    ordered = torch.where(valid, probability, torch.inf).flatten().sort().values
    # min(min_kept, n - 1) as a tensor, so that no device sync is needed; 0 when n == 0.
    index = (valid.sum() - 1).clamp(min=0, max=min_kept)
    threshold = ordered[index].clamp(min=thresh)
    return valid & (probability < threshold)


def semantic_ce(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    ohem: Ohem | None = None,
    class_weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """One CE term of Eq. 1: the mean over the target's non-ignored elements (with `ohem`: over
    those OHEM keeps); exactly 0 when none is left. Logits smaller than the target (level L) are
    upsampled bilinearly to its size first (DESIGN 1), as HRNet does.

    class_weights [C] (e.g. SegNet's median frequency balancing): each element's CE is weighted by its
    true class's weight and the term is their weighted mean, sum(w * CE) / sum(w), as torch's
    `cross_entropy(weight=...)` averages; OHEM still ranks by the unweighted probability."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    per_element = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    kept = target != ignore_index
    if ohem is not None:
        # CE is -log p(true class): exp(-CE) is the softmax probability that OHEM ranks.
        kept = ohem_keep(torch.exp(-per_element.detach()), kept, ohem.thresh, ohem.min_kept)
    if class_weights is None:
        return torch.where(kept, per_element, 0.0).sum() / kept.sum().clamp(min=1)
    weights = torch.as_tensor(class_weights, dtype=per_element.dtype, device=per_element.device)
    element_weights = torch.where(kept, weights[torch.where(kept, target, 0)], 0.0)
    total_weight = element_weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    return (element_weights * per_element).sum() / total_weight  # no kept element: exactly 0


@dataclass(frozen=True)
class PyramidLoss:
    """Eq. 1's total and its terms: one CE per semantic level, one BCE per unity level."""

    total: Tensor
    ce: list[Tensor]
    bce: list[Tensor]


def pyramid_loss(
    semantic_logits: list[Tensor],
    unity_logits: list[Tensor],
    targets: PyramidTargets,
    ohem: Ohem | None = None,
    class_weights: Sequence[float] | Tensor | None = None,
    level_weights: Sequence[float] | None = None,
) -> PyramidLoss:
    """Eq. 1: mean over L levels of CE plus mean over L-1 levels of BCE.

    Each term is averaged over its non-ignored elements; a level with no valid target adds exactly 0.
    The finest logits are upsampled bilinearly to the label size (DESIGN 1), as HRNet does.
    Beyond Eq. 1's text: `ohem` (HRNet-OCR's config) restricts each CE term to its hard elements;
    `class_weights` [C] weight every level's CE by class (`semantic_ce`); `level_weights` [L] replace
    the mean of the L CE terms by their weighted mean, sum(w_l CE_l) / sum(w_l) (all equal: Eq. 1).
    """
    ignore = targets.ignore_index
    ce = [
        semantic_ce(logits, target, ignore, ohem, class_weights)
        for logits, target in zip(semantic_logits, targets.semantic, strict=True)
    ]
    bce: list[Tensor] = []
    for logits, target in zip(unity_logits, targets.unity, strict=True):
        valid = target != ignore
        is_unity = (target == 1).float()
        per_cell = F.binary_cross_entropy_with_logits(logits.float(), is_unity, reduction="none")
        bce.append(torch.where(valid, per_cell, 0.0).sum() / valid.sum().clamp(min=1))
    if level_weights is None:
        total = torch.stack(ce).mean()
    else:
        if len(level_weights) != len(ce):
            raise ValueError(f"level_weights has {len(level_weights)} weights for {len(ce)} levels")
        weights = torch.tensor(level_weights, dtype=ce[0].dtype, device=ce[0].device)
        total = (weights * torch.stack(ce)).sum() / weights.sum()
    if bce:
        total = total + torch.stack(bce).mean()
    return PyramidLoss(total=total, ce=ce, bce=bce)


# ---------------------------------------------------------------------------------------------
# Analysis (Sec. 5.5): counts that the metrics accumulate over a split.


def unity_counts(
    unity_logits: list[Tensor],
    unity_targets: list[Tensor],
    tau: float = 0.9,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Per unity level, [true positives, false positives, false negatives] of "unity >= tau"
    against the ground-truth unity pyramid, over cells with a valid pixel. Shape [L-1, 3]."""
    threshold = unity_logit_threshold(tau)
    rows = []
    for logits, target in zip(unity_logits, unity_targets, strict=True):
        valid = target != ignore_index
        predicted = (logits.float() >= threshold) & valid
        actual = (target == 1) & valid
        rows.append(
            torch.stack(
                [(predicted & actual).sum(), (predicted & ~actual).sum(), (~predicted & actual).sum()]
            )
        )
    if not rows:
        return torch.zeros(0, 3, dtype=torch.long)
    return torch.stack(rows)


def level_counts(level_map: Tensor, num_levels: int) -> Tensor:
    """How many finest cells each level resolves (the parsimony of the fused output). Shape [L]."""
    return torch.bincount(level_map.flatten(), minlength=num_levels)


def unity_calibration_counts(
    unity_logits: list[Tensor],
    unity_targets: list[Tensor],
    num_bins: int = 10,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reliability counts of the unity pyramid, over cells with a valid pixel: per unity level and
    per bin of predicted unity probability (num_bins equal bins of [0, 1], the last one closed),
    the cells [L-1, num_bins] (int64), the true unity cells among them [L-1, num_bins] (int64) and the
    sum of their predicted probabilities [L-1, num_bins] (float64)."""
    cells, unity, probability = [], [], []
    for logits, target in zip(unity_logits, unity_targets, strict=True):
        valid = target != ignore_index
        predicted = torch.sigmoid(logits.float())[valid]
        bins = (predicted * num_bins).long().clamp(max=num_bins - 1)
        # One bincount gives both counts: slot 2b + 1 holds the unity cells of bin b, 2b the mix cells.
        split = torch.bincount(2 * bins + (target[valid] == 1), minlength=2 * num_bins).view(num_bins, 2)
        cells.append(split.sum(1))
        unity.append(split[:, 1])
        probability.append(torch.bincount(bins, weights=predicted.double(), minlength=num_bins))
    if not cells:
        empty = torch.zeros(0, num_bins, dtype=torch.long)
        return empty, empty.clone(), empty.double()
    return torch.stack(cells), torch.stack(unity), torch.stack(probability)
