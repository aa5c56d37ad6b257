"""model.compile and model.channels_last: the network's outputs equal the eager network's, on the dense
forward and on sparse inference, fused by every rule; a training step works and follows eager's; a
compiled run's checkpoint holds the plain keys and loads, evaluates, predicts and exports like any other.

Tolerance: logits within 1e-4 of the largest one, level maps identical, argmax equal away from near
ties (`sfseg.inference.sparse.fuse_agreement`, SAME_OUTPUT_ATOL["float32"]); gradients within 1e-3 of
the largest gradient. Both settings change only the order in which float32 sums are taken
(channels_last's kernels, inductor's fused loops): about 1e-7 relative per operation, measured here at
most 2e-6 of the largest logit; a gradient of the first convolution sums 16 384 products per weight (4
images of 64x64), and differs by up to 2e-4 of the largest gradient. A real fault (a wrong layout, a
part left out) moves logits and gradients by their own size. Compiling takes seconds with torch's
compiler cache warm and minutes without (a fresh machine: the C++ compiler builds every kernel): the
compile cases are marked slow, and they share one toy network (two levels: every part at half the kernels
of four) at the shapes and in the order of `sfseg.bench --compile-check --quick`, which compiles the same
graphs: tests/conftest.py runs tests/test_gpu_check.py (whose compile stage runs that bench) first and
this file last, so that a test run compiles them once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sfseg.bench.compile_check import TOY
from sfseg.inference import evaluate, export_model, fused_logits, image_logits, load
from sfseg.inference.sparse import (
    SAME_OUTPUT_ATOL,
    even_level_shares,
    forced_unity,
    fuse_agreement,
    unity_logits_for_shares,
)
from sfseg.models import PyramidSegmenter
from sfseg.module import SpecializeAndFuseModule, training_loss
from sfseg.pyramid import FINEST_STRIDE, FuseRule, build_targets
from sfseg.train import build, train
from tests.conftest import TINY, compose_config

ATOL = SAME_OUTPUT_ATOL["float32"]
GRADIENT_ATOL = 1e-3
TAU = 0.9
SIZE = TOY.sizes.image_size
# setting -> (model.compile, model.channels_last)
SETTINGS = {
    "channels_last": (False, True),
    "compile": (True, False),
}
SETTING_PARAMS = [
    pytest.param(name, marks=[pytest.mark.slow] if compiled else [], id=name)
    for name, (compiled, _) in SETTINGS.items()
]
# No finest cell left to the finest level, some, all (as tests/test_sparse.py forces them). One image at
# a time: batch 1, as `sfseg.bench --compile-check` infers, so the two share the compiled graphs.
SHARES = (0.0, 0.4, 1.0)


def toy_network(fuse: str = "hard", compiled: bool = False, channels_last: bool = False) -> PyramidSegmenter:
    """The toy network of `sfseg.bench --compile-check --quick`, the same weights every time."""
    torch.manual_seed(0)
    sizes = TOY.sizes
    net = PyramidSegmenter(
        sizes.backbone,
        sizes.num_classes,
        sizes.num_levels,
        "c2f",
        TOY.unity_channels,
        TOY.semantic_channels,
        fuse=fuse,
    )
    if channels_last:
        net.use_channels_last()
    if compiled:
        net.compile_dense()
    return net


def toy_images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def twins(request: pytest.FixtureRequest) -> dict[str, dict[str, PyramidSegmenter]]:
    """Per fuse rule that a network holds (hard: sparse inference; learned: the gate), the eager network
    and the same one with the setting, in eval mode."""
    compiled, channels_last = SETTINGS[request.param]
    return {
        fuse: {
            "eager": toy_network(fuse).eval(),
            "fast": toy_network(fuse, compiled, channels_last).eval(),
        }
        for fuse in ("hard", "learned")
    }


def assert_close(fast: torch.Tensor, eager: torch.Tensor, name: str) -> None:
    scale = eager.abs().max().item()
    assert (fast - eager).abs().max().item() <= ATOL * scale, name


@pytest.mark.parametrize("twins", SETTING_PARAMS, indirect=True)
def test_dense_forward_and_every_fuse_rule_equal_eager(twins: dict[str, dict[str, PyramidSegmenter]]) -> None:
    images = toy_images(1)
    with torch.inference_mode():
        eager, fast = (twins["learned"][name](images) for name in ("eager", "fast"))
    for level, (fast_logits, eager_logits) in enumerate(zip(fast.semantic, eager.semantic, strict=True)):
        assert_close(fast_logits, eager_logits, f"semantic level {level + 1}")
    for level, (fast_logits, eager_logits) in enumerate(zip(fast.unity, eager.unity, strict=True)):
        assert_close(fast_logits, eager_logits, f"unity level {level + 1}")
    assert_close(fast.gate_logits, eager.gate_logits, "the learned fuse's gate")
    for rule in ("hard", "soft", "learned"):
        fused = [fused_logits(out, images.shape[-2:], TAU, rule=FuseRule(rule)) for out in (eager, fast)]
        agreement = fuse_agreement(fused[0], fused[1], ATOL * fused[0][0].abs().max().item())
        assert agreement.agrees, (rule, agreement)


@pytest.mark.parametrize("twins", SETTING_PARAMS, indirect=True)
@pytest.mark.parametrize("share", SHARES)
def test_sparse_inference_equals_eager(twins: dict[str, dict[str, PyramidSegmenter]], share: float) -> None:
    """Sparse inference of the fast network against the eager network's dense and sparse inference, with
    the unity pyramid forced to leave `share` of the finest cells to the finest level, and with its own."""
    eager, fast = twins["hard"]["eager"], twins["hard"]["fast"]
    images = toy_images(1)
    finest = (SIZE // FINEST_STRIDE, SIZE // FINEST_STRIDE)
    unity = unity_logits_for_shares([even_level_shares(share, eager.num_levels)], finest)
    with torch.inference_mode():
        with forced_unity(eager, unity), forced_unity(fast, unity):
            forced = [image_logits(net, images, TAU, sparse=sparse) for net, sparse in
                      ((eager, False), (eager, True), (fast, True))]  # fmt: skip
        own = [image_logits(net, images, TAU, sparse=True) for net in (eager, fast)]
    for reference in forced[:2]:
        agreement = fuse_agreement(reference, forced[2], ATOL * reference[0].abs().max().item())
        assert agreement.agrees, agreement
    agreement = fuse_agreement(own[0], own[1], ATOL * own[0][0].abs().max().item())
    assert agreement.agrees, agreement
    # The state dict after the fast network ran: the same keys, no `_orig_mod.` of torch.compile.
    assert list(fast.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize("setting", SETTING_PARAMS)
def test_a_training_step_follows_eager(setting: str) -> None:
    """Forward, training loss, backward and an SGD step: the same loss, gradients and updated weights."""
    sizes = TOY.sizes
    nets = {"eager": toy_network(), "fast": toy_network("hard", *SETTINGS[setting])}
    images = toy_images(sizes.train_batch)
    labels = torch.randint(
        0, sizes.num_classes, (sizes.train_batch, SIZE, SIZE), generator=torch.Generator().manual_seed(2)
    )
    targets = build_targets(labels, sizes.num_levels)
    losses = {}
    for name, net in nets.items():
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        losses[name] = training_loss(net.train()(images), targets, "true_positive", TAU)[0]
        losses[name].backward()
        optimizer.step()
    assert torch.isfinite(losses["fast"]) and losses["fast"].item() == pytest.approx(
        losses["eager"].item(), rel=ATOL
    )
    eager, fast = (dict(nets[name].named_parameters()) for name in ("eager", "fast"))
    largest_gradient = max(param.grad.abs().max().item() for param in eager.values())
    largest_weight = max(param.abs().max().item() for param in eager.values())
    for key, param in eager.items():
        assert (fast[key].grad - param.grad).abs().max().item() <= GRADIENT_ATOL * largest_gradient, key
        assert (fast[key] - param).abs().max().item() <= ATOL * largest_weight, key  # after the step


def test_channels_last_puts_the_parameters_and_the_inputs_in_that_format() -> None:
    net = toy_network(channels_last=True).eval()
    convolutions = [param for param in net.parameters() if param.dim() == 4]
    assert convolutions and all(
        param.is_contiguous(memory_format=torch.channels_last) for param in convolutions
    )
    seen = []
    net.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.inference_mode():
        net(toy_images(1))
        net.sparse_forward(toy_images(1), TAU)
    assert len(seen) == 2 and all(image.is_contiguous(memory_format=torch.channels_last) for image in seen)
    assert not toy_network().backbone.body.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)
def test_training_applies_the_settings(compiled: bool, run_dir: Path) -> None:
    """`python -m sfseg.train model.compile=... model.channels_last=true` builds its network so."""
    overrides = ["model/backbone=local", f"model.compile={compiled}", "model.channels_last=true"]
    net = build(compose_config([*TINY, *overrides], run_dir))[1].net
    assert net.channels_last and net.backbone.body.conv1[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    parts = (net.backbone, net.unity_head, net.semantic_head)
    assert all((part._compiled_call_impl is not None) == compiled for part in parts)


@pytest.mark.slow
def test_a_compiled_runs_checkpoint_loads_evaluates_predicts_and_exports(
    run_dir: Path, tmp_path: Path
) -> None:
    """A compiled training run (in process, on the toy network at the shapes the tests above compiled:
    batches of 4 to train, of 1 to validate and draw), then its checkpoint through sfseg.inference as any
    checkpoint goes."""
    overrides = ["model/backbone=local", "model.levels=2", "model.compile=true"]
    sizes = ["data.val_batch_size=1", "num_pyramid_images=1"]
    trained = train(compose_config([*TINY, *overrides, *sizes], run_dir))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["compile"] is True
    eager = SpecializeAndFuseModule(**{**hparams, "compile": False, "channels_last": False})
    assert list(checkpoint["state_dict"]) == list(eager.state_dict())  # no `_orig_mod.` anywhere

    predictor = load(run_dir / "checkpoints" / "last.ckpt", device="cpu")
    # The plain eager network: the settings are how training ran it, not part of its weights.
    assert not predictor.net.channels_last and predictor.net.backbone._compiled_call_impl is None
    datamodule = predictor.datamodule()
    datamodule.setup("validate")
    scores = evaluate(predictor, datamodule.val_dataloader(), progress=False).scores()
    # The training run's validation ran the compiled network on the same 4 images of 64x64: the same
    # scores, up to a pixel at a near tie.
    assert scores["pixel_acc"] == pytest.approx(trained["pixel_acc"], abs=2 / (4 * SIZE * SIZE))
    assert scores["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-3)
    rgb = torch.randint(
        0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    assert predictor.predict(rgb.numpy()).mask.shape == (SIZE, SIZE)
    exported = export_model(predictor, tmp_path / "model.onnx", "onnx", size=SIZE)
    assert exported.path.stat().st_size > 0
