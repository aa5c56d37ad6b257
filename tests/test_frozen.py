"""model.backbone.freeze: a frozen encoder keeps every weight and statistic while the decoder and the heads
train; model.optimizer's AdamW and linear warmup; experiment=ade20k_dinov2_frozen (DINOv2's linear
protocol) trained a few steps on the ADE20K fixture."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch

from sfseg.models import PyramidSegmenter
from sfseg.module import SpecializeAndFuseModule, lr_factor, optimizer_config
from tests.conftest import TINY, compose_config
from tests.fixtures import make_ade20k

pytestmark = pytest.mark.usefixtures("one_thread")

# A CNN with BatchNorm, so that its statistics must stay too.
FROZEN_CNN = [
    *TINY,
    "model/backbone=timm",
    "model.backbone.name=resnet18",
    "model.backbone.freeze=true",
    "model.decoder.channels=32",
    "num_pyramid_images=0",
]


def cloned(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.slow
def test_a_frozen_encoder_keeps_its_weights_while_the_decoder_and_heads_train(run_dir: Path) -> None:
    from sfseg.train import build

    datamodule, model, trainer = build(compose_config(FROZEN_CNN, run_dir))
    backbone = model.net.backbone
    encoder, decoder, heads = cloned(backbone.body), cloned(backbone.fuse), cloned(model.net.semantic_head)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2
    # Every tensor of the encoder bit for bit: weights, BatchNorm's running statistics and counters.
    after = backbone.body.state_dict()
    assert [name for name, tensor in encoder.items() if not torch.equal(tensor, after[name])] == []
    assert not all(torch.equal(t, backbone.fuse.state_dict()[n]) for n, t in decoder.items())
    assert not all(torch.equal(t, model.net.semantic_head.state_dict()[n]) for n, t in heads.items())
    # No gradient, not in the optimizer, and in eval mode whatever train() the module gets (Lightning
    # calls it at every epoch).
    assert not any(p.requires_grad for p in backbone.body.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in backbone.body.parameters()}
    assert optimized >= {id(p) for p in backbone.fuse.parameters()}
    model.train()
    assert not any(module.training for module in backbone.body.modules())
    assert backbone.fuse.training and model.net.semantic_head.training


def test_a_frozen_encoder_without_weights_says_its_features_are_random(caplog) -> None:
    hparams = {
        "backbone": {"name": "convnext_atto", "pretrained": False, "weights": None, "freeze": True},
        "decoder": {"name": "segformer", "channels": 16},
        "num_classes": 3,
        "levels": 2,
        "context": {"name": "none"},
    }
    with caplog.at_level(logging.WARNING, logger="sfseg.models.segmenter"):
        net = PyramidSegmenter.from_hparams(hparams)
    assert [record.getMessage() for record in caplog.records] == [
        "model.backbone.freeze=true with neither model.backbone.pretrained nor model.backbone.weights: "
        "the frozen encoder's features are random"
    ]
    assert net.backbone.frozen
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sfseg.models.segmenter"):
        PyramidSegmenter.from_hparams(hparams, load_backbone_weights=False)  # a checkpoint: weights follow
    assert caplog.records == []
    with pytest.raises(ValueError, match=r"model.backbone.freeze must be true or false, got 'yes'"):
        PyramidSegmenter.from_hparams({**hparams, "backbone": {**hparams["backbone"], "freeze": "yes"}})


def test_the_warmup_ramps_linearly_into_the_poly_schedule() -> None:
    # mmsegmentation's linear warmup: the scheduled (poly) lr times 1 - (1 - step/warmup)(1 - ratio).
    assert lr_factor(0, 100, 1.0, 10, 1e-6) == pytest.approx(1e-6)
    assert lr_factor(5, 100, 1.0, 10, 1e-6) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(10, 100, 1.0, 10, 1e-6) == pytest.approx(0.9)  # warmed up: poly alone
    assert lr_factor(50, 100, 0.9, 0, 1e-6) == pytest.approx(0.5**0.9)  # no warmup: the paper's schedule
    assert lr_factor(100, 100, 1.0, 10, 1e-6) == 0.0


def test_adamw_takes_its_betas_and_the_warmup_starts_low() -> None:
    config = {"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.99], "weight_decay": 1e-4}
    config |= {"poly_power": 1.0, "warmup_steps": 4, "warmup_ratio": 0.1}
    module = SpecializeAndFuseModule(
        num_classes=3,
        backbone={"name": "convnext_atto", "freeze": True},
        decoder={"name": "segformer", "channels": 16},
        context={"name": "none"},
        relabel={"policy": "true_positive"},
        levels=2,
        optimizer=config,
    )
    module.trainer = types.SimpleNamespace(estimated_stepping_batches=8)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["betas"] for group in optimizer.param_groups] == [(0.8, 0.99)] * 2
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4, 1e-4])  # 0.1 x 1e-3
    optimizer.step()
    scheduler.step()  # step 1 of 8: poly 7/8, warmup 1 - (3/4)(1 - 0.1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 7 / 8 * (1 - 0.75 * 0.9))
    # The frozen encoder is in no group: the first holds the decoder alone.
    assert (
        {id(p) for p in optimizer.param_groups[0]["params"]}
        == {id(p) for p in module.net.backbone.parameters() if p.requires_grad}
        != set()
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "adam"}, r"model.optimizer.name='adam' is not one of sgd, adamw"),
        ({"lr": 0}, r"model.optimizer.lr must be a number > 0, got 0"),
        ({"warmup_steps": 1.5}, r"model.optimizer.warmup_steps must be a whole number >= 0, got 1.5"),
        ({"warmup_ratio": 2}, r"model.optimizer.warmup_ratio must be at most 1, got 2"),
        ({"betas": [0.9]}, r"model.optimizer.betas must be two numbers in \[0, 1\), got \[0.9\]"),
        ({"eps": 1e-8}, r"model.optimizer has unknown keys \['eps'\]; allowed: \['betas', 'head_lr_mult'"),
    ],
)
def test_bad_optimizer_settings_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimizer_config(config)


@pytest.mark.slow
def test_the_dinov2_linear_protocol_experiment_trains_on_the_ade20k_fixture(tmp_path: Path, caplog) -> None:
    from sfseg.train import train

    root, run_dir = make_ade20k(tmp_path / "data"), tmp_path / "run"
    cfg = compose_config(
        [
            "experiment=ade20k_dinov2_frozen",
            f"data.root={root}",
            "data.crop_size=64",
            "data.batch_size=2",
            "data.num_workers=0",
            "model.backbone.pretrained=false",  # nothing may download in tests
            "trainer.max_steps=2",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false",
            "num_pyramid_images=0",
            f"hydra.run.dir={run_dir}",
        ],
        run_dir,
    )
    assert cfg.model.backbone.name == "vit_small_patch14_dinov2.lvd142m" and cfg.model.backbone.freeze
    assert (cfg.model.optimizer.name, cfg.model.optimizer.lr, cfg.model.optimizer.warmup_steps) == (
        "adamw",
        1e-3,
        1500,
    )
    with caplog.at_level(logging.WARNING, logger="sfseg.models.segmenter"):
        metrics = train(cfg)
    assert "the frozen encoder's features are random" in caplog.text  # pretrained=false here
    assert metrics["step"] == 2 and 0 <= metrics["mIoU"] <= 1
    hparams = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = hparams["hyper_parameters"]
    assert hparams["num_classes"] == 150 and hparams["backbone"]["layers"] == [-4, -3, -2, -1]
    assert hparams["decoder"] == {"name": "segformer", "channels": 256}
