"""The benchmark harness writes complete results; timings themselves are not asserted."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sfseg.bench.__main__ import main
from sfseg.bench.backbones import parse_backbones
from sfseg.bench.harness import QUICK, count_gmacs, count_params_m
from sfseg.bench.table5 import checkpoint_level_shares, model_cases, table5_rows
from sfseg.bench.variants import MODEL_VARIANTS, Case, build_variant, model_spec, parse_variants
from tests.test_eval import train_tiny_checkpoint

# ratio key -> the value it divides by FCN's
RATIOS = {"latency_ratio": "latency_ms", "memory_ratio": "memory_mb", "gmacs_ratio": "gmacs"}
TRAIN_RATIOS = {"train_step_ratio": "train_step_ms", "train_memory_ratio": "train_memory_mb"}
# The quick run's rows (fcn joins by itself): one L=4 context of the issue-9 rows, to keep it short,
# and the OCR / CCNet rows, single-output (L=1) and pyramid.
QUICK_VARIANTS = ("sf_c2f", "ocr", "ccnet", "sf_ocr", "sf_ccnet")
SINGLE_OUTPUT = ("ocr", "ccnet")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp())


def quick_run(out: Path, *args: str) -> None:
    """A --quick run writing to `out`, on one thread: on a small shared CPU box two OpenMP threads stall
    behind other load."""
    main(["--quick", "--threads", "1", "--out", str(out), *args])


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path, restore_threads, trained_run: Path) -> None:
    checkpoint = str(trained_run / "checkpoints" / "last.ckpt")
    quick_run(tmp_path, "--profile", "--ckpt", checkpoint, "--variants", ",".join(QUICK_VARIANTS))

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"meta", "targets", "fuse", "models", "profile"}
    assert results["meta"]["device"] == "cpu"
    assert results["meta"]["threads"] == 1
    assert results["meta"]["quick"] is True
    assert len(results["meta"]["load_average"]) == 2
    assert results["models"]["variants"] == ["fcn", *QUICK_VARIANTS]
    for key in ("targets", "fuse"):
        row = results[key]
        assert {"operation", "baseline", "shape", "time_ms", "baseline_ms", "ratio"} <= set(row)
        assert row["ratio"] == pytest.approx(row["time_ms"] / row["baseline_ms"])
    assert len(results["targets"]["unity_cell_share"]) == results["targets"]["num_levels"] - 1

    models = results["models"]
    assert "fresh process" in models["memory_method"]
    # The checkpoint's shares are those its training run's validation measured.
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert models["checkpoint_level_shares"] == pytest.approx(
        [trained[f"share_level{level}"] for level in range(1, 5)]
    )
    rows = {row["case"]: row for row in models["rows"]}
    pyramids = [variant for variant in QUICK_VARIANTS if variant not in SINGLE_OUTPUT]
    sparse = [f"{variant}@{share}" for share in (*QUICK.shares, "ckpt") for variant in pyramids]
    # The single-output rows are dense only.
    assert sorted(rows) == sorted(["fcn", *QUICK_VARIANTS, *sparse])
    fcn = rows["fcn"]
    for name, row in rows.items():
        assert row["latency_ms"] > 0 and row["memory_mb"] > 0 and row["gmacs"] > 0 and row["params_m"] > 0
        dense = row["path"] == "dense"
        for ratio, value in (RATIOS | TRAIN_RATIOS if dense else RATIOS).items():
            assert row[ratio] == pytest.approx(row[value] / fcn[value]), (name, ratio)
        if dense:
            assert row["undecided_share"] is None and row["train_step_ms"] > 0
        else:
            assert not set(TRAIN_RATIOS) & set(row)  # training is dense
            # The forced unity pyramid left the asked share of finest cells to the finest level.
            # (to a whole number of level-(L-1) cells, of which there are (size / 8)^2).
            leaves = (QUICK.image_size // 8) ** 2
            assert row["undecided_share"] == pytest.approx(row["level_shares"][-1], abs=0.5 / leaves + 1e-9)
            # Sparse runs fewer multiply-accumulates than the same variant dense.
            assert row["gmacs"] < rows[row["variant"]]["gmacs"]
    # Parameters and multiply-accumulates counted here, apart from the harness: each dense model built
    # afresh at the quick sizes, its forward pass under FlopCounterMode (fuse and upsampling add no MACs).
    images = torch.zeros(1, 3, QUICK.image_size, QUICK.image_size)
    for variant in ("fcn", *QUICK_VARIANTS):
        model = build_variant(variant, QUICK).eval()
        assert rows[variant]["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            model(images)
        assert rows[variant]["gmacs"] == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-9), variant
    assert rows["sf_c2f"]["gmacs_ratio"] > 1  # the pyramid's heads cost more than FCN's head
    for context in SINGLE_OUTPUT:
        # The L=1 model is the pyramid's finest level alone: no unity head, fewer parameters and MACs.
        single, pyramid = rows[context], rows[f"sf_{context}"]
        assert single["params_m"] < pyramid["params_m"] and single["gmacs"] < pyramid["gmacs"]

    markdown = (tmp_path / "results.md").read_text()
    assert "| operation | input | time (ms) | baseline | baseline (ms) | ratio |" in markdown
    assert "build_targets + relabel" in markdown
    assert "argmax over the finest logits" in markdown
    assert "## Table 5:" in markdown and "| train step (ms) |" in markdown
    for variant in ("fcn", *QUICK_VARIANTS):
        assert f"| {variant} | dense |" in markdown
    assert "(ocr, ccnet: L=1, the single output)" in markdown and "OCR's auxiliary CE x 0.4" in markdown
    assert "| sf_c2f | sparse | 0.500 |" in markdown
    (ocr_row,) = [line for line in markdown.splitlines() if line.startswith("| ocr | dense |")]
    assert ocr_row.split(" | ")[4] == f"{rows['ocr']['latency_ratio']:.2f}x"  # latency vs FCN
    assert "fresh process" in markdown
    assert "## Profile: sf_c2f@0.33" in markdown and "aten::" in markdown


@pytest.mark.slow
def test_checkpoint_shares_are_its_validations_and_add_sparse_rows(trained_run: Path) -> None:
    shares = checkpoint_level_shares(trained_run / "checkpoints" / "last.ckpt", 4, torch.device("cpu"))
    # The share of finest cells per level that the training run's validation measured.
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert shares == pytest.approx([trained[f"share_level{level}"] for level in range(1, 5)])
    cases = model_cases(QUICK, shares)
    ckpt_cases = [case for case in cases if case.source == "checkpoint"]
    pyramids = ["sf_none", "sf_anl", "sf_anl_multi", "sf_c2f", "sf_ocr", "sf_ccnet"]
    assert [case.name for case in ckpt_cases] == [f"{variant}@ckpt" for variant in pyramids]
    assert all(list(case.level_shares) == shares for case in ckpt_cases)
    with pytest.raises(ValueError, match=r"--ckpt .* has L=4 levels; the benchmark's models have L=2"):
        checkpoint_level_shares(trained_run / "checkpoints" / "last.ckpt", 2, torch.device("cpu"))


def test_table5_rows_divide_each_measure_by_fcns() -> None:
    """Hand-made measurements: each ratio is the row's own value over FCN's (FCN is not the smallest
    everywhere); a sparse row takes its inference measures by case and has no training columns."""
    cases = [Case("fcn"), Case("sf_c2f"), Case("sf_c2f", (0.25, 0.25, 0.0, 0.5))]
    measured = {
        "latency": {"fcn": 10.0, "sf_c2f": 15.0, "sf_c2f@0.5": 12.0},
        "memory": {"fcn": 200.0, "sf_c2f": 300.0, "sf_c2f@0.5": 150.0},
        "gmacs": {"fcn": 4.0, "sf_c2f": 5.0, "sf_c2f@0.5": 3.0},
        "share": {"sf_c2f@0.5": 0.5},
        "train_step": {"fcn": 100.0, "sf_c2f": 130.0},
        "train_memory": {"fcn": 1000.0, "sf_c2f": 1500.0},
    }
    fcn, dense, sparse = table5_rows(cases, measured, {"fcn": 10.0, "sf_c2f": 11.0})
    assert (dense["latency_ratio"], dense["memory_ratio"], dense["gmacs_ratio"]) == (1.5, 1.5, 1.25)
    assert (dense["train_step_ratio"], dense["train_memory_ratio"]) == (1.3, 1.5)
    assert (sparse["latency_ratio"], sparse["memory_ratio"], sparse["gmacs_ratio"]) == (1.2, 0.75, 0.75)
    assert sparse["undecided_share"] == 0.5 and sparse["level_shares"] == [0.25, 0.25, 0.0, 0.5]
    assert "train_step_ms" not in sparse and "train_step_ratio" not in sparse
    assert (fcn["params_m"], dense["params_m"], sparse["params_m"]) == (10.0, 11.0, 11.0)
    assert fcn["latency_ratio"] == fcn["train_memory_ratio"] == 1.0


def test_bench_refuses_a_missing_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--ckpt", str(tmp_path / "none.ckpt")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--ckpt" in error and "none.ckpt" in error
    assert not (tmp_path / "bench").exists()  # refused before any work


def test_gmacs_count_a_multiply_add_once() -> None:
    """A 1x1 convolution of 3 to 8 channels over 16x16 pixels is 3 * 8 * 256 multiply-adds (no bias)."""
    conv = torch.nn.Conv2d(3, 8, 1, bias=False)
    assert count_gmacs(conv, torch.zeros(1, 3, 16, 16)) == pytest.approx(3 * 8 * 256 / 1e9, rel=1e-12)
    assert count_params_m(conv) == pytest.approx(3 * 8 / 1e6)


def test_variants_pick_rows_and_always_keep_fcn() -> None:
    assert parse_variants(None) == MODEL_VARIANTS
    assert parse_variants("sf_ocr, ocr") == ("fcn", "ocr", "sf_ocr")  # MODEL_VARIANTS' order
    cases = model_cases(QUICK, None, parse_variants("ccnet,sf_ccnet"))
    assert [case.name for case in cases] == ["fcn", "ccnet", "sf_ccnet", "sf_ccnet@0.5"]


@pytest.mark.parametrize("value", ["ocr,hrnet_ocr", ","])
def test_bench_refuses_unknown_variants(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--variants", value])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--variants" in error
    assert "allowed: " + ", ".join(MODEL_VARIANTS) in error
    if value != ",":
        assert "unknown hrnet_ocr" in error


@pytest.mark.slow
def test_backbones_table_measures_each_backbone_next_to_the_reference(tmp_path, restore_threads) -> None:
    quick_run(
        tmp_path, "--backbones", "convnext_atto,vit_tiny_patch16_224", "--frozen-memory", "convnext_atto"
    )

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"meta", "backbones"}  # the Backbones table instead of Table 5
    table = results["backbones"]
    assert table["reference"] == QUICK.backbone and table["variant"] == "sf_c2f"
    rows = {row["backbone"]: row for row in table["rows"]}
    assert list(rows) == [QUICK.backbone, "convnext_atto", "vit_tiny_patch16_224"]
    # Each as its config builds it: HRNetV2's concatenation and the paper's heads; timm's segformer default.
    assert [(row["encoder"], row["decoder"]) for row in rows.values()] == [
        ("HRNetBranches", "concat"),
        ("TimmStages", "segformer"),
        ("PlainViT", "segformer"),
    ]
    for name, row in rows.items():
        spec = model_spec(name)
        assert (row["semantic_channels"], row["unity_channels"]) == (
            spec.semantic_channels,
            spec.unity_channels,
        )
        # The S&F model the table names: its parameters split into the encoder, the decoder and the heads.
        model = build_variant("sf_c2f", replace(QUICK, backbone=name))
        parts = (model.backbone.body, model.backbone, model)
        encoder, backbone, whole = (sum(p.numel() for p in part.parameters()) / 1e6 for part in parts)
        assert row["params_m"] == pytest.approx(whole)
        assert (row["encoder_params_m"], row["decoder_params_m"]) == pytest.approx(
            (encoder, backbone - encoder)
        )
        assert row["encoder_gmacs"] + row["decoder_gmacs"] + row["heads_gmacs"] == pytest.approx(row["gmacs"])
        # HRNetV2's concatenation has no parameters and no multiply-adds; the other decoders have both.
        assert (row["decoder_gmacs"] > 0) is (name != QUICK.backbone)
        assert row["encoder_gmacs"] + row["decoder_gmacs"] < row["fcn_gmacs"]  # FCN: the same plus its head
        assert row["sparse_vs_fcn"] == pytest.approx(row["sparse_gmacs"] / row["fcn_gmacs"])
        assert row["train_step_ratio"] == pytest.approx(
            row["train_step_ms"] / rows[QUICK.backbone]["train_step_ms"]
        )
        assert row["frozen_step_ratio"] == pytest.approx(row["frozen_train_step_ms"] / row["train_step_ms"])
    assert rows[QUICK.backbone]["train_step_ratio"] == 1.0
    # A frozen encoder keeps no activations for its backward: the step needs less memory.
    assert rows["convnext_atto"]["frozen_train_memory_mb"] < rows["convnext_atto"]["train_memory_mb"]
    assert "train_memory_mb" not in rows["vit_tiny_patch16_224"]

    markdown = (tmp_path / "results.md").read_text()
    assert "## Backbones: S&F (c2f, L=4, 150 classes)" in markdown and "| vs hrnet_w18_small |" in markdown
    assert "| convnext_atto | TimmStages | segformer (256) | 128, 32 |" in markdown
    assert "### A frozen encoder: training step and its peak memory" in markdown


def test_frozen_memory_names_rows_of_the_table(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"--frozen-memory resnet18: not among the measured backbones"):
        quick_run(tmp_path, "--backbones", "convnext_atto", "--frozen-memory", "resnet18")


def test_backbones_are_a_comma_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_backbones("convnext_atto, resnet18,convnext_atto") == ("convnext_atto", "resnet18")
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--backbones", " , "])
    assert exit_info.value.code == 2 and "--backbones ' , ': give a comma list" in capsys.readouterr().err
