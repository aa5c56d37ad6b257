"""Every config group option composes and instantiates; bad values name the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sfseg.builder import build
from tests.conftest import CONF_DIR, TINY, compose_config


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def test_groups_have_the_documented_options():
    assert options("model/backbone") == [
        "hrnet_w18",
        "hrnet_w18_small",
        "hrnet_w18_small_v2",
        "hrnet_w32",
        "hrnet_w48",
        "local",
        "resnet101",
        "resnet101c",
        "timm",
    ]
    assert options("model/context") == ["anl", "anl_multi", "c2f", "ccnet", "none", "ocr"]
    assert options("model/relabel") == ["naive", "oracle", "true_positive"]
    assert options("model/loss") == ["ce", "ohem"]
    assert options("model/fuse") == ["hard", "learned", "soft"]


@pytest.mark.parametrize("fuse", options("model/fuse"))
def test_every_fuse_option_instantiates_and_hard_is_the_default(fuse: str, run_dir: Path):
    assert compose_config(TINY, run_dir).model.fuse.name == "hard"
    cfg = compose_config([*TINY, f"model/fuse={fuse}"], run_dir)
    _, model, _ = build(cfg)
    assert model.hparams.fuse["name"] == model.net.fuse_rule.name == fuse
    assert (model.net.fuse_gate is not None) == (fuse == "learned")


@pytest.mark.parametrize("backbone", options("model/backbone"))
def test_every_backbone_option_instantiates(backbone: str, run_dir: Path):
    cfg = compose_config([*TINY, f"model/backbone={backbone}"], run_dir)
    _, model, _ = build(cfg)
    # model/backbone=timm takes any timm model's name; its default is ConvNeXt-T.
    assert model.hparams.backbone["name"] == ("convnext_tiny" if backbone == "timm" else backbone)
    images = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        out = model.eval()(images)
    assert [tuple(y.shape[-2:]) for y in out.semantic] == [(2, 2), (4, 4), (8, 8), (16, 16)]


@pytest.mark.parametrize("context", options("model/context"))
@pytest.mark.parametrize("relabel", options("model/relabel"))
def test_every_context_and_relabel_option_instantiates(context: str, relabel: str, run_dir: Path):
    cfg = compose_config([*TINY, f"model/context={context}", f"model/relabel={relabel}"], run_dir)
    datamodule, model, _ = build(cfg)
    assert model.policy == relabel and model.hparams.context["name"] == context
    assert datamodule.num_levels == model.levels == 4
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert len(out.semantic) == 4 and len(out.unity) == 3


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_option_instantiates(trainer: str, run_dir: Path):
    # GPU options are checked for everything but the device, which this machine may not have.
    overrides = [*TINY, f"trainer={trainer}"]
    if trainer != "default":
        overrides.append("trainer.accelerator=cpu")
    _, _, built = build(compose_config(overrides, run_dir))
    assert built.max_steps == 2


def test_the_issue_example_composes(run_dir: Path):
    cfg = compose_config(
        [
            *TINY,
            "model/backbone=hrnet_w32",
            "model/context=anl_multi",
            "model/relabel=oracle",
            "model.levels=2",
            "model.tau=0.8",
        ],
        run_dir,
    )
    datamodule, model, _ = build(cfg)
    assert (model.levels, model.tau, model.policy) == (2, 0.8, "oracle")
    assert datamodule.num_levels == 2  # the datamodule builds targets for the model's L


def test_model_hyperparameters_are_plain_values(run_dir: Path):
    _, model, _ = build(compose_config(TINY, run_dir))

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list | tuple):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool)

    assert plain(dict(model.hparams))
    assert not OmegaConf.is_config(model.hparams.backbone)


def test_unknown_group_option_lists_the_choices(run_dir: Path):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([*TINY, "model/context=aspp"], run_dir)
    message = str(error.value)
    assert "model/context" in message and "anl_multi" in message and "c2f" in message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.context.name=aspp", "model.context.name='aspp'"),
        ("model.backbone.name=vgg17", "model.backbone.name='vgg17' is neither one of sfseg's backbones"),
        (
            "model.relabel.policy=greedy",
            "model.relabel.policy='greedy' is not one of naive, oracle, true_positive",
        ),
        ("model.tau=1.5", "model.tau"),
        ("model.levels=0", "model.levels"),
        ("model.loss.name=focal", "model.loss.name='focal' is not one of ce, ohem"),
        ("model/loss=ohem model.loss.thresh=0", "model.loss.thresh must be in (0, 1]"),
        ("model/loss=ohem model.loss.min_kept=-3", "model.loss.min_kept must be an integer >= 1, got -3"),
        ("model/loss=ohem +model.loss.ratio=0.5", "model.loss has unknown keys ['ratio']"),
        ("model/context=ocr model.context.aux_weight=-1", "model.context.aux_weight must be a number >= 0"),
        ("+model.context.aux_weight=0.4", "model.context.aux_weight applies to model.context.name=ocr only"),
        ("model.fuse.name=vote", "model.fuse.name='vote' is not one of hard, soft, learned"),
        ("model/fuse=learned model.fuse.hidden_channels=0", "model.fuse.hidden_channels must be >= 1, got 0"),
        ("model/fuse=soft +model.fuse.hidden_channels=8", "model.fuse has unknown keys ['hidden_channels']"),
        ("model/fuse=learned model.levels=1", "model/fuse=learned needs model.levels >= 2"),
        ("model.fuse.upsample=cubic", "model.fuse.upsample='cubic' is not one of nearest, bilinear"),
        ("model/fuse=learned model.fuse.lr_mult=0", "model.fuse.lr_mult must be a number > 0, got 0"),
        ("model.compile=yes", "model.compile='yes' is not one of true, false"),
        ("model.channels_last=1", "model.channels_last=1 is not one of true, false"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override: str, fragment: str, run_dir: Path):
    cfg = compose_config([*TINY, *override.split()], run_dir)
    with pytest.raises(Exception) as error:  # Hydra wraps errors raised inside instantiate
        build(cfg)
    assert fragment in str(error.value)


def test_data_size_must_fit_the_coarsest_stride(run_dir: Path):
    cfg = compose_config([*TINY, "data.size=48"], run_dir)
    datamodule = instantiate(cfg.data)
    with pytest.raises(ValueError, match="divisible by the coarsest stride 32"):
        datamodule.setup("fit")


GROUPS = [
    "data",
    "logger",
    "callbacks",
    "trainer",
    "experiment",
    "model/backbone",
    "model/context",
    "model/relabel",
    "model/loss",
    "model/fuse",
]


@pytest.mark.parametrize(
    ("group", "option"),
    [(group, option) for group in [*GROUPS, "hydra/launcher"] for option in options(group)],
)
def test_every_group_option_composes(group: str, option: str, run_dir: Path):
    cfg = compose_config([f"{group}={option}"], run_dir)
    assert cfg.hydra.runtime.choices[group] == option
    if group in ("logger", "callbacks"):  # cheap to build here; the others are built by the tests above
        for node in cfg[group].values():
            assert instantiate(node) is not None
