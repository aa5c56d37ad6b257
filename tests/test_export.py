"""`python -m sfseg.export`: the exported ONNX / TorchScript model gives the masks and level maps of
`Predictor.predict`, at the export size and (dynamic) at others; clear errors for bad inputs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from sfseg.export import run
from sfseg.inference import Predictor, load
from tests.conftest import compose_config
from tests.test_eval import LEARNED, train_tiny_checkpoint

# The tiny checkpoint is barely trained: at its own tau (0.9) no coarse cell is decided. At 0.5 the
# level maps mix all four levels, so the comparison checks the fuse inside the graph.
SWEEP_TAU = 0.5
# onnxruntime's extended graph optimisations (FusedMatMul, FusedConv) move the tiny model's coarsest
# logits (scale 0.4) by up to 5e-4, and its logits are nearly flat: its default session flips the argmax
# at a few near-ties. The graph as exported (basic optimisations: constant folding) agrees with torch to
# 1e-6 and gives the predictor's masks exactly.
AS_EXPORTED = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp()) / "checkpoints" / "last.ckpt"


def export(checkpoint: Path, out: Path, *overrides: str) -> tuple[Path, str]:
    """Run the export command in process; return the written file and what it printed."""
    cfg = compose_config([f"ckpt_path={checkpoint}", *overrides], out, config_name="export")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exported = run(cfg)
    return exported.path, printed.getvalue()


def images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    """[batch, H, W, 3] uint8 RGB noise."""
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def as_input(rgb: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the model input: float32 RGB 0..255 [N, 3, H, W]."""
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2).astype(np.float32))


def predicted(predictor: Predictor, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictor.predict per image: masks [N, H, W] and level maps at the finest cells [N, H/4, W/4]."""
    predictions = [predictor.predict(image) for image in rgb]
    return (
        np.stack([prediction.mask for prediction in predictions]),
        np.stack([prediction.level_map[::4, ::4] for prediction in predictions]),
    )


def assert_torchscript_gives_the_predictors_output(
    path: Path, predictor: Predictor, sizes: list[tuple[int, int, int]]
) -> None:
    """The TorchScript file's masks and level maps equal the Predictor's on noise images of `sizes`
    ([batch, H, W] each)."""
    module = torch.jit.load(str(path))
    for seed, (batch, height, width) in enumerate(sizes):
        rgb = images(batch, height, width, seed)
        with torch.no_grad():
            mask, level_map = module(torch.from_numpy(as_input(rgb)))
        expected_mask, expected_levels = predicted(predictor, rgb)
        np.testing.assert_array_equal(mask.numpy(), expected_mask)
        np.testing.assert_array_equal(level_map.numpy(), expected_levels)


@pytest.fixture(scope="module")
def dynamic_onnx(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("export")
    return export(
        checkpoint, out, "size=[64,96]", "dynamic=true", f"tau={SWEEP_TAU}", f"output={out / 'model.onnx'}"
    )


@pytest.mark.slow
def test_dynamic_onnx_gives_the_predictors_masks_and_level_maps_at_any_size(
    checkpoint: Path, dynamic_onnx: tuple[Path, str]
):
    path, _ = dynamic_onnx
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [value.name for value in session.get_inputs()] == ["image"]
    assert [value.name for value in session.get_outputs()] == ["mask", "level_map"]
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = AS_EXPORTED
    as_exported = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # The exported graph is the dense path (every level at every cell); the sparse one agrees with it up
    # to argmax near-ties (tests/test_sparse.py), so the reference here is the dense Predictor.
    predictor = load(checkpoint, device="cpu", sparse_inference=False)
    predictor.tau = SWEEP_TAU
    levels_seen: set[int] = set()
    # The export size with another batch, then other sizes (one image, and a small one).
    for seed, (batch, height, width) in enumerate([(3, 64, 96), (1, 128, 64), (2, 32, 32)]):
        rgb = images(batch, height, width, seed)
        mask, level_map = session.run(None, {"image": as_input(rgb)})
        assert mask.dtype == level_map.dtype == np.int64
        assert mask.shape == (batch, height, width) and level_map.shape == (batch, height // 4, width // 4)
        expected_mask, expected_levels = predicted(predictor, rgb)
        np.testing.assert_array_equal(level_map, expected_levels)
        assert (mask == expected_mask).mean() > 0.99
        exact_mask, exact_levels = as_exported.run(None, {"image": as_input(rgb)})
        np.testing.assert_array_equal(exact_mask, expected_mask)
        np.testing.assert_array_equal(exact_levels, expected_levels)
        levels_seen |= set(np.unique(level_map).tolist())
    assert levels_seen == {0, 1, 2, 3}  # every level of the fuse was taken somewhere


@pytest.mark.slow
def test_export_prints_the_opset_names_shapes_and_file_size(dynamic_onnx: tuple[Path, str]):
    path, printed = dynamic_onnx
    size_mib = f"{path.stat().st_size / 2**20:.1f} MiB"
    assert f"{path} (onnx, opset " in printed and size_mib in printed
    assert "image      float32  [batch, 3, height, width]" in printed
    assert "mask       int64    [batch, height, width]" in printed
    assert "level_map  int64    [batch, height/4, width/4]" in printed
    assert "tau=0.5 (given; the checkpoint's is 0.9)" in printed


@pytest.mark.slow
def test_torchscript_bakes_in_the_checkpoints_tau_and_follows_the_input_size(
    checkpoint: Path, tmp_path: Path
):
    path, printed = export(checkpoint, tmp_path, "format=torchscript", "size=64")
    assert path == checkpoint.parent.parent / "export" / "model_64x64.pt"  # next to the training run
    assert "tau=0.9 (the checkpoint's)" in printed
    predictor = load(checkpoint, device="cpu", sparse_inference=False)  # the traced path is the dense one
    assert_torchscript_gives_the_predictors_output(path, predictor, [(2, 64, 64), (1, 32, 96)])


@pytest.mark.slow
def test_onnx_of_a_learned_fuse_runs_the_gate_and_the_mixture_in_the_graph(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    run_dir = train_tiny_checkpoint(tmp_path_factory.getbasetemp(), *LEARNED, name="learned_run")
    path, printed = export(
        run_dir / "checkpoints" / "last.ckpt", tmp_path, "size=64", f"output={tmp_path / 'm.onnx'}"
    )
    assert "learned fuse, tau=0.9" in printed
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = AS_EXPORTED
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    predictor = load(run_dir / "checkpoints" / "last.ckpt", device="cpu")
    assert predictor.fuse_rule.label == "learned"
    rgb = images(1, 64, 64, seed=0)
    mask, level_map = session.run(None, {"image": as_input(rgb)})
    expected_mask, expected_levels = predicted(predictor, rgb)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(level_map, expected_levels)


def test_export_refuses_a_file_that_is_not_an_sfseg_checkpoint(tmp_path: Path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, other)
    with pytest.raises(ValueError, match=r"ckpt_path=.*other\.ckpt: not an sfseg checkpoint"):
        export(other, tmp_path)
    with pytest.raises(ValueError, match="format='tflite' is not one of onnx, torchscript"):
        export(other, tmp_path, "format=tflite")


@pytest.mark.slow
def test_export_refuses_sizes_the_model_cannot_take(checkpoint: Path, tmp_path: Path):
    with pytest.raises(
        ValueError,
        match=r"size=\[50, 64\] must be a multiple of the model's size divisor 32.*size=\[64, 64\]",
    ):
        export(checkpoint, tmp_path, "size=[50,64]")
    with pytest.raises(ValueError, match=r"tau must be in the open interval \(0, 1\), got 1.5"):
        export(checkpoint, tmp_path, "tau=1.5")
    assert not (checkpoint.parent.parent / "export" / "model_50x64.onnx").exists()
