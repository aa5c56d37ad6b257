"""model/backbone=timm: any timm model through the fusion decoder (hierarchical encoders by their stride
4..32 features, plain ViTs through the simple feature pyramid), composed from the real config, with
sparse == dense, local weights, clear errors, two training steps through the CLI and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from hydra.utils import instantiate

from sfseg.inference import Predictor, export_model, image_logits, load
from sfseg.inference.sparse import even_level_shares, forced_unity, unity_logits_for_shares
from sfseg.models import PyramidSegmenter, create_backbone
from sfseg.models.backbones import TimmStages, TimmViT
from sfseg.pyramid import build_targets, pyramid_loss
from tests.conftest import TINY, compose_config
from tests.test_export import (
    AS_EXPORTED,
    SWEEP_TAU,
    as_input,
    assert_torchscript_gives_the_predictors_output,
    export,
    images,
    predicted,
)
from tests.test_sparse import BATCH_SHARES, TAU, assert_same_fuse, random_batch_norm_statistics
from tests.test_train import run_train

# One small model of each family, pretrained=False: hierarchical encoders (CNNs, hybrids, Swin's NHWC
# maps with dynamic image size) and plain ViTs (single-stride tokens).
HIERARCHICAL = [
    "resnet18",
    "resnext26ts",
    "convnext_atto",
    "efficientnet_b0",
    "regnetx_002",
    "mobilenetv3_small_100",
    "ghostnet_100",
    "mobilevit_xxs",
    "efficientvit_b0",
    "fastvit_t8",
    "pvt_v2_b0",
    "swin_tiny_patch4_window7_224",
]
PLAIN_VITS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]
SWIN = "swin_tiny_patch4_window7_224"
TIMM = ["model/backbone=timm"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", HIERARCHICAL + PLAIN_VITS)
def test_timm_model_composes_gives_a_stride_4_map_and_sparse_fuses_to_dense(name: str, run_dir: Path):
    cfg = compose_config([*TINY, *TIMM, f"model.backbone.name={name}"], run_dir)
    net = random_batch_norm_statistics(instantiate(cfg.model, num_classes=5).net)
    backbone, info = net.backbone, net.backbone.body.feature_info
    if name in PLAIN_VITS:
        # The last block's tokens at stride 16 (192 channels) -> strides 4, 8, 16, 32 by the neck.
        assert isinstance(backbone, TimmViT)
        assert info.reduction() == [16]
        assert [reduce[0].in_channels for reduce in backbone.reduce] == [48, 96, 192, 192]
    else:
        # The decoder reads timm's own channels of the features at strides 4..32.
        assert isinstance(backbone, TimmStages)
        assert info.reduction() == [4, 8, 16, 32]
        assert [reduce[0].in_channels for reduce in backbone.reduce] == info.channels()
    assert backbone.size_divisor == net.size_divisor == 32
    assert backbone.name == name
    # A dynamic ONNX export needs a larger example only for Swin's shifted windows: 64x96 puts its
    # stride-16 blocks on a 4x6 token grid, within one 7x7 window; (7 + 1) x 16 = 128 does not.
    assert backbone.dynamic_export_size(64, 96) == ((128, 128) if name == SWIN else (64, 96))

    batch = torch.randn(len(BATCH_SHARES), 3, 64, 96)
    unity = unity_logits_for_shares([even_level_shares(s, 4) for s in BATCH_SHARES], finest_size=(16, 24))
    with torch.inference_mode():
        assert backbone(batch).shape == (3, 720, 16, 24)
        assert [tuple(y.shape) for y in net(batch).semantic] == [
            (3, 5, 64 // s, 96 // s) for s in (32, 16, 8, 4)
        ]
        with forced_unity(net, unity):
            dense = image_logits(net, batch, TAU, sparse=False)
            sparse = image_logits(net, batch, TAU, sparse=True)
    assert_same_fuse(dense, sparse, atol=1e-4)


@pytest.mark.parametrize("name", ["convnext_atto", "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"])
def test_backward_reaches_every_parameter(name: str, run_dir: Path) -> None:
    # DDP needs a gradient for every parameter: nothing of the timm model may hang unused.
    cfg = compose_config([*TINY, *TIMM, f"model.backbone.name={name}"], run_dir)
    net = instantiate(cfg.model, num_classes=3).net.train()
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, 20:23, 5:40] = 2
    out = net(torch.randn(2, 3, 64, 64))
    pyramid_loss(out.semantic, out.unity, build_targets(labels, 4)).total.backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_the_size_divisor_comes_from_the_backbone() -> None:
    # A patch-16 ViT at L=1: the pyramid needs multiples of 4, the tokens 16, the neck's stride 32: 32.
    net = PyramidSegmenter("vit_tiny_patch16_224", num_classes=3, num_levels=1, semantic_channels=8)
    assert net.size_divisor == 32
    with pytest.raises(
        ValueError, match=r"must be divisible by 32: .*\(model\.levels=1\) and the backbone's size divisor 32"
    ):
        net(torch.randn(1, 3, 48, 64))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (
            "convnext_tny",
            r"neither one of sfseg's backbones .* nor a timm model; close timm names: convnext_tiny",
        ),
        ("levit_128s", r"timm builds this model for its 224x224 input only \(it takes no dynamic_img_size\)"),
        ("vit_small_patch14_dinov2", r"all its features have stride 14 .*token stride must be one of"),
        ("shvit_s1", r"features \(timm's feature_info\) have strides \[16, 32, 64\], none at 4, 8"),
    ],
)
def test_a_model_without_a_stride_4_to_32_pyramid_is_named_with_the_reason(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.backbone\.name='{name}'.*{why}"):
        create_backbone(name)


@pytest.mark.parametrize(("name", "indices"), [("convnext_atto", 4), ("vit_tiny_patch16_224", [11])])
def test_a_timm_state_dict_loads_into_the_feature_model(name: str, indices, tmp_path: Path) -> None:
    # timm's classification model's own names (stages.0.*, head.*, norm.*): the features_only wrapper
    # renames them (stages_0.*; the ViT's under model.*), the head is left over.
    dynamic = {"dynamic_img_size": True} if name in PLAIN_VITS else {}
    source = timm.create_model(name, **dynamic).eval()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    loaded = create_backbone(name, weights=str(tmp_path / "timm.pth")).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = source.forward_intermediates(image, indices=indices, intermediates_only=True)
        for got, want in zip(loaded.body(image), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_dynamic_onnx_export_of_swin_from_a_too_small_example_is_refused_before_exporting(
    tmp_path: Path,
) -> None:
    net = PyramidSegmenter(SWIN, num_classes=3, semantic_channels=8, unity_channels=8)
    predictor = Predictor(net=net, class_names=["a", "b", "c"], tau=0.9)
    path = tmp_path / "swin.onnx"
    with pytest.raises(
        ValueError,
        match=rf"dynamic=true from the example size=\[64, 96\]: backbone '{SWIN}' has shifted-window "
        r"attention .* Export from an example of at least size=\[128, 128\], or at a fixed size=\[H,W\]",
    ):
        export_model(predictor, path, size=[64, 96], dynamic=True)
    assert not path.exists()
    # Wider than 128: the width stays as given.
    assert net.backbone.dynamic_export_size(96, 160) == (128, 160)


def test_weights_of_another_model_are_refused_by_the_95_percent_rule(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(
        ValueError, match=r"only 0 of the \d+ tensors of backbone 'convnext_atto'.*at least 95%"
    ):
        create_backbone("convnext_atto", weights=str(tmp_path / "resnet18.pth"))


# ---------------------------------------------------------------------------------------------
# End to end: two training steps through the real CLI, then the checkpoint exported to ONNX


def assert_onnx_gives_the_predictors_output(
    path: Path, predictor: Predictor, sizes: list[tuple[int, int, int]]
) -> None:
    """The ONNX file's masks and level maps equal the dense Predictor's on noise images of `sizes`."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = AS_EXPORTED
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for seed, (batch, height, width) in enumerate(sizes):
        rgb = images(batch, height, width, seed)
        mask, level_map = session.run(None, {"image": as_input(rgb)})
        expected_mask, expected_levels = predicted(predictor, rgb)
        np.testing.assert_array_equal(level_map, expected_levels)
        np.testing.assert_array_equal(mask, expected_mask)


def check_swin_exports(checkpoint: Path, predictor: Predictor, tmp_path: Path) -> None:
    """Swin at 64 px: a dynamic ONNX graph from this example is refused before exporting; the fixed-size
    graph and the TorchScript trace (which follows the input size) give the Predictor's output."""
    with pytest.raises(ValueError, match=r"at least size=\[128, 128\], or at a fixed size=\[H,W\]"):
        export(checkpoint, tmp_path, "size=[64,64]", "dynamic=true")
    assert not (checkpoint.parent.parent / "export" / "model_dynamic.onnx").exists()
    path, _ = export(checkpoint, tmp_path, "size=[64,64]", f"tau={SWEEP_TAU}")
    assert_onnx_gives_the_predictors_output(path, predictor, [(1, 64, 64)])
    path, _ = export(checkpoint, tmp_path, "format=torchscript", "size=64", f"tau={SWEEP_TAU}")
    assert_torchscript_gives_the_predictors_output(path, predictor, [(1, 64, 64), (2, 96, 128)])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_atto", SWIN, "vit_tiny_patch16_224"])
def test_trains_two_steps_through_the_cli_and_exports(name: str, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train(*TINY, *TIMM, f"model.backbone.name={name}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 1
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["backbone"]["name"] == name
    predictor = load(checkpoint, device="cpu", sparse_inference=False)
    predictor.tau = SWEEP_TAU
    if name == SWIN:
        check_swin_exports(checkpoint, predictor, tmp_path)
        return
    path, _ = export(checkpoint, tmp_path, "size=[64,96]", "dynamic=true", f"tau={SWEEP_TAU}")
    assert_onnx_gives_the_predictors_output(path, predictor, [(2, 64, 96), (1, 128, 64)])
