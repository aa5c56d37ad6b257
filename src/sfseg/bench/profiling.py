"""`sfseg.bench --profile`: torch.profiler's top operators of FCN and of S&F c2f sparse."""

from __future__ import annotations

import torch

from sfseg.bench.harness import BenchConfig, bench_images, sync
from sfseg.bench.variants import Case, build_variant, inference_call
from sfseg.inference.sparse import even_level_shares

PROFILE_SHARE = 0.33
PROFILE_CALLS = 3


def profile_table(cfg: BenchConfig, device: torch.device, share: float, rows: int = 20) -> dict[str, str]:
    """torch.profiler's top operators by self time over PROFILE_CALLS inferences (after warm-up): FCN
    and S&F c2f sparse at `share` undecided."""
    tables = {}
    images = bench_images(cfg, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for case in (Case("fcn"), Case("sf_c2f", tuple(even_level_shares(share, cfg.num_levels)))):
        model = build_variant(case.variant, cfg).to(device).eval()
        infer = inference_call(model, case, cfg, device)
        with torch.inference_mode():
            for _ in range(cfg.model_warmup):
                infer(images)
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(PROFILE_CALLS):
                    infer(images)
                sync(device)
        tables[case.name] = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    return tables


def profile_markdown(tables: dict[str, str]) -> list[str]:
    lines = []
    for name, table in tables.items():
        lines += [f"## Profile: {name}, top operators by self time over {PROFILE_CALLS} calls", ""]
        lines += ["```", table.rstrip(), "```", ""]
    return lines
