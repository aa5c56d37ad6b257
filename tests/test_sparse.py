"""Sparse inference computes each level only where the fuse keeps it, and fuses to the dense result;
the split / folded weights of Eq. 8-11 compute the paper's concatenation form with its parameters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sfseg.eval import run as eval_run
from sfseg.inference import image_logits, whole_logits
from sfseg.inference.sparse import even_level_shares, forced_unity, fuse_agreement, unity_logits_for_shares
from sfseg.models import CONTEXT_MODULES, PyramidSegmenter, SemanticHead, UnityHead
from sfseg.models.context import ContextAggregation, ContextUpdate, PyramidPool
from sfseg.models.heads import CellGather
from sfseg.predict import run as predict_run
from sfseg.pyramid import fuse, kept_cells, repeat_cells, unity_logit_threshold
from tests.conftest import compose_config
from tests.test_eval import TINY_DATA, train_tiny_checkpoint

SMALL = "hrnet_w18_small"
# A timm ViT through the simple feature pyramid and the fusion decoder, besides HRNet.
VIT = "vit_tiny_patch16_224"
TAU = 0.9
# The heads' parameter names and shapes at commit 92ac1e0 (main), before this change (in 12, C 5, D_s 16, D_u 8, L 4).
BASE_LAYOUT = Path(__file__).parent / "data" / "head_layout_92ac1e0.json"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(context: str, levels: int, backbone: str = SMALL) -> PyramidSegmenter:
    # The ViT's fusion decoder at 60 channels, not its 720: the same layers at a twelfth of the width.
    decoder = {"name": "hrnet", "channels": 60} if backbone == VIT else None
    return random_batch_norm_statistics(
        PyramidSegmenter(
            backbone, 5, levels, context, unity_channels=8, semantic_channels=16, decoder=decoder
        )
    )


def random_batch_norm_statistics(net: PyramidSegmenter) -> PyramidSegmenter:
    """The net in eval mode with random batch-norm statistics, so that the sparse path's eval-mode BN
    is really exercised."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def assert_same_fuse(dense: tuple[Tensor, Tensor], sparse: tuple[Tensor, Tensor], atol: float) -> None:
    """Level maps identical, logits within atol, argmax equal wherever the dense top two differ by more
    than 2 atol (only a near tie may flip)."""
    agreement = fuse_agreement(dense, sparse, atol)
    assert agreement.agrees, agreement


def test_fuse_agreement_catches_each_kind_of_difference() -> None:
    logits = torch.tensor([[[[3.0, 0.0]], [[0.0, 3.0]]]])  # [1, 2 classes, 1, 2]: two clear pixels
    levels = torch.tensor([[[0, 1]]])
    dense = (logits, levels)
    assert fuse_agreement(dense, (logits + 1e-5, levels.clone()), atol=1e-4).agrees
    assert not fuse_agreement(dense, (logits, 1 - levels), atol=1e-4).level_maps_equal
    too_far = fuse_agreement(dense, (logits + 1e-3, levels), atol=1e-4)
    assert too_far.max_logit_difference == pytest.approx(1e-3) and not too_far.agrees
    flipped = fuse_agreement(dense, (logits.flip(1), levels), atol=1e-4)
    assert not flipped.argmax_equal_where_clear and not flipped.agrees
    # A near tie everywhere: nothing to compare the argmax on, which is no agreement either.
    assert not fuse_agreement((logits * 0, levels), (logits * 0, levels), atol=1e-4).agrees


# Very different shares of undecided finest cells in one batch: none, some, all.
BATCH_SHARES = (0.0, 0.4, 1.0)


@pytest.mark.parametrize("backbone", [SMALL, VIT])
@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("context", sorted(CONTEXT_MODULES))
def test_sparse_fuses_to_the_dense_output(context: str, levels: int, backbone: str) -> None:
    net = tiny_net(context, levels, backbone)
    images = torch.randn(len(BATCH_SHARES), 3, 128, 96)
    shares = [even_level_shares(share, levels) for share in BATCH_SHARES]
    unity = unity_logits_for_shares(shares, finest_size=(32, 24))
    with torch.inference_mode(), forced_unity(net, unity):
        dense = image_logits(net, images, TAU, sparse=False)
        sparse = image_logits(net, images, TAU, sparse=True)
    assert_same_fuse(dense, sparse, atol=1e-4)
    finest = (sparse[1] == levels - 1).flatten(1).float().mean(1)
    expected = BATCH_SHARES if levels > 1 else (1.0,) * len(BATCH_SHARES)
    torch.testing.assert_close(finest, torch.tensor(expected), atol=0.01, rtol=0)


@pytest.mark.parametrize("context", ["anl_multi", "c2f"])
def test_sparse_fuses_to_the_dense_output_with_the_nets_own_unity(context: str) -> None:
    net = tiny_net(context, 4)
    images = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        # Shift the unity logits so that half the cells of level L-1 pass tau: coarser levels (the min
        # over more pixels) then decide fewer cells, and the net's own prediction uses several levels.
        unity = net.unity_head(net.backbone(images))
        net.unity_head.scorer[-1].bias += unity_logit_threshold(TAU) - unity[-1].median()
        dense = image_logits(net, images, TAU, sparse=False)
        sparse = image_logits(net, images, TAU, sparse=True)
    assert_same_fuse(dense, sparse, atol=1e-4)
    levels_used = set(sparse[1].unique().tolist())
    assert len(levels_used) >= 3, levels_used


@pytest.mark.parametrize("context", ["none", "c2f"])
def test_odd_sizes_are_padded_and_cropped_back_alike(context: str) -> None:
    net = tiny_net(context, 4)
    images = torch.randn(1, 3, 101, 77)  # padded to 128 x 96
    unity = unity_logits_for_shares([even_level_shares(0.3, 4)], finest_size=(32, 24))
    with torch.inference_mode(), forced_unity(net, unity):
        dense = whole_logits(net, images, TAU, sparse=False)
        sparse = whole_logits(net, images, TAU, sparse=True)
    assert sparse.shape == (1, 5, 101, 77)
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("context", ["anl_multi", "c2f"])
def test_sparse_fuses_to_the_dense_output_under_bfloat16_autocast(context: str) -> None:
    net = tiny_net(context, 4)
    images = torch.randn(2, 3, 128, 96)
    unity = unity_logits_for_shares([even_level_shares(s, 4) for s in (0.2, 0.7)], finest_size=(32, 24))
    with torch.inference_mode(), forced_unity(net, unity), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = image_logits(net, images, TAU, sparse=False)
        sparse = image_logits(net, images, TAU, sparse=True)
    scale = dense[0].abs().max().item()
    assert_same_fuse(dense, sparse, atol=0.01 * scale)


def test_sparse_forward_computes_only_the_kept_cells() -> None:
    net = tiny_net("c2f", 4)
    images = torch.randn(2, 3, 128, 96)
    shares = [[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.5]]
    unity = unity_logits_for_shares(shares, finest_size=(32, 24))
    seen: list[tuple[int, ...]] = []
    hooks = [
        classify.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
        for classify in net.semantic_head.classifiers
    ]
    with torch.inference_mode(), forced_unity(net, unity):
        out = net.sparse_forward(images, TAU)
    for hook in hooks:
        hook.remove()
    kept = kept_cells(unity, (2, 32, 24), TAU)
    # Each ConvBlock saw the most cells one image keeps at its level, as a [B, D_s, M, 1] map.
    assert seen == [(2, 16, int(mask.flatten(1).sum(1).max()), 1) for mask in kept]
    for logits, mask in zip(out.semantic, kept, strict=True):
        assert torch.all(logits.abs().sum(1)[~mask] == 0)
        assert torch.all(logits.abs().sum(1)[mask] > 0)


def test_sparse_forward_refuses_training_mode() -> None:
    net = tiny_net("none", 2).train()
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        net.sparse_forward(torch.randn(1, 3, 64, 64), TAU)


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_kept_cells_are_where_the_level_map_takes_each_level(levels: int) -> None:
    finest = (3, 16, 24)
    sides = [(16 >> (levels - 1 - level), 24 >> (levels - 1 - level)) for level in range(levels)]
    unity = [1.0 + 2.5 * torch.randn(3, *side) for side in sides[:-1]]  # some cells decide at each level
    _, level_map = fuse([torch.zeros(3, 1, *side) for side in sides], unity, TAU)
    kept = kept_cells(unity, finest, TAU)
    covered = torch.zeros(finest, dtype=torch.long)
    for level, mask in enumerate(kept):
        factor = 2 ** (levels - 1 - level)
        assert mask.shape == (3, *sides[level])
        assert torch.equal(repeat_cells(mask, factor), level_map == level)
        covered += repeat_cells(mask, factor).long()
    assert torch.all(covered == 1)  # every finest cell under exactly one kept cell


def test_cell_gather_pads_images_and_scatters_back() -> None:
    mask = torch.zeros(3, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 3, 4] = mask[0, 0, 0] = True  # 3 cells, image 1 none, image 2 one
    mask[2, 2, 1] = True
    maps = torch.randn(3, 7, 4, 5)
    cells = CellGather(mask)
    gathered = cells.gather(maps)
    assert len(cells) == 4 and gathered.shape == (3, 7, 3, 1)
    for image in range(3):  # each image's cells in row-major order, then padding
        count = int(mask[image].sum())
        torch.testing.assert_close(gathered[image, :, :count, 0], maps[image][:, mask[image]])
    # What the padding computes is dropped: scattering back gives the cells and zero elsewhere.
    torch.testing.assert_close(cells.scatter(gathered), torch.where(mask.unsqueeze(1), maps, 0.0))
    torch.testing.assert_close(cells.scatter(gathered + 1), torch.where(mask.unsqueeze(1), maps + 1, 0.0))


def test_forced_shares_are_exact_on_the_finest_level() -> None:
    shares = [[0.5, 0.2, 0.1, 0.2], even_level_shares(0.33, 4), [0.0, 0.0, 0.0, 1.0]]
    unity = unity_logits_for_shares(shares, finest_size=(64, 64), seed=3)
    semantic = [torch.zeros(3, 1, 64 >> (3 - level), 64 >> (3 - level)) for level in range(4)]
    _, level_map = fuse(semantic, unity, TAU)
    per_level = torch.stack([(level_map == level).flatten(1).float().mean(1) for level in range(4)], 1)
    leaves = 32 * 32  # level L-1 cells: the finest share is a whole number of them
    exact = [round(share[-1] * leaves) / leaves for share in shares]
    torch.testing.assert_close(per_level[:, -1], torch.tensor(exact))
    torch.testing.assert_close(per_level, torch.tensor(shares), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        even_level_shares(1.5, 4)


# ---------------------------------------------------------------------------------------------
# Split and folded weights: the paper's concatenation form, with the same parameters


def literal_ca(module: ContextAggregation, x: Tensor, theta: Tensor) -> Tensor:
    """Eq. 8-9 as written: query, key and value convolutions, attention, Conv1x1_agg on the concat."""
    batch, _, height, width = x.shape
    query = module.query(x).flatten(2).transpose(1, 2).unsqueeze(1)
    key = module.key(theta).transpose(1, 2).unsqueeze(1)
    value = module.value(theta).transpose(1, 2).unsqueeze(1)
    attended = F.scaled_dot_product_attention(query, key, value)
    attended = attended.squeeze(1).transpose(1, 2).reshape(batch, -1, height, width)
    return module.aggregate(torch.cat([attended, x], dim=1))


def literal_cu(module: ContextUpdate, refined: Tensor, theta: Tensor) -> Tensor:
    """Eq. 10-11 as written."""
    return module.update(torch.cat([module.pool(refined), theta], dim=1))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("block", "literal"), [(ContextAggregation, literal_ca), (ContextUpdate, literal_cu)]
)
def test_split_weights_give_the_concatenation_forms_numbers(block, literal, training: bool) -> None:
    module = block(16).train(training)
    reference = copy.deepcopy(module)
    x = torch.randn(2, 16, 12, 10, requires_grad=True)
    theta = torch.randn(2, 16, 110, requires_grad=True)
    ours, theirs = module(x, theta), literal(reference, x, theta)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    weights = torch.randn_like(ours)
    our_grads = torch.autograd.grad((ours * weights).sum(), [x, theta, *module.parameters()])
    their_grads = torch.autograd.grad((theirs * weights).sum(), [x, theta, *reference.parameters()])
    for ours_grad, theirs_grad in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4)
    for name, buffer in module.named_buffers():  # batch-norm statistics updated alike in training
        torch.testing.assert_close(buffer, dict(reference.named_buffers())[name])


def test_pyramid_pool_is_unchanged() -> None:
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(PyramidPool()(x)[:, :, 1:10], F.adaptive_avg_pool2d(x, 3).flatten(2))


@pytest.mark.parametrize("context", sorted(CONTEXT_MODULES))
def test_state_dict_of_the_base_commit_loads(context: str) -> None:
    layout = json.loads(BASE_LAYOUT.read_text())[context]
    heads = torch.nn.ModuleDict(
        {"semantic_head": SemanticHead(12, 5, 4, 16, context), "unity_head": UnityHead(12, 4, 8)}
    )
    saved = {
        name: torch.randint(0, 3, shape) if name.endswith("num_batches_tracked") else torch.randn(shape)
        for name, shape in layout.items()
    }
    saved = {name: value.abs() if name.endswith("running_var") else value for name, value in saved.items()}
    heads.load_state_dict(saved, strict=True)
    for name, value in heads.state_dict().items():
        assert torch.equal(value, saved[name]), name
    features = torch.randn(1, 12, 16, 16)
    semantic, _ = heads.eval()["semantic_head"](features)
    assert semantic[-1].shape == (1, 5, 16, 16)


# ---------------------------------------------------------------------------------------------
# The switches reach the passes: count what runs through the real entry points


class ForwardCounter:
    """Counts forward calls of the full dense pyramid (PyramidSegmenter.forward) and of the unity head
    (which both paths run), over every module, while active."""

    def __init__(self) -> None:
        self.dense = self.unity = 0

    def __enter__(self) -> ForwardCounter:
        def hook(module, args, output) -> None:
            self.dense += isinstance(module, PyramidSegmenter)
            self.unity += isinstance(module, UnityHead)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp()) / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [True, False])
def test_eval_sparse_inference_switch_reaches_the_passes(checkpoint: Path, tmp_path: Path, sparse: bool):
    overrides = [f"ckpt_path={checkpoint}", *TINY_DATA, "eval.device=cpu", "eval.scales=[1.0,0.5]"]
    overrides += [] if sparse else ["eval.sparse_inference=false"]
    cfg = compose_config(overrides, tmp_path, config_name="eval")
    with ForwardCounter() as counter:
        metrics = eval_run(cfg)
    assert metrics["inference"]["sparse"] is sparse
    # Per batch: the dense single-scale pass of the analysis, then one pass per scale.
    batches = counter.unity // 3
    assert counter.unity == 3 * batches > 0
    assert counter.dense == (batches if sparse else 3 * batches)


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [True, False])
def test_predict_sparse_inference_switch_reaches_the_passes(checkpoint: Path, tmp_path: Path, sparse: bool):
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    overrides = [f"ckpt_path={checkpoint}", f"input={tmp_path / 'image.png'}", f"output={tmp_path / 'out'}"]
    overrides += ["device=cpu", f"sparse_inference={str(sparse).lower()}"]
    cfg = compose_config(overrides, tmp_path, config_name="predict")
    with ForwardCounter() as counter:
        assert predict_run(cfg) == 0
    assert counter.unity == 1 and counter.dense == (0 if sparse else 1)
    assert (tmp_path / "out" / "image_levels.png").is_file()
