"""The smoke stage of `python -m sfseg.gpu_check`: every context module at L=1 and L=4, a bf16-autocast
training step and sparse == dense inference, in the stage's own process (the other stages run the
project's commands: sfseg.gpu_check.stages).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sfseg.data.synthetic import SYNTHETIC_CLASSES, SyntheticScenes
from sfseg.data.transforms import val_transform
from sfseg.gpu_check.sizes import CheckSizes
from sfseg.inference import image_logits
from sfseg.inference.sparse import (
    SAME_OUTPUT_ATOL,
    UNTRAINED_MIN_CLEAR_SHARE,
    even_level_shares,
    forced_unity,
    fuse_agreement,
    unity_logits_for_shares,
)
from sfseg.models import CONTEXT_MODULES, PyramidSegmenter
from sfseg.module import auxiliary_weight, training_loss
from sfseg.pyramid import FINEST_STRIDE, build_targets

TAU = 0.9
SMOKE_LEVELS = (1, 4)
# One image each: no finest cell undecided, some, all (as tests/test_sparse.py forces them).
SMOKE_SHARES = (0.0, 0.4, 1.0)


def smoke_batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first len(SMOKE_SHARES) val scenes of the embedded data, normalised."""
    scenes = SyntheticScenes("val", len(SMOKE_SHARES), (size, size), transform=val_transform(None))
    items = [scenes[index] for index in range(len(scenes))]
    images = torch.stack([item["image"] for item in items]).to(device)
    return images, torch.stack([item["label"] for item in items]).to(device)


def train_once(
    net: PyramidSegmenter, context: str, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """Forward, training loss and backward under bf16 autocast: is everything finite?"""
    net.train()
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        out = net(images)
        targets = build_targets(labels, net.num_levels)
        loss, _ = training_loss(
            out, targets, "true_positive", TAU, aux_weight=auxiliary_weight({"name": context})
        )
    loss.backward()
    gradients = [param.grad for param in net.parameters() if param.grad is not None]
    return {
        "loss": loss.item(),
        "loss_finite": math.isfinite(loss.item()),
        "gradients_finite": bool(gradients) and all(torch.isfinite(grad).all().item() for grad in gradients),
    }


def sparse_against_dense(net: PyramidSegmenter, images: torch.Tensor, precision: str) -> dict[str, Any]:
    """image_logits sparse against dense with the unity pyramid forced to SMOKE_SHARES undecided cells."""
    net.eval()
    finest = (images.shape[-2] // FINEST_STRIDE, images.shape[-1] // FINEST_STRIDE)
    shares = [even_level_shares(share, net.num_levels) for share in SMOKE_SHARES]
    unity = unity_logits_for_shares(shares, finest, device=images.device)
    bf16 = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with torch.inference_mode(), forced_unity(net, unity), bf16:
        dense = image_logits(net, images, TAU, sparse=False)
        sparse = image_logits(net, images, TAU, sparse=True)
    atol = SAME_OUTPUT_ATOL[precision] * dense[0].abs().max().item()
    agreement = fuse_agreement(dense, sparse, atol, UNTRAINED_MIN_CLEAR_SHARE)
    return {**asdict(agreement), "agrees": agreement.agrees}


def smoke(sizes: CheckSizes, device: torch.device, folder: Path, seconds: float) -> tuple[dict, list[str]]:
    """Every context module at L=1 and L=4: a bf16 training step, then sparse == dense inference."""
    # Full float32 for the float32 comparison: it checks the sparse path, not TF32's rounding.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    images, labels = smoke_batch(sizes.smoke_size, device)
    cases, problems = [], []
    for context in sorted(CONTEXT_MODULES):
        for levels in SMOKE_LEVELS:
            torch.manual_seed(0)
            net = PyramidSegmenter(
                sizes.smoke_backbone,
                len(SYNTHETIC_CLASSES),
                levels,
                context,
                sizes.unity_channels,
                sizes.semantic_channels,
            ).to(device)
            case = {"context": context, "levels": levels, **train_once(net, context, images, labels)}
            case |= {
                precision: sparse_against_dense(net, images, precision) for precision in SAME_OUTPUT_ATOL
            }
            cases.append(case)
            name = f"{context} at L={levels}"
            if not (case["loss_finite"] and case["gradients_finite"]):
                problems.append(f"{name}: non-finite loss or gradients under bf16 autocast")
            problems += [
                f"{name}: sparse != dense in {precision}"
                for precision in SAME_OUTPUT_ATOL
                if not case[precision]["agrees"]
            ]
            print(f"smoke: {name} done", flush=True)
    result = {
        "backbone": sizes.smoke_backbone,
        "size": sizes.smoke_size,
        "batch": len(SMOKE_SHARES),
        "num_classes": len(SYNTHETIC_CLASSES),
        "shares": list(SMOKE_SHARES),
        "atol_float32": SAME_OUTPUT_ATOL["float32"],
        "atol_bfloat16": SAME_OUTPUT_ATOL["bfloat16"],
        "min_clear_share": UNTRAINED_MIN_CLEAR_SHARE,
        "cases": cases,
    }
    return result, problems
