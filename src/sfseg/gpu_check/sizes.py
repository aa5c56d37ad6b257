"""What each stage of `python -m sfseg.gpu_check` runs, and for how long at most: FULL on a GPU node,
TINY (`--tiny`) at toy sizes. Standard library only: the parent process and every stage read it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# The stages in the order they run, with the seconds each may take at most on a GPU node (the --minutes
# budget cuts them further). --tiny allows more: a busy CPU is slower at toy sizes than a GPU at full ones.
STAGE_LIMITS_S = {
    "environment": 60,
    "smoke": 180,
    "table5": 300,
    "training": 240,
    "compile": 300,
    "mechanism": 600,
}
TINY_STAGE_LIMITS_S = {
    "environment": 120,
    "smoke": 300,
    "table5": 600,
    "training": 300,
    "compile": 600,  # a cold compiler cache on a busy CPU: minutes
    "mechanism": 600,
}
# The controlled experiment's toy regime (tests/test_mechanism.py runs it end to end too).
TINY_MECHANISM = (
    "data.size=64",
    "data.region_size=32",
    "data.marker_spacing=16",
    "data.train_samples=8",
    "data.val_samples=4",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "model.semantic_channels=16",
    "model.unity_channels=8",
    "num_pyramid_images=0",
)


@dataclass(frozen=True)
class CheckSizes:
    """What each stage runs: FULL on a GPU node, TINY (--tiny) to test the code path in seconds."""

    smoke_backbone: str = "hrnet_w48"
    smoke_size: int = 256
    bench_variants: str = "fcn,ocr,ccnet,sf_c2f"
    bench_quick: bool = False
    train_backbone: str = "hrnet_w48"
    train_size: int = 512
    train_batch: int = 8
    train_steps: int = 100
    train_warmup: int = 10  # steps left out of the throughput (cuDNN's autotuning, the loader's start)
    train_val_samples: int = 16  # train.py validates once at the end; a few images do
    semantic_channels: int = 512  # D_s and D_u: the paper's
    unity_channels: int = 64
    loader_workers: int | None = None  # None: all CPUs but two, at most 12
    mechanism_steps: int | None = None  # None: the preset's
    mechanism_seeds: str = "0,1,2"  # the preset's, when mechanism_full_s are left
    mechanism_short_seeds: str = "0"
    mechanism_full_s: int = 300
    mechanism_overrides: tuple[str, ...] = ()
    stage_limits_s: Mapping[str, int] = field(default_factory=lambda: STAGE_LIMITS_S)


FULL = CheckSizes()
TINY = CheckSizes(
    smoke_backbone="hrnet_w18_small",
    smoke_size=64,
    bench_variants="fcn,sf_c2f",
    bench_quick=True,
    train_backbone="hrnet_w18_small",
    train_size=64,
    train_batch=2,
    train_steps=4,
    train_warmup=1,
    train_val_samples=2,
    semantic_channels=16,
    unity_channels=8,
    loader_workers=0,
    mechanism_steps=2,
    mechanism_seeds="0",
    mechanism_overrides=TINY_MECHANISM,
    stage_limits_s=TINY_STAGE_LIMITS_S,
)


def workers(sizes: CheckSizes) -> int:
    """DataLoader workers of the training runs."""
    if sizes.loader_workers is not None:
        return sizes.loader_workers
    return max(1, min(12, (os.cpu_count() or 2) - 2))
