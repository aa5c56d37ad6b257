"""`sfseg.bench --compile-check`: model.compile and model.channels_last against the eager network, in one
run: the training step and inference (dense, and sparse at SPARSE_SHARE undecided finest cells), medians
of interleaved repeats. Each setting's first call holds its compilation and is reported apart; each
setting's output is compared with the eager one's before any training step changes the weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn

from sfseg.bench.harness import QUICK, TAU, BenchConfig, bench_images, interleaved_medians, sync
from sfseg.bench.variants import Case, inference_call, training_call
from sfseg.inference import autocast, image_logits
from sfseg.inference.sparse import (
    SAME_OUTPUT_ATOL,
    UNTRAINED_MIN_CLEAR_SHARE,
    even_level_shares,
    fuse_agreement,
)
from sfseg.models import PyramidSegmenter
from sfseg.runs import REPO_ROOT, git_state

# setting -> (model.compile, model.channels_last)
SETTINGS = {
    "eager": (False, False),
    "channels_last": (False, True),
    "compile": (True, False),
    "compile+channels_last": (True, True),
}
SPARSE_SHARE = 0.33  # about what the trained embedded default leaves undecided (as Table 5's profile)
VARIANT = "sf_c2f"  # the model: S&F with the paper's context module


@dataclass(frozen=True)
class CompileCheckConfig:
    """The network compared and how often: `sizes` holds its backbone, classes, image and training
    sizes and the repeats; the head widths are D_s and D_u; `settings` the SETTINGS measured."""

    network: str  # whose network it is, for the report
    sizes: BenchConfig
    semantic_channels: int
    unity_channels: int
    settings: tuple[str, ...] = tuple(SETTINGS)


# On a CPU: the network `make train` trains (conf/experiment/synthetic.yaml) at its 128 px, with the
# previous default's batch of 16 that docs/bench/compile_check.md was measured at (`make train`: 8).
EMBEDDED = CompileCheckConfig(
    "the embedded default's network (what `make train` trains)",
    replace(
        BenchConfig(),
        backbone="hrnet_w18_small",
        num_classes=12,
        image_size=128,
        train_batch=16,
        train_size=128,
        model_repeats=20,
        model_warmup=2,
        train_repeats=7,
        train_warmup=2,
    ),
    semantic_channels=128,
    unity_channels=32,
)
# On a GPU: the paper's network at 512x512, the batch of sfseg.gpu_check's training stage.
PAPER = CompileCheckConfig(
    "the paper's network",
    replace(
        BenchConfig(),
        train_batch=8,
        model_repeats=20,
        model_warmup=3,
        train_repeats=10,
        train_warmup=3,
    ),
    semantic_channels=512,
    unity_channels=64,
)
# --quick: a toy network, the code path in seconds once compiled. On a fresh machine the C++ compiler
# builds every kernel of every graph, so it compiles what it needs only: two levels hold every part
# (both pyramids, c2f's coarse-to-fine pass, Eq. 2's fuse) at half the kernels of four, and one
# compiled setting: compile, whose graphs tests/test_speed_settings.py compiles too (the same network,
# shapes and order), so that a test run compiles them once (tests/conftest.py orders the two).
TOY = CompileCheckConfig(
    "a toy network (--quick)",
    replace(
        QUICK,
        backbone="local",
        num_levels=2,
        num_classes=12,
        image_size=64,
        train_batch=4,
        train_size=64,
        train_repeats=2,
    ),
    semantic_channels=32,
    unity_channels=16,
    settings=("eager", "channels_last", "compile"),
)


def compile_check_config(device: torch.device, quick: bool) -> CompileCheckConfig:
    """TOY with --quick; else the network one trains on that device: EMBEDDED on a CPU, PAPER on CUDA."""
    if quick:
        return TOY
    return PAPER if device.type == "cuda" else EMBEDDED


def build_network(cfg: CompileCheckConfig, compile: bool, channels_last: bool) -> PyramidSegmenter:
    """The S&F network with the same initial weights for every setting."""
    torch.manual_seed(0)
    context = VARIANT.removeprefix("sf_")
    sizes = cfg.sizes
    net = PyramidSegmenter(
        sizes.backbone,
        sizes.num_classes,
        sizes.num_levels,
        context,
        cfg.unity_channels,
        cfg.semantic_channels,
    )
    if channels_last:
        net.use_channels_last()
    if compile:
        net.compile_dense()
    return net


def first_calls(calls: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Seconds of each call's first run (a compiled setting's compilation)."""
    seconds = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        sync(device)
        seconds[name] = time.perf_counter() - start
    return seconds


def timed(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """First-call seconds, then the median milliseconds of the calls interleaved."""
    first = first_calls(calls, device)
    return {"first_s": first, "ms": interleaved_medians(calls, repeats, warmup, device)}


def precision(device: torch.device) -> str | None:
    """The autocast dtype: bf16 on CUDA (how one trains there), none (float32) on a CPU."""
    return "bfloat16" if device.type == "cuda" else None


def agreement(nets: dict[str, nn.Module], images: Tensor, dtype: str | None) -> dict[str, dict[str, dict]]:
    """Per inference path, each setting's fused logits and level map against eager's dense ones
    (`fuse_agreement`): the same output up to float rounding."""
    eager = image_logits(nets["eager"], images, TAU, sparse=False)
    atol = SAME_OUTPUT_ATOL[dtype or "float32"] * eager[0].float().abs().max().item()
    found: dict[str, dict[str, dict]] = {}
    for path in ("dense", "sparse"):
        found[path] = {}
        for name, net in nets.items():
            output = image_logits(net, images, TAU, sparse=path == "sparse")
            compared = fuse_agreement(eager, output, atol, UNTRAINED_MIN_CLEAR_SHARE)
            found[path][name] = asdict(compared) | {"agrees": compared.agrees}
    return found


def inference_measures(
    nets: dict[str, nn.Module], cfg: CompileCheckConfig, device: torch.device
) -> dict[str, object]:
    """Each setting's dense and sparse inference times (batch 1), then its output against eager's."""
    sizes, dtype = cfg.sizes, precision(device)
    cases = {
        "dense": Case(VARIANT),
        "sparse": Case(VARIANT, tuple(even_level_shares(SPARSE_SHARE, sizes.num_levels))),
    }
    images = bench_images(sizes, device)
    for net in nets.values():
        net.eval()
    with torch.inference_mode(), autocast(device, dtype):
        measured: dict[str, object] = {}
        for path, case in cases.items():
            calls = {
                name: partial(inference_call(net, case, sizes, device), images) for name, net in nets.items()
            }
            measured[path] = timed(calls, sizes.model_repeats, sizes.model_warmup, device)
        measured["agreement"] = agreement(nets, images, dtype)
    return measured


def training_measures(
    nets: dict[str, nn.Module], cfg: CompileCheckConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Each setting's training step (forward, loss, backward, SGD step; bf16 autocast on CUDA)."""
    sizes, context = cfg.sizes, autocast(device, precision(device))

    def under_autocast(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with context:
                step()

        return run

    steps = {
        name: under_autocast(training_call(net.train(), VARIANT, sizes, device)) for name, net in nets.items()
    }
    return timed(steps, sizes.train_repeats, sizes.train_warmup, device)


def bench_compile_check(cfg: CompileCheckConfig, device: torch.device) -> dict[str, object]:
    """Every setting on the same network: inference (dense, sparse) and the training step, each as a
    ratio to eager in this run, the first calls apart, and whether its output is eager's."""
    nets = {name: build_network(cfg, *SETTINGS[name]).to(device) for name in cfg.settings}
    inference = inference_measures(nets, cfg, device)
    training = training_measures(nets, cfg, device)
    rows = []
    for name in cfg.settings:
        compiled, channels_last = SETTINGS[name]
        row: dict[str, object] = {"setting": name, "compile": compiled, "channels_last": channels_last}
        for key, measured in (
            ("train_step", training),
            ("dense", inference["dense"]),
            ("sparse", inference["sparse"]),
        ):
            row[f"{key}_ms"] = measured["ms"][name]
            row[f"{key}_ratio"] = measured["ms"][name] / measured["ms"]["eager"]
            row[f"{key}_first_s"] = measured["first_s"][name]
        row["agrees_dense"] = inference["agreement"]["dense"][name]
        row["agrees_sparse"] = inference["agreement"]["sparse"][name]
        rows.append(row)
    return {
        "network": cfg.network,
        "variant": VARIANT,
        "backbone": cfg.sizes.backbone,
        "num_classes": cfg.sizes.num_classes,
        "num_levels": cfg.sizes.num_levels,
        "semantic_channels": cfg.semantic_channels,
        "unity_channels": cfg.unity_channels,
        "image_size": cfg.sizes.image_size,
        "train_batch": cfg.sizes.train_batch,
        "train_size": cfg.sizes.train_size,
        "sparse_share": SPARSE_SHARE,
        "precision": precision(device) or "float32",
        "repeats": {
            key: getattr(cfg.sizes, key)
            for key in ("model_repeats", "model_warmup", "train_repeats", "train_warmup")
        },
        "commit": git_state(REPO_ROOT),
        "rows": rows,
    }


def _same_output(agreement: dict) -> str:
    if agreement["agrees"]:
        return f"yes ({agreement['max_logit_difference']:.1g})"
    return f"**NO** ({agreement['max_logit_difference']:.2g}, atol {agreement['atol']:.2g})"


def compile_check_markdown(section: dict) -> list[str]:
    size, repeats, commit = section["image_size"], section["repeats"], section["commit"]
    dirty = " with uncommitted changes" if commit["git_dirty"] else ""
    lines = [
        "## torch.compile and channels_last against eager (`--compile-check`)",
        "",
        f"{section['network']}: {section['backbone']}, S&F c2f, L={section['num_levels']}, "
        f"{section['num_classes']} classes, D_s={section['semantic_channels']}, D_u={section['unity_channels']}; "
        f"{section['precision']}; commit {commit['git_commit'] or 'unknown'}{dirty}. Inference: batch 1, "
        f"{size}x{size}, `image_logits` dense and sparse ({section['sparse_share']} of the finest cells "
        f"undecided, forced), median of {repeats['model_repeats']} after the first call and "
        f"{repeats['model_warmup']} warm-up. Training step: batch {section['train_batch']}, "
        f"{section['train_size']}x{section['train_size']}, forward, loss, backward and SGD step, median of "
        f"{repeats['train_repeats']} after the first call and {repeats['train_warmup']} warm-up. The settings "
        "interleaved; ratios to eager in this run. A compiled setting's first call holds its compilation: "
        "it is left out of the medians and shown apart. Same output: the fused logits within 1e-4 "
        "(bf16: 1e-2) of the largest logit of eager's dense inference, the level maps identical and the "
        "argmax equal away from near ties, before any training step (the largest difference in brackets).",
        "",
        "| setting | train step (ms) | vs eager | dense inference (ms) | vs eager | sparse inference (ms) | "
        "vs eager | first call (s): train step | dense | sparse | same output: dense | sparse |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in section["rows"]:
        lines.append(
            f"| {row['setting']} | {row['train_step_ms']:.1f} | {row['train_step_ratio']:.2f}x | "
            f"{row['dense_ms']:.1f} | {row['dense_ratio']:.2f}x | {row['sparse_ms']:.1f} | "
            f"{row['sparse_ratio']:.2f}x | {row['train_step_first_s']:.1f} | {row['dense_first_s']:.1f} | "
            f"{row['sparse_first_s']:.1f} | {_same_output(row['agrees_dense'])} | "
            f"{_same_output(row['agrees_sparse'])} |"
        )
    return [*lines, ""]
