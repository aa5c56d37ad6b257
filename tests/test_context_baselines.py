"""OCR and CCNet as context modules (model/context=ocr|ccnet): literal references, shapes, gradients,
and two training steps through the real Hydra config at L=1 (Table 5's rows) and L=4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sfseg.builder import build
from sfseg.models import PyramidSegmenter, build_context
from sfseg.models.context import CrissCrossAttention, CrissCrossContext, ObjectContext, object_centres
from sfseg.pyramid import build_targets, pyramid_loss, semantic_ce
from tests.conftest import TINY, compose_config

SMALL = "hrnet_w18_small"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def criss_cross_reference(module: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """CCNet's criss-cross attention pixel by pixel: pixel (i, j) attends to its column (without itself)
    and its row (with itself), one softmax over both, unscaled dot products."""
    query, key, value = module.query(x), module.key(x), module.value(x)
    batch, _, height, width = x.shape
    out = torch.empty_like(x)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                column = [(k, j) for k in range(height) if k != i]
                row = [(i, k) for k in range(width)]
                positions = column + row
                energies = torch.stack([query[b, :, i, j] @ key[b, :, p, q] for p, q in positions])
                weights = torch.softmax(energies, dim=0)
                attended = sum(w * value[b, :, p, q] for w, (p, q) in zip(weights, positions, strict=True))
                out[b, :, i, j] = module.gamma * attended + x[b, :, i, j]
    return out


@torch.no_grad()
def test_criss_cross_attention_matches_the_looped_reference() -> None:
    module = CrissCrossAttention(16)
    module.gamma.fill_(0.7)  # CCNet starts at 0, which would hide the attention
    x = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(module(x), criss_cross_reference(module, x))


def test_criss_cross_attention_starts_as_identity_like_ccnet() -> None:
    module = CrissCrossAttention(16)
    x = torch.randn(1, 16, 4, 4)
    assert module.gamma.item() == 0.0
    torch.testing.assert_close(module(x), x)


def test_two_recurrences_reach_every_pixel() -> None:
    """With recurrence 2 (shared weights) a change at one pixel reaches all others; with 1 only its
    row and column."""
    context = CrissCrossContext(8).eval()
    context.attention.gamma.data.fill_(1.0)
    x = torch.randn(1, 8, 5, 6)

    def reach(recurrence: int) -> torch.Tensor:
        context.recurrence = recurrence
        inputs = x.clone().requires_grad_(True)
        attended = context.reduce(inputs)
        for _ in range(recurrence):
            attended = context.attention(attended)
        attended[0, :, 0, 0].sum().backward()
        return inputs.grad.abs().sum(1)[0] > 0

    # The 3x3 convolution reaches the 2x2 corner itself; attention beyond it is what is tested.
    once, twice = reach(1), reach(2)
    assert not once[4, 5] and twice.all()


def test_object_centres_average_the_features_of_each_region() -> None:
    x = torch.randn(2, 6, 4, 5)
    region_of_pixel = torch.randint(0, 3, (2, 4, 5))
    region_of_pixel[:, 0, :3] = torch.tensor([0, 1, 2])  # every region has a pixel
    hard_regions = 100.0 * F.one_hot(region_of_pixel, 3).permute(0, 3, 1, 2).float()
    centres = object_centres(x, hard_regions)
    assert centres.shape == (2, 6, 3)
    for b in range(2):
        for k in range(3):
            torch.testing.assert_close(centres[b, :, k], x[b][:, region_of_pixel[b] == k].mean(1))
    uniform = object_centres(x, torch.zeros(2, 3, 4, 5))
    torch.testing.assert_close(uniform, x.mean((2, 3)).unsqueeze(2).expand(2, 6, 3))


def test_ocr_has_hrnet_ocr_widths_at_ds_512() -> None:
    module = build_context("ocr", channels=512, num_levels=4)
    assert isinstance(module, ObjectContext)
    assert module.query[0][0].out_channels == 256  # key channels
    assert module.up[0].out_channels == 512  # mid channels
    assert module.aggregate[1].p == 0.05
    ccnet = build_context("ccnet", channels=512, num_levels=4)
    assert isinstance(ccnet, CrissCrossContext) and ccnet.recurrence == 2
    # RCCAModule's ratios: attention on in/4 channels (CCNet: 2048 -> 512), queries and keys on 1/8 of those.
    assert ccnet.reduce[0].out_channels == 128
    assert ccnet.attention.query.out_channels == 16 and ccnet.attention.value.out_channels == 128
    assert ccnet.aggregate[0][0].in_channels == 512 + 128 and ccnet.aggregate[1].p == 0.1


def test_ocr_rejects_regions_of_another_size() -> None:
    with pytest.raises(ValueError, match="object regions"):
        build_context("ocr", 8, 2)(torch.randn(1, 8, 8, 8), 2, torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("context", ["ocr", "ccnet"])
@pytest.mark.parametrize("levels", [1, 2, 4])
def test_segmenter_with_ocr_or_ccnet_gives_both_pyramids(context: str, levels: int) -> None:
    model = PyramidSegmenter(SMALL, num_classes=5, num_levels=levels, context=context, semantic_channels=32)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert [tuple(y.shape) for y in out.semantic] == [
        (2, 5, 16 // 2 ** (levels - 1 - i), 16 // 2 ** (levels - 1 - i)) for i in range(levels)
    ]
    assert len(out.unity) == levels - 1
    if context == "ocr":
        assert out.auxiliary.shape == (2, 5, 16, 16)  # the soft object regions at stride 4
    else:
        assert out.auxiliary is None


@pytest.mark.parametrize("context", ["ocr", "ccnet"])
def test_backward_reaches_every_parameter(context: str) -> None:
    model = PyramidSegmenter(
        SMALL, num_classes=4, num_levels=4, context=context, semantic_channels=32
    ).train()
    if context == "ccnet":
        model.semantic_head.context.attention.gamma.data.fill_(0.5)  # at 0 q/k/v would get zero gradients
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, 20:23, 5:40] = 2
    targets = build_targets(labels, 4)
    out = model(torch.randn(2, 3, 64, 64))
    loss = pyramid_loss(out.semantic, out.unity, targets).total
    if context == "ocr":
        loss = loss + 0.4 * semantic_ce(out.auxiliary, targets.semantic[-1])
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    heads = [model.unity_head, model.semantic_head.context, model.semantic_head.classifiers]
    if context == "ocr":
        heads.append(model.semantic_head.auxiliary)
    for head in heads:
        for name, parameter in head.named_parameters():
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("context", ["ocr", "ccnet"])
def test_bfloat16_autocast_forward_is_finite(context: str) -> None:
    model = PyramidSegmenter(SMALL, num_classes=4, num_levels=4, context=context, semantic_channels=32).eval()
    model.semantic_head.context.requires_grad_(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(t).all() for t in [*out.semantic, *out.unity])


@pytest.mark.parametrize("context", ["ocr", "ccnet"])
@pytest.mark.parametrize("levels", [1, 4])
def test_two_training_steps_through_the_real_config(context: str, levels: int, run_dir: Path) -> None:
    cfg = compose_config([*TINY, f"model/context={context}", f"model.levels={levels}"], run_dir)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2
    logged = {name: value.item() for name, value in trainer.callback_metrics.items()}
    eq1 = sum(logged[f"train/ce_level{i}"] for i in range(1, levels + 1)) / levels
    if levels > 1:
        eq1 += sum(logged[f"train/bce_level{i}"] for i in range(1, levels)) / (levels - 1)
    if context == "ocr":
        # HRNet-OCR's weight: the auxiliary CE joins Eq. 1's total with 0.4.
        assert model.aux_weight == 0.4
        assert logged["train/loss"] == pytest.approx(eq1 + 0.4 * logged["train/ocr_aux_ce"], rel=1e-5)
    else:
        assert "train/ocr_aux_ce" not in logged
        assert logged["train/loss"] == pytest.approx(eq1, rel=1e-5)
