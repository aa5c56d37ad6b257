"""Shapes, contracts and error messages of the model package (CPU, small inputs)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sfseg.inference import fused_logits, image_logits
from sfseg.models import (
    BACKBONES,
    CONTEXT_MODULES,
    FCNHead,
    PyramidOutput,
    PyramidSegmenter,
    SemanticHead,
    UnityHead,
    build_context,
    create_backbone,
)
from sfseg.models.context import PyramidPool
from sfseg.models.layers import adaptive_avg_pool2d
from sfseg.pyramid import build_targets, fuse, pyramid_loss

SMALL = "hrnet_w18_small"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a small shared CPU box two OpenMP threads stall behind other load; one thread stays fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("hrnet_w18_small", 240),
        ("hrnet_w18_small_v2", 270),
        ("hrnet_w18", 270),
        ("hrnet_w32", 480),
        ("hrnet_w48", 720),
        ("resnet101", 720),
        ("resnet101c", 720),
        ("local", 64),
    ],
)
def test_backbone_gives_d_channels_at_stride_4(name: str, channels: int) -> None:
    backbone = create_backbone(name).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 32, 64))
    assert backbone.out_channels == channels
    assert backbone.stride == 4
    assert features.shape == (1, channels, 8, 16)


def test_backbone_registry_lists_the_paper_backbones() -> None:
    assert set(BACKBONES) == {
        "hrnet_w18_small",
        "hrnet_w18_small_v2",
        "hrnet_w18",
        "hrnet_w32",
        "hrnet_w48",
        "resnet101",
        "resnet101c",
        "local",
    }


def test_pyramid_pool_gives_110_tokens_even_below_8x8() -> None:
    x = torch.randn(2, 5, 2, 3)
    tokens = PyramidPool()(x)
    assert tokens.shape == (2, 5, 110)
    torch.testing.assert_close(tokens[:, :, 0], x.mean(dim=(2, 3)))  # the 1x1 bin is the global mean


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (16, 24), (9, 128)])
def test_adaptive_pooling_by_matrices_equals_torchs(size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    for bins in (1, 3, 6, 8):
        torch.testing.assert_close(adaptive_avg_pool2d(x, bins), F.adaptive_avg_pool2d(x, bins))


@pytest.mark.parametrize("num_levels", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(CONTEXT_MODULES))
def test_context_module_returns_one_map_per_level_coarse_to_fine(name: str, num_levels: int) -> None:
    module = build_context(name, channels=16, num_levels=num_levels)
    # OCR also takes the soft object regions (here 5 classes) that the semantic head computes.
    regions = [torch.randn(2, 5, 16, 24)] if getattr(module, "needs_object_regions", False) else []
    refined = module(torch.randn(2, 16, 16, 24), num_levels, *regions)
    assert [tuple(r.shape) for r in refined] == [
        (2, 16, 16 // 2 ** (num_levels - 1 - i), 24 // 2 ** (num_levels - 1 - i)) for i in range(num_levels)
    ]


def test_no_context_is_eq3_average_pooling() -> None:
    x = torch.randn(1, 8, 16, 16)
    refined = build_context("none", channels=8, num_levels=4)(x, 4)
    for level, features in enumerate(refined):
        torch.testing.assert_close(features, F.avg_pool2d(x, 2 ** (3 - level)))


def test_per_level_context_rejects_another_level_count() -> None:
    with pytest.raises(ValueError, match="built for 4 levels"):
        build_context("c2f", channels=8, num_levels=4)(torch.randn(1, 8, 16, 16), 3)


def test_unity_cell_logit_is_the_min_of_its_pixel_logits() -> None:
    head = UnityHead(in_channels=12, num_levels=4, channels=8).eval()
    x = torch.randn(2, 12, 16, 24)
    with torch.no_grad():
        pixels = head.pixel_logits(x)
        cells = head(x)
    assert [tuple(u.shape) for u in cells] == [(2, 2, 3), (2, 4, 6), (2, 8, 12)]
    for level, (z, u) in enumerate(zip(pixels, cells, strict=True)):
        k = 2 ** (3 - level)
        assert z.shape == (2, 16, 24)
        expected = z.view(2, 16 // k, k, 24 // k, k).amin(dim=(2, 4))
        torch.testing.assert_close(u, expected)
        # min-pool commutes with the sigmoid, so the cell probability is the least sure pixel's.
        expected_probability = torch.sigmoid(z).view(2, 16 // k, k, 24 // k, k).amin(dim=(2, 4))
        torch.testing.assert_close(torch.sigmoid(u), expected_probability)


def test_unity_head_with_one_level_is_empty() -> None:
    head = UnityHead(in_channels=12, num_levels=1)
    assert head(torch.randn(1, 12, 8, 8)) == []
    assert not list(head.parameters())


def test_semantic_and_fcn_heads_give_class_logits() -> None:
    x = torch.randn(2, 12, 16, 16)
    semantic, auxiliary = SemanticHead(12, num_classes=5, num_levels=3, channels=16)(x)
    assert [tuple(y.shape) for y in semantic] == [(2, 5, 4, 4), (2, 5, 8, 8), (2, 5, 16, 16)]
    assert auxiliary is None  # only OCR has an auxiliary head
    assert FCNHead(12, num_classes=5, channels=16)(x).shape == (2, 5, 16, 16)


@pytest.fixture(scope="module")
def segmenter() -> PyramidSegmenter:
    return PyramidSegmenter(SMALL, num_classes=7, num_levels=4, context="c2f", semantic_channels=32)


def test_segmenter_returns_both_pyramids(segmenter: PyramidSegmenter) -> None:
    out = segmenter.eval()(torch.randn(2, 3, 32, 64))
    assert isinstance(out, PyramidOutput)
    assert [tuple(y.shape) for y in out.semantic] == [(2, 7, 1, 2), (2, 7, 2, 4), (2, 7, 4, 8), (2, 7, 8, 16)]
    assert [tuple(u.shape) for u in out.unity] == [(2, 1, 2), (2, 2, 4), (2, 4, 8)]


def test_single_level_segmenter_is_the_standard_output() -> None:
    model = PyramidSegmenter(SMALL, num_classes=7, num_levels=1, context="anl", semantic_channels=32)
    out = model.eval()(torch.randn(1, 3, 32, 64))
    assert model.unity_head is None
    assert out.unity == []
    assert [tuple(y.shape) for y in out.semantic] == [(1, 7, 8, 16)]
    # One level has stride 4, but HRNet's branch fusion still needs multiples of 32.
    assert model.size_divisor == 32
    with pytest.raises(ValueError, match="must be divisible by 32"):
        model(torch.randn(1, 3, 36, 28))


@torch.no_grad()
def test_predict_fuses_and_upsamples_to_the_image(segmenter: PyramidSegmenter) -> None:
    images = torch.randn(1, 3, 32, 64)
    segmenter.eval()
    logits, level_map = image_logits(segmenter, images, tau=0.9)
    assert logits.shape == (1, 7, 32, 64)
    assert level_map.shape == (1, 8, 16)
    out = segmenter(images)
    fused, expected_map = fuse(out.semantic, out.unity, tau=0.9)
    torch.testing.assert_close(logits, F.interpolate(fused, size=(32, 64), mode="bilinear"))
    assert torch.equal(level_map, expected_map)

    finest, finest_map = image_logits(segmenter, images, tau=0.9, fuse_levels=False)
    torch.testing.assert_close(finest, F.interpolate(out.semantic[-1], size=(32, 64), mode="bilinear"))
    assert (finest_map == 3).all()


def test_input_not_divisible_by_the_coarsest_stride_is_rejected() -> None:
    model = PyramidSegmenter(SMALL, num_classes=3, num_levels=5, context="none", semantic_channels=8)
    assert model.size_divisor == 64
    with pytest.raises(
        ValueError, match=r"divisible by 64: the coarsest pyramid stride 64 \(model\.levels=5\)"
    ):
        model(torch.randn(1, 3, 64, 96))


def test_backward_reaches_every_parameter_of_both_heads() -> None:
    model = PyramidSegmenter(SMALL, num_classes=4, num_levels=4, context="c2f", semantic_channels=32).train()
    labels = torch.zeros(2, 32, 64, dtype=torch.long)
    labels[:, :, 32:] = 1  # unity cells at every level, and mix cells along a stripe
    labels[:, 20:23, 5:40] = 2
    out = model(torch.randn(2, 3, 32, 64))
    pyramid_loss(out.semantic, out.unity, build_targets(labels, 4)).total.backward()
    # DDP needs a gradient for every parameter; each head must actually learn from the loss.
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    for head in (model.unity_head, model.semantic_head):
        assert sum(p.grad.abs().sum() for p in head.parameters()) > 0


def test_bfloat16_autocast_forward_is_finite(segmenter: PyramidSegmenter) -> None:
    images = torch.randn(1, 3, 32, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = segmenter.eval()(images)
        logits, _ = fused_logits(out, images.shape[-2:])
    assert all(torch.isfinite(t).all() for t in [*out.semantic, *out.unity, logits])


def test_unknown_names_raise_errors_naming_the_config_key() -> None:
    # Neither sfseg's nor timm's (timm's own names build through model/backbone=timm).
    with pytest.raises(
        ValueError,
        match=r"model.backbone.name='hrnet_w99' is neither.*hrnet_w48.*resnet101.*nor a timm model",
    ):
        create_backbone("hrnet_w99")
    with pytest.raises(ValueError, match=r"model.context.name='aspp'.*anl_multi.*c2f"):
        PyramidSegmenter(SMALL, num_classes=3, context="aspp")
    with pytest.raises(ValueError, match=r"model\.levels"):
        PyramidSegmenter(SMALL, num_classes=3, num_levels=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_round_trip(tmp_path, suffix: str) -> None:
    source = create_backbone(SMALL).eval()
    path = tmp_path / f"backbone{suffix}"
    state = source.body.state_dict()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = create_backbone(SMALL, pretrained=True, weights=str(path)).eval()  # weights win: no download
    fresh = create_backbone(SMALL).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)
        assert not torch.allclose(fresh(images), source(images))


def test_classification_checkpoint_loads_with_its_head_ignored(tmp_path, caplog) -> None:
    path = tmp_path / "imagenet.pth"
    full = timm.create_model(SMALL)
    torch.save(full.state_dict(), path)
    with caplog.at_level("INFO", logger="sfseg.models.weights"):
        backbone = create_backbone(SMALL, weights=str(path))
    torch.testing.assert_close(backbone.body.conv1.weight, full.conv1.weight)
    assert "0 missing" in caplog.text
    assert "unexpected" in caplog.text


def test_bad_weights_files_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.backbone\.weights=.*no such file"):
        create_backbone(SMALL, weights=str(tmp_path / "missing.pth"))
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, foreign)
    with pytest.raises(
        ValueError,
        match=r"foreign\.pth': only 0 of the 355 tensors of backbone 'hrnet_w18_small'.*unexpected: encoder\.weight",
    ):
        create_backbone(SMALL, weights=str(foreign))


@pytest.mark.parametrize("name", [SMALL, "convnext_atto"])  # sfseg's and any timm model's
def test_unreachable_hub_names_the_local_weights_option(monkeypatch, tmp_path, name: str) -> None:
    # Offline and with an empty cache, the hub fails at once and the same way on every machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"name='{name}'.*hub could not be reached") as err:
        create_backbone(name, pretrained=True)
    assert "model.backbone.weights=<path to a local file>" in str(err.value)
    assert "model.backbone.pretrained=false" in str(err.value)
