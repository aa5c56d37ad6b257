"""model.backbone.weights: the weights files users already have, in each release's key layout, written
from randomly initialised models (no download) and loaded back into sfseg's timm backbones."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

from sfseg.models import create_backbone
from sfseg.models.encoders import STAGES
from sfseg.models.weights import remap_weights

LOGGER = "sfseg.models.weights"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_backbone_holds(backbone, source: dict[str, torch.Tensor]) -> None:
    """Every tensor of the backbone equals the source's tensor of the same (timm) name."""
    state = backbone.body.state_dict()
    assert set(state) <= set(source)
    for key, tensor in state.items():
        assert torch.equal(tensor, source[key]), key


# The stage layout of the official releases (HRNet-Image-Classification's experiments/*.yaml): per stage
# (modules, block, blocks per branch, channels per branch). Stage 1 is one branch of Bottlenecks.
OFFICIAL_HRNET_STAGES = {
    "hrnet_w18_small_v2": [
        (1, "BOTTLENECK", [2], [64]),
        (1, "BASIC", [2, 2], [18, 36]),
        (3, "BASIC", [2, 2, 2], [18, 36, 72]),
        (2, "BASIC", [2, 2, 2, 2], [18, 36, 72, 144]),
    ],
    "hrnet_w18": [
        (1, "BOTTLENECK", [4], [64]),
        (1, "BASIC", [4, 4], [18, 36]),
        (4, "BASIC", [4, 4, 4], [18, 36, 72]),
        (3, "BASIC", [4, 4, 4, 4], [18, 36, 72, 144]),
    ],
}
EXPANSION = {"BASIC": 1, "BOTTLENECK": 4}


def official_hrnet_shapes(name: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """The tensor names and shapes of an official HRNet ImageNet release (lib/models/cls_hrnet.py's
    HighResolutionNet), worked out from the official module layout, not from timm: the backbone's
    and the classification head's (incre_modules, downsamp_modules, final_layer, classifier).
    BatchNorm has no num_batches_tracked, as in releases saved before PyTorch 0.4.1."""
    shapes: dict[str, tuple] = {}

    def conv(key: str, out: int, inp: int, size: int, bias: bool = False) -> None:
        shapes[f"{key}.weight"] = (out, inp, size, size)
        if bias:
            shapes[f"{key}.bias"] = (out,)

    def norm(key: str, channels: int) -> None:
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{tensor}"] = (channels,)

    def layer(key: str, block: str, inp: int, planes: int, blocks: int) -> int:  # _make_layer
        out = planes * EXPANSION[block]
        for index in range(blocks):
            prefix, block_inp = f"{key}.{index}", inp if index == 0 else out
            if block == "BASIC":
                conv(f"{prefix}.conv1", planes, block_inp, 3), norm(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3), norm(f"{prefix}.bn2", planes)
            else:
                conv(f"{prefix}.conv1", planes, block_inp, 1), norm(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3), norm(f"{prefix}.bn2", planes)
                conv(f"{prefix}.conv3", out, planes, 1), norm(f"{prefix}.bn3", out)
            if index == 0 and block_inp != out:
                conv(f"{prefix}.downsample.0", out, block_inp, 1), norm(f"{prefix}.downsample.1", out)
        return out

    conv("conv1", 64, 3, 3), norm("bn1", 64), conv("conv2", 64, 64, 3), norm("bn2", 64)
    (_, block, (blocks,), (planes,)), *stages = OFFICIAL_HRNET_STAGES[name]
    previous = [layer("layer1", block, 64, planes, blocks)]
    for stage, (modules, block, blocks, channels) in enumerate(stages, start=2):
        current = [width * EXPANSION[block] for width in channels]
        for branch, width in enumerate(current):  # _make_transition_layer (None: no tensors)
            key = f"transition{stage - 1}.{branch}"
            if branch < len(previous) and width != previous[branch]:
                conv(f"{key}.0", width, previous[branch], 3), norm(f"{key}.1", width)
            for step in range(branch + 1 - len(previous)):
                out = width if step == branch - len(previous) else previous[-1]
                conv(f"{key}.{step}.0", out, previous[-1], 3), norm(f"{key}.{step}.1", out)
        for module in range(modules):  # HighResolutionModule
            key = f"stage{stage}.{module}"
            for branch, width in enumerate(current):
                layer(f"{key}.branches.{branch}", block, width, channels[branch], blocks[branch])
            for i, width in enumerate(current):  # fuse_layers[i][j]; j == i: None
                for j, source in enumerate(current):
                    if j > i:
                        conv(f"{key}.fuse_layers.{i}.{j}.0", width, source, 1)
                        norm(f"{key}.fuse_layers.{i}.{j}.1", width)
                    for step in range(i - j):
                        out = width if step == i - j - 1 else source
                        conv(f"{key}.fuse_layers.{i}.{j}.{step}.0", out, source, 3)
                        norm(f"{key}.fuse_layers.{i}.{j}.{step}.1", out)
        previous = current
    backbone = dict(shapes)
    shapes.clear()
    head_channels = [32, 64, 128, 256]  # _make_head: Bottlenecks to 128, 256, 512, 1024 channels
    for branch, width in enumerate(previous):
        layer(f"incre_modules.{branch}", "BOTTLENECK", width, head_channels[branch], 1)
    for index in range(3):
        inp, out = 4 * head_channels[index], 4 * head_channels[index + 1]
        conv(f"downsamp_modules.{index}.0", out, inp, 3, bias=True), norm(f"downsamp_modules.{index}.1", out)
    conv("final_layer.0", 2048, 1024, 1, bias=True), norm("final_layer.1", 2048)
    shapes["classifier.weight"], shapes["classifier.bias"] = (1000, 2048), (1000,)
    return backbone, dict(shapes)


def random_tensors(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Values no freshly built backbone has (BatchNorm variances kept positive)."""
    return {
        key: torch.rand(shape) + 0.5 if key.endswith("running_var") else torch.randn(shape)
        for key, shape in shapes.items()
    }


@pytest.mark.parametrize(
    ("name", "official_file"),
    [
        ("hrnet_w18_small_v2", "hrnet_w18_small_model_v2.pth"),
        ("hrnet_w18", "hrnetv2_w18_imagenet_pretrained.pth"),
    ],
)
def test_official_hrnet_imagenet_release_loads(name: str, official_file: str, tmp_path: Path, caplog) -> None:
    """A file in the official release's layout: cls_hrnet's backbone names are timm's (timm ported
    cls_hrnet and keeps its module names), so the remap renames nothing there. What it must do: drop the
    classification head's tensors, load every backbone tensor with its value, and not miss the BatchNorm
    counters the old files lack."""
    backbone_shapes, head_shapes = official_hrnet_shapes(name)
    release = random_tensors(backbone_shapes) | random_tensors(head_shapes)
    torch.save(release, tmp_path / official_file)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backbone = create_backbone(name, weights=str(tmp_path / official_file))
    state = backbone.body.state_dict()
    weights = {key: tensor for key, tensor in state.items() if not key.endswith("num_batches_tracked")}
    assert {key: tuple(tensor.shape) for key, tensor in weights.items()} == backbone_shapes
    for key, tensor in weights.items():
        assert torch.equal(tensor, release[key]), key
    # 4 incre Bottlenecks of 20 tensors, 3 downsamp and the final layer of 6, the classifier's 2
    assert len(head_shapes) == 4 * 20 + 3 * 6 + 6 + 2 and not set(head_shapes) & set(state)
    assert (
        f"loaded {len(weights)}/{len(weights)} tensors from {tmp_path / official_file}; "
        f"{len(head_shapes)} head tensors dropped; 0 missing; 0 unexpected"
    ) in caplog.text


@pytest.mark.parametrize("name", ["hrnet_w32", "hrnet_w48"])
def test_every_hrnet_release_maps_onto_its_backbone_exactly(name: str) -> None:
    """W32 and W48 have the same names (only widths differ): nothing missing, nothing unexpected."""
    remapped = remap_weights(timm.create_model(name, pretrained=False).state_dict(), deep_stem=False)
    features = timm.create_model(name, features_only=True, out_indices=STAGES, feature_location="")
    assert set(remapped.state) == set(features.state_dict())


@pytest.mark.parametrize("wrapper", ["model.", "module.model."])
@pytest.mark.parametrize("head", ["ocr", "last_layer"])
def test_hrnet_semantic_segmentation_checkpoint_loads_its_backbone(
    wrapper: str, head: str, tmp_path: Path, caplog
) -> None:
    """HRNet-Semantic-Segmentation saves FullModel (model.*, loss.*), possibly through DataParallel
    (module.*), in a dict with 'state_dict'; seg_hrnet's head is last_layer, seg_hrnet_ocr's the rest."""
    # seg_hrnet's backbone has cls_hrnet's names; these files are newer, with BatchNorm counters.
    source_state = random_tensors(official_hrnet_shapes("hrnet_w18_small_v2")[0])
    for key in [key for key in source_state if key.endswith("running_mean")]:
        source_state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(1000)
    heads = {
        "ocr": [
            "conv3x3_ocr.0.weight",
            "conv3x3_ocr.1.running_mean",
            "ocr_distri_head.object_context_block.f_pixel.0.weight",
            "ocr_distri_head.conv_bn_dropout.0.weight",
            "cls_head.weight",
            "aux_head.0.weight",
            "aux_head.3.bias",
        ],
        "last_layer": ["last_layer.0.weight", "last_layer.1.running_var", "last_layer.3.weight"],
    }[head]
    state = {f"{wrapper}{key}": value for key, value in source_state.items()}
    state.update({f"{wrapper}{key}": torch.randn(7) for key in heads})
    state[wrapper.removesuffix("model.") + "loss.criterion.weight"] = torch.ones(19)
    torch.save({"epoch": 12, "best_mIoU": 0.41, "state_dict": state}, tmp_path / "best.pth")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backbone = create_backbone("hrnet_w18_small_v2", weights=str(tmp_path / "best.pth"))
    assert backbone.body.state_dict().keys() == source_state.keys()
    assert_backbone_holds(backbone, source_state)
    assert f"{len(heads) + 1} head tensors dropped; 0 missing; 0 unexpected" in caplog.text


@torch.no_grad()
def test_torchvision_resnet101_loads_and_computes_the_same_stages(tmp_path: Path) -> None:
    reference = torchvision.models.resnet101(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet101-63fe2227.pth")
    backbone = create_backbone("resnet101", weights=str(tmp_path / "resnet101-63fe2227.pth")).eval()
    assert_backbone_holds(backbone, reference.state_dict())
    images = torch.randn(1, 3, 64, 64)
    x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
    expected = []
    for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
        x = layer(x)
        expected.append(x)
    for stage, reference_stage in zip(backbone.body(images), expected, strict=True):
        torch.testing.assert_close(stage, reference_stage)


# mmsegmentation's ResNetV1c stem (mmseg.models.backbones.ResNet._make_stem_layer with deep_stem):
# Sequential(conv 3->32 stride 2, BN, ReLU, conv 32->32, BN, ReLU, conv 32->64, BN, ReLU).
MMSEG_STEM_SHAPES = {
    "stem.0.weight": (32, 3, 3, 3),
    "stem.1.weight": (32,),
    "stem.3.weight": (32, 32, 3, 3),
    "stem.4.running_var": (32,),
    "stem.6.weight": (64, 32, 3, 3),
    "stem.7.bias": (64,),
}
TIMM_TO_MMSEG_STEM = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.", "conv1.6.": "stem.6.", "bn1.": "stem.7."}  # fmt: skip


def mmseg_checkpoint(timm_state: dict[str, torch.Tensor], deep_stem: bool) -> dict:
    """An mmsegmentation checkpoint: meta, optimizer and a state_dict with backbone.* and the heads."""
    backbone = {}
    for key, value in timm_state.items():
        if deep_stem:
            prefix = next((p for p in TIMM_TO_MMSEG_STEM if key.startswith(p)), None)
            key = TIMM_TO_MMSEG_STEM[prefix] + key.removeprefix(prefix) if prefix else key
        backbone[f"backbone.{key}"] = value
    heads = {"decode_head.conv_seg.weight": torch.randn(150, 512, 1, 1), "auxiliary_head.convs.0.conv.weight": torch.randn(256, 1024, 3, 3)}  # fmt: skip
    return {
        "meta": {"mmseg_version": "0.30.0", "CLASSES": ["wall", "building"], "iter": 160000},
        "state_dict": {**backbone, **heads},
        "optimizer": {"state": {}, "param_groups": []},
    }


@torch.no_grad()
def test_mmsegmentation_resnet101_v1c_loads_into_the_deep_stem_backbone(tmp_path: Path, caplog) -> None:
    source = create_backbone("resnet101c").eval()
    checkpoint = mmseg_checkpoint(source.body.state_dict(), deep_stem=True)
    for key, shape in MMSEG_STEM_SHAPES.items():
        assert tuple(checkpoint["state_dict"][f"backbone.{key}"].shape) == shape
    torch.save(checkpoint, tmp_path / "pspnet_r101-d8_512x512_160k_ade20k.pth")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = create_backbone(
            "resnet101c", weights=str(tmp_path / "pspnet_r101-d8_512x512_160k_ade20k.pth")
        )
    assert_backbone_holds(loaded, source.body.state_dict())
    images = torch.randn(1, 3, 64, 64)
    for stage, expected in zip(loaded.body.eval()(images), source.body(images), strict=True):
        torch.testing.assert_close(stage, expected)
    assert "2 head tensors dropped; 0 missing; 0 unexpected" in caplog.text
    # The plain ResNet-101 has one 7x7 conv: the deep stem cannot go there.
    with pytest.raises(ValueError, match=r"ResNetV1c deep stem \(stem\.\*\).*model/backbone=resnet101c"):
        create_backbone("resnet101", weights=str(tmp_path / "pspnet_r101-d8_512x512_160k_ade20k.pth"))


def test_mmsegmentation_plain_resnet101_loads(tmp_path: Path) -> None:
    source = timm.create_model("resnet101", features_only=True, out_indices=STAGES).state_dict()
    torch.save(mmseg_checkpoint(source, deep_stem=False), tmp_path / "fcn_r101.pth")
    assert_backbone_holds(create_backbone("resnet101", weights=str(tmp_path / "fcn_r101.pth")), source)


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path, caplog) -> None:
    state = timm.create_model("hrnet_w18_small", pretrained=False).state_dict()
    del state["conv1.weight"], state["stage2.0.fuse_layers.0.1.0.weight"]
    state["stage9.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        create_backbone("hrnet_w18_small", weights=str(tmp_path / "partial.pth"))
    assert "2 missing; 1 unexpected" in caplog.text
    assert "conv1.weight" in caplog.text and "stage2.0.fuse_layers.0.1.0.weight" in caplog.text
    assert "stage9.extra.weight" in caplog.text


def test_fewer_than_95_percent_loaded_is_an_error_naming_file_and_keys(tmp_path: Path) -> None:
    state = timm.create_model(
        "hrnet_w18_small", features_only=True, out_indices=STAGES, feature_location=""
    ).state_dict()
    weights = [key for key in state if not key.endswith("num_batches_tracked")]
    for key in weights[: int(0.06 * len(weights))]:  # 94 % left
        del state[key]
    torch.save(state, tmp_path / "truncated.pth")
    with pytest.raises(ValueError) as error:
        create_backbone("hrnet_w18_small", weights=str(tmp_path / "truncated.pth"))
    message = str(error.value)
    assert "truncated.pth" in message and "at least 95% must load" in message
    assert "missing: conv1.weight, bn1.weight" in message


def test_num_batches_tracked_counters_are_not_required(tmp_path: Path, caplog) -> None:
    """Releases saved before PyTorch 0.4.1 have no BatchNorm counters; they still load completely."""
    state = timm.create_model("hrnet_w18_small", pretrained=False).state_dict()
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        create_backbone("hrnet_w18_small", weights=str(tmp_path / "old.pth"))
    assert "0 missing; 0 unexpected" in caplog.text


def test_shape_mismatch_is_an_error_naming_file_and_keys(tmp_path: Path) -> None:
    # HRNet-W18's names with W32's widths: everything matches by name, nothing by shape.
    torch.save(timm.create_model("hrnet_w32", pretrained=False).state_dict(), tmp_path / "w32.pth")
    with pytest.raises(
        ValueError,
        match=r"w32\.pth.*backbone 'hrnet_w18'.*differ in shape: .*transition1\.0\.0\.weight \(32, 256, 3, 3\) \(backbone \(18, 256, 3, 3\)\)",
    ):
        create_backbone("hrnet_w18", weights=str(tmp_path / "w32.pth"))


def test_files_torch_refuses_to_unpickle_get_a_way_out(tmp_path: Path) -> None:
    state = timm.create_model("hrnet_w18_small", pretrained=False).state_dict()
    torch.save({"state_dict": state, "best_mIoU": np.float64(0.45)}, tmp_path / "numpy.pth")
    with pytest.raises(ValueError, match=r"numpy\.pth.*weights_only=True.*save its state dict alone"):
        create_backbone("hrnet_w18_small", weights=str(tmp_path / "numpy.pth"))


# --- DINOv2 and DINOv3: the official releases' layouts, read through timm's own converters ----------------


def official_dino_block_shapes(depth: int, dim: int) -> dict[str, tuple]:
    """The tensors of `depth` blocks of facebookresearch/dinov2's and dinov3's ViTs (layers/block.py: norm1,
    attn.qkv, attn.proj, ls1 (LayerScale's gamma), norm2, mlp.fc1, mlp.fc2, ls2), with MLP ratio 4."""
    shapes: dict[str, tuple] = {}
    for index in range(depth):
        block = f"blocks.{index}"
        shapes |= {f"{block}.norm1.weight": (dim,), f"{block}.norm1.bias": (dim,)}
        shapes |= {f"{block}.attn.qkv.weight": (3 * dim, dim), f"{block}.attn.qkv.bias": (3 * dim,)}
        shapes |= {f"{block}.attn.proj.weight": (dim, dim), f"{block}.attn.proj.bias": (dim,)}
        shapes |= {
            f"{block}.ls1.gamma": (dim,),
            f"{block}.norm2.weight": (dim,),
            f"{block}.norm2.bias": (dim,),
        }
        shapes |= {f"{block}.mlp.fc1.weight": (4 * dim, dim), f"{block}.mlp.fc1.bias": (4 * dim,)}
        shapes |= {f"{block}.mlp.fc2.weight": (dim, 4 * dim), f"{block}.mlp.fc2.bias": (dim,)}
        shapes[f"{block}.ls2.gamma"] = (dim,)
    return shapes


def official_dinov2_shapes(
    registers: int, dim: int = 384, depth: int = 12, patch: int = 14
) -> dict[str, tuple]:
    """dinov2_vits14_pretrain.pth (and _reg4_): DinoVisionTransformer(img_size=518, patch_size=14,
    block_chunks=0) of dinov2/models/vision_transformer.py: a position embedding for 518x518 (37x37 patches)
    that includes the class token, the register tokens apart, and the pretraining's mask token."""
    grid = 518 // patch
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    shapes |= {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    return shapes | official_dino_block_shapes(depth, dim) | {"norm.weight": (dim,), "norm.bias": (dim,)}


def official_dinov3_shapes(dim: int = 384, depth: int = 12, heads: int = 6) -> dict[str, tuple]:
    """dinov3_vits16_pretrain_lvd1689m-08c60483.pth: hub/backbones.py's dinov3_vits16, a
    DinoVisionTransformer of dinov3/models/vision_transformer.py with 4 storage tokens, RoPE (a persistent
    `periods` buffer of head_dim / 4, no position embedding) and mask_k_bias (each qkv's `bias_mask`)."""
    shapes = {"cls_token": (1, 1, dim), "storage_tokens": (1, 4, dim), "mask_token": (1, dim)}
    shapes |= {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)}
    shapes["rope_embed.periods"] = (dim // heads // 4,)
    shapes |= official_dino_block_shapes(depth, dim)
    shapes |= {f"blocks.{index}.attn.qkv.bias_mask": (3 * dim,) for index in range(depth)}
    return shapes | {"norm.weight": (dim,), "norm.bias": (dim,)}


def assert_loads_completely(backbone, release_file: Path, caplog) -> dict[str, torch.Tensor]:
    """Every tensor of the ViT loaded from the file (nothing missing or left over); the ViT's tensors."""
    state = backbone.body.model.state_dict()
    assert (
        f"loaded {len(state)}/{len(state)} tensors from {release_file}; 0 head tensors dropped; 0 missing"
        in caplog.text
    )
    return state


@pytest.mark.parametrize("registers", [0, 4])
def test_the_official_dinov2_release_loads_through_timms_converter(
    registers: int, tmp_path: Path, caplog
) -> None:
    release = random_tensors(official_dinov2_shapes(registers))
    release_file = tmp_path / (
        "dinov2_vits14_reg4_pretrain.pth" if registers else "dinov2_vits14_pretrain.pth"
    )
    torch.save(release, release_file)
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backbone = create_backbone(name, weights=str(release_file))
    state = assert_loads_completely(backbone, release_file, caplog)
    assert "0 unexpected" in caplog.text  # the mask token is the converter's to drop
    for key in official_dino_block_shapes(12, 384):
        assert torch.equal(state[key], release[key]), key
    if registers:
        # timm's register models keep no position for the class token: it is folded into the token.
        assert torch.equal(state["reg_token"], release["register_tokens"])
        assert torch.equal(state["cls_token"], release["cls_token"] + release["pos_embed"][:, :1])
        assert torch.equal(state["pos_embed"], release["pos_embed"][:, 1:])
    else:
        assert (
            torch.equal(state["pos_embed"], release["pos_embed"])
            and state["pos_embed"].shape[1] == 1 + 37 * 37
        )


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3_qkvb", "vit_small_patch16_dinov3"])
def test_the_official_dinov3_release_loads_through_timms_converter(
    name: str, tmp_path: Path, caplog, capsys
) -> None:
    release = random_tensors(official_dinov3_shapes())
    release_file = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(release, release_file)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backbone = create_backbone(name, weights=str(release_file))
    state = assert_loads_completely(backbone, release_file, caplog)
    assert torch.equal(state["reg_token"], release["storage_tokens"])
    for index in (0, 11):
        block = f"blocks.{index}"
        assert torch.equal(state[f"{block}.gamma_1"], release[f"{block}.ls1.gamma"])
        assert torch.equal(state[f"{block}.attn.qkv.weight"], release[f"{block}.attn.qkv.weight"])
        query, _, value = release[f"{block}.attn.qkv.bias"].chunk(3)  # K's bias is masked to zero
        if name.endswith("_qkvb"):
            assert torch.equal(state[f"{block}.attn.q_bias"], query)
            assert torch.equal(state[f"{block}.attn.v_bias"], value)
    # timm's vit_small_patch16_dinov3 has no qkv bias (the distilled releases' are zero, timm notes): its
    # converter skips the file's, saying so ("`q_bias` is not an nn.Parameter", once per block).
    assert ("`q_bias` is not an nn.Parameter" in capsys.readouterr().out) is not name.endswith("_qkvb")


def test_a_dinov2_release_of_another_size_is_refused_naming_the_file(tmp_path: Path) -> None:
    torch.save(random_tensors(official_dinov2_shapes(0, dim=192, depth=12)), tmp_path / "vit_tiny.pth")
    with pytest.raises(
        ValueError, match=r"vit_tiny\.pth.*backbone 'vit_small_patch14_dinov2': \d+ tensors differ in shape"
    ):
        create_backbone("vit_small_patch14_dinov2", weights=str(tmp_path / "vit_tiny.pth"))
