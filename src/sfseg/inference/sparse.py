"""Hooks that fix how much work sparse inference gets, for benchmarks and tests (not the public API).

The sparse path itself is `PyramidSegmenter.sparse_forward`, which the passes take by default. Its
cost depends on the predicted unity pyramid: the share of finest cells no coarser level decided, and
at which levels the others were decided. To measure it at a chosen share, force the unity logits:

    from sfseg.inference.sparse import even_level_shares, forced_unity, unity_logits_for_shares

    unity = unity_logits_for_shares([even_level_shares(0.33, net.num_levels)], finest_size=(128, 128))
    with forced_unity(net, unity):
        logits, level_map = image_logits(net, images, tau)  # 33 % of the finest cells from level L

The unity head still runs (its cost is part of the path); only its output is replaced.
`fuse_agreement` says whether a sparse result is the dense one (the tests and `sfseg.gpu_check` ask it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sfseg.pyramid import repeat_cells

# Far beyond the decision threshold logit(tau) of any tau in use, on either side.
FORCED_LOGIT = 20.0
# Two runs of one network give the same output when their logits lie within this share of the largest
# logit: float32 (TF32 off) sums in another order, or bf16 autocast's rounding.
SAME_OUTPUT_ATOL = {"float32": 1e-4, "bfloat16": 1e-2}
# An untrained net's top two logits are often close: half the pixels clear of a near tie is enough there.
UNTRAINED_MIN_CLEAR_SHARE = 0.5


@contextlib.contextmanager
def forced_unity(net: nn.Module, unity_logits: list[Tensor]) -> Iterator[None]:
    """While active, `net.unity_head` (a PyramidSegmenter's) returns `unity_logits` after running."""
    if net.unity_head is None:  # L = 1: nothing to force
        yield
        return
    handle = net.unity_head.register_forward_hook(lambda module, args, output: unity_logits)
    try:
        yield
    finally:
        handle.remove()


def even_level_shares(undecided: float, num_levels: int) -> list[float]:
    """Shares of the finest cells per level, coarse to fine: `undecided` for level L, the rest split
    evenly over the levels 1..L-1 that decide cells."""
    if not 0.0 <= undecided <= 1.0:
        raise ValueError(f"the share of undecided cells must lie in [0, 1], got {undecided}")
    if num_levels == 1:
        return [1.0]
    return [(1.0 - undecided) / (num_levels - 1)] * (num_levels - 1) + [undecided]


def unity_logits_for_shares(
    level_shares: Sequence[Sequence[float]],
    finest_size: Sequence[int],
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Unity logits [B, h_l, w_l] for l < L (coarse to fine) under which image b's fuse takes about
    level_shares[b][l] of its finest cells from level l, and exactly level_shares[b][-1], rounded to
    whole level-(L-1) cells, from the finest level. Decided cells are drawn at random (seeded) among
    the cells still undecided; their logits are +FORCED_LOGIT, every other cell's -FORCED_LOGIT."""
    levels = len(level_shares[0])
    if any(len(shares) != levels for shares in level_shares):
        raise ValueError("every image needs one share per level")
    height, width = finest_size
    generator = torch.Generator().manual_seed(seed)
    per_image = [_forced_levels(shares, height, width, generator) for shares in level_shares]
    return [torch.stack(level).to(device) for level in zip(*per_image, strict=True)]


def _forced_levels(
    shares: Sequence[float], height: int, width: int, generator: torch.Generator
) -> list[Tensor]:
    levels = len(shares)
    if levels == 1:
        return []
    leaf_height, leaf_width = height // 2, width // 2  # level L-1: the finest level that decides
    leaves = leaf_height * leaf_width
    undecided_leaves = round(shares[-1] * leaves)
    open_cells = torch.ones(height >> (levels - 1), width >> (levels - 1), dtype=torch.bool)
    logits = []
    for level in range(levels - 1):
        leaves_per_cell = 4 ** (levels - 2 - level)
        open_leaves = int(open_cells.sum()) * leaves_per_cell
        if level == levels - 2:
            take = open_leaves - undecided_leaves
        else:
            wanted = round(shares[level] * leaves / leaves_per_cell)
            take = max(0, min(wanted, (open_leaves - undecided_leaves) // leaves_per_cell))
        scores = torch.rand(open_cells.shape, generator=generator).masked_fill(~open_cells, -1.0)
        accept = torch.zeros(open_cells.numel(), dtype=torch.bool)
        accept[scores.flatten().topk(take).indices] = True
        accept = accept.view_as(open_cells)
        logits.append(torch.where(accept, FORCED_LOGIT, -FORCED_LOGIT))
        open_cells = repeat_cells(open_cells & ~accept, 2)
    return logits


@dataclass(frozen=True)
class FuseAgreement:
    """How a sparse (logits, level map) result compares with the dense one of the same images."""

    level_maps_equal: bool
    max_logit_difference: float
    atol: float
    # Pixels whose dense top two logits differ by more than 2 atol: only a near tie may flip there.
    clear_share: float
    argmax_equal_where_clear: bool
    # Fewer clear pixels than this and the argmax comparison would say too little.
    min_clear_share: float = 0.9

    @property
    def agrees(self) -> bool:
        """Level maps identical, logits within atol, argmax equal away from near ties, and enough pixels
        away from them."""
        return (
            self.level_maps_equal
            and self.max_logit_difference <= self.atol
            and self.argmax_equal_where_clear
            and self.clear_share > self.min_clear_share
        )


def fuse_agreement(
    dense: tuple[Tensor, Tensor], sparse: tuple[Tensor, Tensor], atol: float, min_clear_share: float = 0.9
) -> FuseAgreement:
    """Compare `image_logits(..., sparse=False)` with `image_logits(..., sparse=True)` of the same images."""
    (dense_logits, dense_levels), (sparse_logits, sparse_levels) = dense, sparse
    dense_logits, sparse_logits = dense_logits.float(), sparse_logits.float()
    top2 = dense_logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * atol
    return FuseAgreement(
        level_maps_equal=torch.equal(dense_levels, sparse_levels),
        max_logit_difference=(sparse_logits - dense_logits).abs().max().item(),
        atol=atol,
        clear_share=clear.float().mean().item(),
        argmax_equal_where_clear=torch.equal(sparse_logits.argmax(1)[clear], dense_logits.argmax(1)[clear]),
        min_clear_share=min_clear_share,
    )
