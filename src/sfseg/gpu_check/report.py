"""The report of `python -m sfseg.gpu_check`: report.json (everything measured) and report.md (for people).

Standard library only: the parent process writes it whatever the stages could import.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TITLES = {
    "environment": "Environment",
    "smoke": "Smoke test: every context module under bf16 autocast; sparse == dense",
    "table5": "Table 5: the cost against FCN, beside the paper's",
    "training": "Training: bf16 steps on the embedded data",
    "compile": "torch.compile and channels_last against eager (`sfseg.bench --compile-check`)",
    "mechanism": "The controlled experiment (`sfseg.ablation --preset mechanism`)",
}


def write_report(out: Path, meta: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> None:
    """<out>/report.json and <out>/report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "stages": list(stages)}, indent=2) + "\n")
    (out / "report.md").write_text(to_markdown(meta, stages))


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def to_markdown(meta: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> str:
    passed = sum(stage["status"] == "passed" for stage in stages)
    sizes = " at toy sizes (--tiny)" if meta["tiny"] else ""
    lines = [
        "# sfseg GPU check",
        "",
        f"{meta['date']}: `{meta['command']}` on {meta['device']}{sizes}, torch {meta['torch']}; "
        f"{meta['seconds']:.0f} s of the {meta['minutes']:g}-minute budget. "
        f"**{passed} of {len(stages)} stages passed.** Each stage ran in its own process under its time limit; "
        "its log is in the `logs/` folder beside this report.",
        "",
        "| stage | status | seconds | limit (s) | problems |",
        "|---|---|---:|---:|---|",
    ]
    for stage in stages:
        problems = "; ".join(stage["problems"]).replace("|", "\\|")
        lines.append(
            f"| {stage['name']} | {stage['status']} | {stage['seconds']:.0f} | {stage['limit_s']} | {problems} |"
        )
    for stage in stages:
        lines += ["", f"## {TITLES[stage['name']]}", ""]
        if stage.get("result"):
            lines += RENDERERS[stage["name"]](stage["result"])
        if stage.get("error"):
            lines += [
                f"{stage['status'].capitalize()}; the end of `{stage['log']}`:",
                "",
                "```",
                stage["error"],
                "```",
            ]
        elif not stage.get("result"):
            lines.append(f"{stage['status'].capitalize()}: {'; '.join(stage['problems'])}.")
    return "\n".join(lines) + "\n"


def environment_markdown(result: Mapping[str, Any]) -> list[str]:
    rows = []
    if "gpu" in result:
        rows += [
            (
                "GPU",
                f"{result['gpu']} ({result['gpu_count']} visible), {result['gpu_memory_gib']} GiB, "
                f"compute capability {result['compute_capability']}, bf16 {'yes' if result['bf16_supported'] else 'no'}",
            ),
            ("driver", result["driver"] or "unknown (no nvidia-smi)"),
        ]
    rows += [
        ("CUDA (torch's build)", result["cuda_build"] or "none (CPU-only torch)"),
        ("cuDNN", result["cudnn"] or "none"),
        ("Python", f"{result['python']} ({result['executable']})"),
        ("platform", f"{result['platform']}, {result['cpus']} CPUs"),
    ]
    rows += [(name, version or "**missing**") for name, version in result["packages"].items()]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _agreement(agreement: Mapping[str, Any]) -> str:
    verdict = "yes" if agreement["agrees"] else "**NO**"
    detail = f"max diff {agreement['max_logit_difference']:.2g} (atol {agreement['atol']:.2g})"
    if not agreement["level_maps_equal"]:
        detail += ", level maps differ"
    if not agreement["argmax_equal_where_clear"]:
        detail += ", argmax differs"
    return f"{verdict}: {detail}, {100 * agreement['clear_share']:.0f} % clear"


def smoke_markdown(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{result['backbone']}, {result['num_classes']} classes, batch {result['batch']} of "
        f"{result['size']}x{result['size']} synthetic scenes. Training: forward, `training_loss` (relabel "
        "true_positive, Eq. 1, OCR's auxiliary CE) and backward under bf16 autocast. Inference: "
        f"`image_logits` dense and sparse with the unity pyramid forced to {result['shares']} undecided "
        "finest cells (one image each), in float32 (TF32 off) and under bf16 autocast; atol is "
        f"{result['atol_float32']:g} / {result['atol_bfloat16']:g} of the largest logit; clear = pixels "
        "whose top two logits differ by more than 2 atol, where the argmax must agree (and more than "
        f"{100 * result['min_clear_share']:.0f} % of the pixels must be clear).",
        "",
        "| context | L | bf16 loss | loss and gradients finite | sparse == dense, float32 | sparse == dense, bf16 |",
        "|---|---:|---:|---|---|---|",
    ]
    for case in result["cases"]:
        finite = "yes" if case["loss_finite"] and case["gradients_finite"] else "**NO**"
        lines.append(
            f"| {case['context']} | {case['levels']} | {_number(case['loss'], 3)} | {finite} | "
            f"{_agreement(case['float32'])} | {_agreement(case['bfloat16'])} |"
        )
    return lines


def table5_markdown(result: Mapping[str, Any]) -> list[str]:
    bench = result["bench"]
    lines = [
        f"`{result['command']}` on {bench['device_name']}: {bench['backbone']} at {bench['image_size']}x"
        f"{bench['image_size']}, {bench['num_classes']} classes, inference batch 1, training step batch "
        f"{bench['train_batch']} (float32). Ratios to FCN (backbone + FCN head) in this run; `paper`: Table 5 "
        "(RTX 2080 Ti, 512x512, training batch 4) as the same ratios to HRNet48, time = FPS(HRNet48) / FPS, "
        "training step = it/s(HRNet48) / it/s, memory = its memory column (training) / HRNet48's. "
        f"The full tables: `{result['results']}`.",
        "",
        "| variant | path | share | latency (ms) | vs FCN | paper | train step (ms) | vs FCN | paper "
        "| train memory (MB) | vs FCN | paper | inference memory vs FCN |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['variant']} | {row['path']} | {_number(row['undecided_share'], 2)} | "
            f"{row['latency_ms']:.1f} | {row['latency_ratio']:.2f}x | {_number(row['paper_time_ratio'], 2, 'x')} | "
            f"{_number(row['train_step_ms'], 1)} | {_number(row['train_step_ratio'], 2, 'x')} | "
            f"{_number(row['paper_train_ratio'], 2, 'x')} | {_number(row['train_memory_mb'], 0)} | "
            f"{_number(row['train_memory_ratio'], 2, 'x')} | {_number(row['paper_memory_ratio'], 2, 'x')} | "
            f"{row['memory_ratio']:.2f}x |"
        )
    lines += ["", "ocr and ccnet are the single-output rows (L=1); sf_c2f is the paper's model (L=4, c2f)."]
    return lines


def training_markdown(result: Mapping[str, Any]) -> list[str]:
    return [
        f"`python -m sfseg.train` ({result['run_dir']}): {result['backbone']}, {result['size']}x{result['size']}, "
        f"batch {result['batch']}, {result['steps']} steps, {result['precision']}, {result['workers']} loader "
        f"workers; throughput and shares over steps {result['warmup'] + 1}-{result['steps']} "
        "(`sfseg.callbacks.StepTimes`, the device synchronised at both ends of each step).",
        "",
        "| images/s | median step (ms) | data share of the step time | peak memory (MB) | loss, first steps | "
        "loss, last steps |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result['images_per_s']:.1f} | {1e3 * result['median_step_s']:.0f} | "
        f"{100 * result['data_share']:.1f} % | {result['peak_memory_mb']:.0f} | {result['loss_start']:.3f} | "
        f"{result['loss_end']:.3f} |",
        "",
        f"Data: the time from the end of one step to the start of the next (the loader's next batch, its move "
        f"to the device, its pyramid targets). Losses: mean of the first and of the last {result['loss_steps']} "
        f"steps. Memory: {result['memory_method']}.",
    ]


def compile_markdown(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"`{result['command']}` on {result['device_name']}: {result['network']} ({result['backbone']}, "
        f"{result['num_classes']} classes, D_s={result['semantic_channels']}, D_u={result['unity_channels']}), "
        f"{result['precision']}. Training step: batch {result['train_batch']}, {result['train_size']}x"
        f"{result['train_size']}; inference: batch 1, {result['image_size']}x{result['image_size']}, dense and "
        f"sparse ({result['sparse_share']} undecided). Medians with the settings interleaved, as ratios to "
        "eager; a compiled setting's first call holds its compilation and is shown apart. Same output: "
        f"fused logits, level maps and argmax against eager's (`fuse_agreement`). The full table: `{result['results']}`.",
        "",
        "| setting | train step vs eager | dense inference vs eager | sparse inference vs eager | "
        "first call (s): train step | dense | same output |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        same = row["agrees_dense"]["agrees"] and row["agrees_sparse"]["agrees"]
        lines.append(
            f"| {row['setting']} | {row['train_step_ratio']:.2f}x | {row['dense_ratio']:.2f}x | "
            f"{row['sparse_ratio']:.2f}x | {row['train_step_first_s']:.1f} | {row['dense_first_s']:.1f} | "
            f"{'yes' if same else '**NO**'} |"
        )
    return lines


def mechanism_markdown(result: Mapping[str, Any]) -> list[str]:
    return [
        f"`{result['command']}`: seeds {result['seeds']}, {result['steps'] or '?'} steps per job, in "
        f"{result['seconds']:.0f} s. Its report (`{result['report']}`):",
        "",
        result["report_md"].strip(),
    ]


RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "environment": environment_markdown,
    "smoke": smoke_markdown,
    "table5": table5_markdown,
    "training": training_markdown,
    "compile": compile_markdown,
    "mechanism": mechanism_markdown,
}
