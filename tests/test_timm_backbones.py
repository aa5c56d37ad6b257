"""model/backbone=timm: any timm model as the encoder (hierarchical encoders by their stride 4..32
features, plain ViTs of any patch size through the ViT neck), composed from the real config, with sparse
== dense, the maps aligned with the image (a known answer), local weights, clear errors, and a frozen
DINOv2 (registers, patch 14) trained, evaluated, predicted and exported to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from hydra.utils import instantiate
from PIL import Image

from sfseg.inference import Predictor, export_model, image_logits, load
from sfseg.inference.sparse import even_level_shares, forced_unity, unity_logits_for_shares
from sfseg.models import PyramidSegmenter, create_backbone
from sfseg.models.encoders import PlainViT, TimmStages
from sfseg.models.necks import resampled_stride
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
# Plain ViTs: (patch, prefix tokens, position embedding), every kind the neck meets.
PLAIN_VITS = {
    "vit_tiny_patch16_224": (16, "class", "absolute"),
    "deit_tiny_distilled_patch16_224": (16, "class + distillation", "absolute"),
    "vit_wee_patch16_reg1_gap_256": (16, "1 register, no class", "absolute"),
    "vit_medium_patch16_gap_256": (16, "none", "absolute"),
    "vit_small_patch14_dinov2": (14, "class", "absolute"),
    "vit_small_patch14_reg4_dinov2": (14, "class + 4 registers", "absolute"),
    "vit_small_patch16_dinov3": (16, "class + 4 registers", "rotary"),
    "eva02_tiny_patch14_224": (14, "class", "rotary"),
}
SWIN = "swin_tiny_patch4_window7_224"
DINOV2_REG = "vit_small_patch14_reg4_dinov2"
TIMM = ["model/backbone=timm"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", HIERARCHICAL + list(PLAIN_VITS))
def test_timm_model_composes_gives_a_stride_4_map_and_sparse_fuses_to_dense(name: str, run_dir: Path):
    cfg = compose_config([*TINY, *TIMM, f"model.backbone.name={name}", "model.decoder.channels=32"], run_dir)
    assert cfg.model.decoder.name == "segformer"  # model/backbone=timm's default decoder
    net = random_batch_norm_statistics(instantiate(cfg.model, num_classes=5).net)
    backbone, info = net.backbone, net.backbone.body.feature_info
    if name in PLAIN_VITS:
        # The last four blocks' tokens at the patch stride; the neck resamples a patch of 14 to stride 16.
        patch = PLAIN_VITS[name][0]
        depth = len(backbone.body.model.blocks)
        assert isinstance(backbone.encoder, PlainViT) and backbone.encoder.patch_size == patch
        assert backbone.encoder.layers == tuple(range(depth - 4, depth)) and info.reduction() == [patch] * 4
        assert backbone.neck.stride == resampled_stride(patch) == 16
        assert backbone.neck.merge is not None
    else:
        # The decoder reads timm's own channels of the features at strides 4..32.
        assert isinstance(backbone.encoder, TimmStages)
        assert info.reduction() == [4, 8, 16, 32]
        assert [linear.in_channels for linear in backbone.linear] == info.channels()
    assert backbone.size_divisor == net.size_divisor == 32  # not a multiple of 14 for a patch-14 ViT
    assert backbone.name == name
    # A dynamic ONNX export needs a larger example only for Swin's shifted windows: 64x96 puts its
    # stride-16 blocks on a 4x6 token grid, within one 7x7 window; (7 + 1) x 16 = 128 does not.
    assert backbone.dynamic_export_size(64, 96) == ((128, 128) if name == SWIN else (64, 96))

    batch = torch.randn(len(BATCH_SHARES), 3, 64, 96)
    unity = unity_logits_for_shares([even_level_shares(s, 4) for s in BATCH_SHARES], finest_size=(16, 24))
    with torch.inference_mode():
        assert backbone(batch).shape == (3, 32, 16, 24)
        assert [tuple(y.shape) for y in net(batch).semantic] == [
            (3, 5, 64 // s, 96 // s) for s in (32, 16, 8, 4)
        ]
        with forced_unity(net, unity):
            dense = image_logits(net, batch, TAU, sparse=False)
            sparse = image_logits(net, batch, TAU, sparse=True)
    assert_same_fuse(dense, sparse, atol=1e-4)


@pytest.mark.parametrize("name", ["convnext_atto", SWIN, DINOV2_REG])
def test_backward_reaches_every_parameter(name: str, run_dir: Path) -> None:
    # DDP needs a gradient for every parameter: nothing of the timm model, the neck or the decoder may
    # hang unused (a ViT's blocks after the last one read are pruned).
    cfg = compose_config([*TINY, *TIMM, f"model.backbone.name={name}", "model.decoder.channels=32"], run_dir)
    net = instantiate(cfg.model, num_classes=3).net.train()
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, 20:23, 5:40] = 2
    out = net(torch.randn(2, 3, 64, 64))
    pyramid_loss(out.semantic, out.unity, build_targets(labels, 4)).total.backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_the_size_divisor_comes_from_the_backbone() -> None:
    # A patch-16 ViT at L=1: the pyramid needs multiples of 4, the neck's stride 32: 32.
    net = PyramidSegmenter("vit_tiny_patch16_224", num_classes=3, num_levels=1, semantic_channels=8)
    assert net.size_divisor == 32
    with pytest.raises(
        ValueError, match=r"must be divisible by 32: .*\(model\.levels=1\) and the backbone's size divisor 32"
    ):
        net(torch.randn(1, 3, 48, 64))


# ---------------------------------------------------------------------------------------------
# Plain ViTs: the maps are aligned with the image, and the prefix tokens never reach them


def as_patch_pyramid(backbone) -> None:
    """Every transformer block of the ViT made the identity (its attention and MLP branches zeroed), so
    that a token depends on its own patch alone and the prefix tokens (class, registers) mix with
    nothing: what reaches a map cell is then a matter of geometry only."""
    for block in backbone.body.model.blocks:
        for branch in (block.attn.proj, block.mlp.fc2):
            torch.nn.init.zeros_(branch.weight)
            torch.nn.init.zeros_(branch.bias)


def touched(span: tuple[int, int], cells: int, size: int) -> set[int]:
    """The cells of `size` pixels (cell i covers [size*i, size*i + size)) a pixel span [a, b) touches."""
    return {i for i in range(cells) if size * i < span[1] and span[0] < size * (i + 1)}


def resampled(tokens: set[int], count: int, patch: int, stride: int, cells: int) -> set[int]:
    """The stride-`stride` cells bilinear interpolation reads from `tokens`: cell j, centred at pixel
    stride*(j + 1/2), reads the token centres p*(i + 1/2) on either side of it (clamped at the ends)."""
    reached = set()
    for j in range(cells):
        position = min(max(stride * (j + 0.5) / patch - 0.5, 0.0), count - 1.0)
        low = int(position)
        read = {low} | ({low + 1} if position > low else set())
        if read & tokens:
            reached.add(j)
    return reached


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"])
def test_a_marked_pixel_block_lands_in_its_cells_at_every_level(name: str) -> None:
    # 64x96 is no multiple of 14: DINOv2's tokens cover 70x98 pixels, the padding at the bottom and right.
    # The block's edges lie within a few pixels of token edges, so a padding at the top or left (or one
    # split between both sides), or a resampling off the pixel grid, marks other cells.
    backbone = create_backbone(name, decoder={"name": "segformer", "channels": 8}).eval()
    as_patch_pyramid(backbone)
    rows, cols, (height, width) = (24, 40), (50, 70), (64, 96)
    blank = torch.zeros(1, 3, height, width)
    marked = blank.clone()
    marked[..., rows[0] : rows[1], cols[0] : cols[1]] = 2.0
    with torch.no_grad():
        before, after = backbone.encode(blank), backbone.encode(marked)
        tokens = backbone.encoder.features(backbone.body, marked)[-1]
    patch, stride = backbone.encoder.patch_size, backbone.neck.stride
    grid = (-(-height // patch), -(-width // patch))
    assert tokens.shape[-2:] == grid
    token_rows, token_cols = touched(rows, grid[0], patch), touched(cols, grid[1], patch)
    at_stride = {
        stride: (
            resampled(token_rows, grid[0], patch, stride, height // stride),
            resampled(token_cols, grid[1], patch, stride, width // stride),
        )
    }
    for finer in (8, 4):  # transposed convolutions: each cell from its parent alone
        parent_rows, parent_cols = at_stride[2 * finer]
        at_stride[finer] = tuple(
            {j for j in range(n) if j // 2 in parent}
            for n, parent in [(height // finer, parent_rows), (width // finer, parent_cols)]
        )
    at_stride[32] = tuple({j // 2 for j in cells} for cells in at_stride[16])  # a 2x2 max pool
    for level, (old, new) in enumerate(zip(before, after, strict=True)):
        level_stride = 4 * 2**level
        assert new.shape[-2:] == (height // level_stride, width // level_stride)
        changed = ((new - old).abs().amax(dim=(0, 1)) > 1e-5).nonzero().tolist()
        expected_rows, expected_cols = at_stride[level_stride]
        assert sorted(changed) == sorted([r, c] for r in expected_rows for c in expected_cols), level_stride


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit_tiny_distilled_patch16_224"])
def test_class_register_and_distillation_tokens_never_reach_the_maps(name: str) -> None:
    backbone = create_backbone(name, decoder={"name": "segformer", "channels": 8}).eval()
    as_patch_pyramid(backbone)
    model = backbone.body.model
    prefixes = [
        p
        for p in (model.cls_token, getattr(model, "reg_token", None), getattr(model, "dist_token", None))
        if p is not None
    ]
    assert sum(p.shape[1] for p in prefixes) == model.num_prefix_tokens > 1
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = backbone.encode(images)
        for prefix in prefixes:
            prefix.fill_(1e4)
        assert all(torch.equal(a, b) for a, b in zip(maps, backbone.encode(images), strict=True))


@pytest.mark.parametrize(
    ("layers", "why"),
    [
        (
            [12],
            r"model\.backbone\.layers=\[12\]: \[12\] outside the 12 blocks of 'vit_small_patch14_dinov2' "
            r"\(indices 0\.\.11, or -12\.\.-1",
        ),
        ([-13, 3], r"\[-13\] outside the 12 blocks"),
        ([3, -9], r"names a block twice"),
        ([], r"must be a non-empty list of block indices"),
    ],
)
def test_a_layers_index_outside_the_models_depth_names_the_depth(layers: list[int], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        create_backbone("vit_small_patch14_dinov2", layers=layers)


def test_layers_pick_the_blocks_and_prune_the_rest() -> None:
    backbone = create_backbone("vit_small_patch14_dinov2", layers=[-1])
    assert backbone.encoder.layers == (11,) and backbone.neck.merge is None  # DINOv2's "lin.": one block
    backbone = create_backbone("vit_small_patch14_dinov2", layers=[5, 1])
    assert backbone.encoder.layers == (1, 5) and len(backbone.body.model.blocks) == 6
    with pytest.raises(
        ValueError, match=r"layers applies to plain ViTs only; .*'convnext_atto' is a hierarchical"
    ):
        create_backbone("convnext_atto", layers=[-1])


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (
            "convnext_tny",
            r"neither one of sfseg's backbones .* nor a timm model; close timm names: convnext_tiny",
        ),
        ("levit_128s", r"timm builds this model for its 224x224 input only \(it takes no dynamic_img_size\)"),
        (
            "test_vit_relpos",
            r"timm builds this model for its 160x160 input only \(it takes no dynamic_img_size\)",
        ),
        ("shvit_s1", r"features \(timm's feature_info\) have strides \[16, 32, 64\], none at 4, 8"),
    ],
)
def test_a_model_that_cannot_give_the_maps_is_named_with_the_reason(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.backbone\.name='{name}'.*{why}"):
        create_backbone(name)


@pytest.mark.parametrize(("name", "layers"), [("convnext_atto", None), ("vit_tiny_patch16_224", [8, 11])])
def test_a_timm_state_dict_loads_into_the_feature_model(name: str, layers, tmp_path: Path) -> None:
    # timm's classification model's own names (stages.0.*, head.*, norm.*): the features_only wrapper
    # renames them (stages_0.*; the ViT's under model.*), the head is left over.
    dynamic = {"dynamic_img_size": True} if name in PLAIN_VITS else {}
    source = timm.create_model(name, **dynamic).eval()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    loaded = create_backbone(name, weights=str(tmp_path / "timm.pth"), layers=layers).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        # A ViT's blocks through its final norm (DINOv2's get_intermediate_layers(norm=True)).
        expected = source.forward_intermediates(
            image, indices=layers or 4, intermediates_only=True, norm=bool(layers)
        )
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


@pytest.mark.slow
def test_swins_torchscript_trace_follows_the_input_size(tmp_path: Path) -> None:
    # Swin's channels-last maps through the segformer decoder, traced from 64x64 (a dynamic ONNX graph from
    # there is refused above); the trace follows other sizes.
    net = random_batch_norm_statistics(
        PyramidSegmenter(
            SWIN, 3, semantic_channels=8, unity_channels=8, decoder={"name": "segformer", "channels": 16}
        )
    )
    predictor = Predictor(net=net, class_names=["a", "b", "c"], tau=SWEEP_TAU)
    exported = export_model(predictor, tmp_path / "swin.pt", format="torchscript", size=[64, 64])
    assert_torchscript_gives_the_predictors_output(exported.path, predictor, [(1, 64, 64), (2, 96, 128)])


def test_weights_of_another_model_are_refused_by_the_95_percent_rule(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(
        ValueError, match=r"only 0 of the \d+ tensors of backbone 'convnext_atto'.*at least 95%"
    ):
        create_backbone("convnext_atto", weights=str(tmp_path / "resnet18.pth"))


# ---------------------------------------------------------------------------------------------
# End to end: a frozen DINOv2 with registers (patch 14: padded, resampled) trained two steps in this
# process, then evaluated, predicted and exported to ONNX with free height and width. Its first two
# blocks only (model.backbone.layers=[0,1]: the rest is pruned) and L=2 without a context module, so that
# the export stays short (tests/test_export.py exports the full heads).

FROZEN_DINOV2 = [
    *TINY,
    *TIMM,
    f"model.backbone.name={DINOV2_REG}",
    "model.backbone.layers=[0,1]",
    "model.backbone.freeze=true",
    "model.decoder.channels=32",
    "model.levels=2",
    "model/context=none",
]


@pytest.fixture(scope="module")
def frozen_dinov2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sfseg.train import train

    run_dir = tmp_path_factory.mktemp("frozen_dinov2") / "run"
    torch.set_num_threads(1)
    metrics = train(compose_config([*FROZEN_DINOV2, f"hydra.run.dir={run_dir}"], run_dir))
    assert metrics["step"] == 2 and 0 <= metrics["mIoU"] <= 1
    return run_dir


@pytest.mark.slow
def test_a_frozen_dinov2_checkpoint_evaluates_and_predicts(frozen_dinov2_run: Path, tmp_path: Path):
    from sfseg.eval import run as eval_run
    from sfseg.predict import run as predict_run

    checkpoint = frozen_dinov2_run / "checkpoints" / "last.ckpt"
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["backbone"]["freeze"] is True and hparams["decoder"] == {
        "name": "segformer",
        "channels": 32,
    }
    trained = json.loads((frozen_dinov2_run / "metrics.json").read_text())
    cfg = compose_config([f"ckpt_path={checkpoint}", "eval.device=cpu"], tmp_path / "eval", "eval")
    scores = eval_run(cfg)
    assert scores["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)  # the validation of training, again
    picture = tmp_path / "scene.png"
    Image.fromarray(images(1, 70, 100, seed=3)[0]).save(picture)  # no multiple of 14 nor of 32
    cfg = compose_config(
        [f"ckpt_path={checkpoint}", f"input={picture}", f"output={tmp_path / 'out'}", "device=cpu"],
        tmp_path,
        "predict",
    )
    assert predict_run(cfg) == 0  # no file skipped
    mask = np.asarray(Image.open(tmp_path / "out" / "scene_mask.png"))
    assert mask.shape == (70, 100)


@pytest.mark.slow
def test_a_frozen_dinov2_exports_to_onnx_with_free_height_and_width(frozen_dinov2_run: Path, tmp_path: Path):
    checkpoint = frozen_dinov2_run / "checkpoints" / "last.ckpt"
    path, _ = export(checkpoint, tmp_path, "size=[64,96]", "dynamic=true", f"tau={SWEEP_TAU}")
    predictor = load(checkpoint, device="cpu", sparse_inference=False)
    predictor.tau = SWEEP_TAU
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = AS_EXPORTED
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # Other sizes pad to other multiples of 14 inside the graph: 64 -> 70, 96 -> 98, 128 -> 140, 160 -> 168.
    for seed, (batch, height, width) in enumerate([(2, 64, 96), (1, 128, 160)]):
        rgb = images(batch, height, width, seed)
        mask, level_map = session.run(None, {"image": as_input(rgb)})
        expected_mask, expected_levels = predicted(predictor, rgb)
        np.testing.assert_array_equal(level_map, expected_levels)
        np.testing.assert_array_equal(mask, expected_mask)
