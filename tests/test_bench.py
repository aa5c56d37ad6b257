"""The benchmark harness writes complete results; timings themselves are not asserted."""

from __future__ import annotations

import json

import pytest
import torch

from sfseg.bench import MODEL_VARIANTS, main


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_json_and_markdown(tmp_path, restore_threads) -> None:
    # One thread: on a small shared CPU box two OpenMP threads stall behind other load.
    main(["--quick", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"meta", "targets", "fuse", "models"}
    assert results["meta"]["device"] == "cpu"
    assert results["meta"]["threads"] == 1
    assert results["meta"]["quick"] is True
    assert len(results["meta"]["load_average"]) == 2
    for key in ("targets", "fuse"):
        row = results[key]
        assert {"operation", "baseline", "shape", "time_ms", "baseline_ms", "ratio"} <= set(row)
        assert row["ratio"] == pytest.approx(row["time_ms"] / row["baseline_ms"])
    assert len(results["targets"]["unity_cell_share"]) == results["targets"]["num_levels"] - 1
    models = results["models"]
    assert "fresh process" in models["memory_method"]
    assert list(models["variants"]) == list(MODEL_VARIANTS)
    for row in models["variants"].values():
        assert {"latency_ms", "latency_ratio", "memory_mb", "memory_ratio", "gmacs", "params_m"} <= set(row)
        assert row["latency_ms"] > 0
        assert row["memory_mb"] > 0  # a forward always allocates activations
    assert models["variants"]["fcn"]["latency_ratio"] == 1.0

    markdown = (tmp_path / "results.md").read_text()
    assert "| operation | input | time (ms) | baseline | baseline (ms) | ratio |" in markdown
    assert "build_targets + relabel" in markdown
    assert "argmax over the finest logits" in markdown
    for variant in MODEL_VARIANTS:
        assert f"| {variant} |" in markdown
    assert "fresh process" in markdown
