"""model/decoder: the decoders against their own definitions, the heads and every context module on each,
the paper's configs keeping their networks, keys and GMACs, checkpoints from before the decoder axis,
and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import HydraException
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from sfseg.inference import image_logits
from sfseg.models import DECODERS, FCNHead, PyramidSegmenter, create_backbone
from sfseg.models.decoders import AllMLPDecoder, TopDownFPN, build_decoder
from sfseg.pyramid import build_targets, pyramid_loss
from tests.conftest import compose_config
from tests.test_sparse import assert_same_fuse, random_batch_norm_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

# A hierarchical encoder's maps at strides 4..32 of a 64x96 image, as decoders read them.
CHANNELS, STRIDES = [8, 16, 24, 32], [4, 8, 16, 32]


def encoder_maps(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, c, 64 // s, 96 // s) for c, s in zip(CHANNELS, STRIDES, strict=True)]


def with_random_statistics(module: torch.nn.Module) -> torch.nn.Module:
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.mark.parametrize(
    ("name", "channels", "width"),
    [("hrnet", 60, 60), ("concat", None, 80), ("segformer", 16, 16), ("fpn", 16, 16)],
)
def test_each_decoder_gives_one_stride_4_map_of_its_width(
    name: str, channels: int | None, width: int
) -> None:
    decoder = build_decoder({"name": name, "channels": channels}, CHANNELS, STRIDES).eval()
    assert decoder.out_channels == width
    with torch.no_grad():
        assert decoder(encoder_maps()).shape == (2, width, 16, 24)


def test_the_segformer_decoder_computes_segformers_concatenation() -> None:
    # SegFormer's MLP decoder as written: a Linear per map, upsampled, concatenated, Linear-BN-ReLU.
    decoder = with_random_statistics(AllMLPDecoder(CHANNELS, STRIDES, channels=16))
    maps = encoder_maps()
    size = maps[0].shape[-2:]
    projected = [
        F.interpolate(linear(x), size=size, mode="bilinear", align_corners=False)
        for linear, x in zip(decoder.linear, maps, strict=True)
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(maps), decoder.fuse(torch.cat(projected, dim=1)), atol=1e-5, rtol=1e-5
        )


def test_the_fpn_decoder_carries_the_coarsest_map_down_to_every_cell() -> None:
    decoder = with_random_statistics(TopDownFPN(CHANNELS, STRIDES, channels=16))
    maps = encoder_maps(batch=1)
    with torch.no_grad():
        base = decoder(maps)
        coarse = decoder([*maps[:-1], maps[-1] + torch.randn_like(maps[-1])])
        fine = maps[0].clone()
        fine[..., 8, 12] += 10.0
        local = decoder([fine, *maps[1:]])
    assert ((coarse - base).abs().amax(1) > 0).all()  # the top-down pathway reaches every cell
    # A finest-map cell reaches its 3x3 neighbourhood only (the smoothing Conv3x3).
    reached = ((local - base).abs().amax(1)[0] > 0).nonzero().tolist()
    assert sorted(reached) == [[r, c] for r in (7, 8, 9) for c in (11, 12, 13)]


def test_the_hrnet_decoder_splits_its_width_by_stride() -> None:
    decoder = build_decoder({"name": "hrnet", "channels": 720}, CHANNELS, STRIDES)
    assert [reduce[0].out_channels for reduce in decoder.reduce] == [48, 96, 192, 384]  # HRNet-W48's
    assert decoder.fuse[0].kernel_size == (3, 3) and decoder.fuse[0].in_channels == 720
    with pytest.raises(
        ValueError, match=r"model.decoder.channels=100: the hrnet decoder .* a multiple of 15"
    ):
        build_decoder({"name": "hrnet", "channels": 100}, CHANNELS, STRIDES)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"name": "aspp"},
            r"model.decoder.name='aspp' is not a decoder; choose one of hrnet, concat, segformer, fpn",
        ),
        (
            {"name": "concat", "channels": 64},
            r"concat decoder's width is the encoder's maps' widths summed \(80 here\)",
        ),
        ({"name": "fpn", "channels": 0}, r"model.decoder.channels must be a whole number >= 1"),
        (
            {"name": "fpn", "width": 8},
            r"model.decoder has unknown keys \['width'\]; allowed: \['channels', 'name'\]",
        ),
    ],
)
def test_bad_decoder_settings_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_decoder(config, CHANNELS, STRIDES)


def test_an_unknown_decoder_on_the_command_line_lists_the_allowed_ones(run_dir) -> None:
    with pytest.raises(HydraException, match=r"model/decoder/aspp") as error:
        compose_config(["model/decoder=aspp"], run_dir)
    assert all(name in str(error.value) for name in DECODERS)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("context", ["c2f", "ocr", "ccnet"])
def test_the_heads_and_every_context_module_take_the_decoders_width(decoder: str, context: str) -> None:
    # OCR's auxiliary classifier reads X itself, the others X projected to D_s: all at the decoder's D.
    config = {"name": decoder, "channels": None if decoder == "concat" else 60}
    net = PyramidSegmenter(
        "convnext_atto", 3, 4, context, unity_channels=8, semantic_channels=16, decoder=config
    )
    width = net.backbone.out_channels
    assert net.semantic_head.project[0].in_channels == net.unity_head.reduce[0].in_channels == width
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    out = net.train()(torch.randn(2, 3, 64, 64))
    pyramid_loss(out.semantic, out.unity, build_targets(labels, 4)).total.backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []
    random_batch_norm_statistics(net)
    with torch.inference_mode():
        images = torch.randn(1, 3, 64, 96)
        assert_same_fuse(
            image_logits(net, images, 0.5, sparse=False),
            image_logits(net, images, 0.5, sparse=True),
            atol=1e-4,
        )


# ---------------------------------------------------------------------------------------------
# The paper's configs: their networks, their checkpoints' keys, their GMACs


def gmacs_by_module(call, images: torch.Tensor) -> dict[str, float]:
    """GMACs of one call, in all ("Global") and per module (FlopCounterMode counts a multiply-add as 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call(images)
    return {module: sum(counts.values()) / 2e9 for module, counts in counter.get_flop_counts().items()}


@pytest.mark.parametrize(
    ("experiment", "backbone_gmacs", "model_gmacs", "fcn_gmacs"),
    # docs/bench/backbones.md (hrnet_w48 and resnet101 rows: backbone and S&F GMACs) and docs/bench/results.md
    # (Table 5's fcn and sf_c2f dense on hrnet_w48), 512x512, 150 classes, c2f, L=4.
    [("ade20k_hrnet48", 84.7, 108.1, 95.0), ("ade20k_resnet101", 118.0, 141.3, None)],
)
def test_the_papers_configs_keep_the_gmacs_docs_bench_records(
    experiment: str, backbone_gmacs: float, model_gmacs: float, fcn_gmacs: float | None, run_dir
) -> None:
    # Counted on the meta device: shapes only, no memory, no arithmetic.
    cfg = compose_config(
        [f"experiment={experiment}", "data.root=/data", "model.backbone.pretrained=false"], run_dir
    )
    with torch.device("meta"):
        net = instantiate(cfg.model, num_classes=150).net.eval()
        counted = gmacs_by_module(
            lambda x: image_logits(net, x, 0.9, sparse=False), torch.zeros(1, 3, 512, 512)
        )
        assert round(counted["PyramidSegmenter.backbone"], 1) == backbone_gmacs
        assert round(counted["Global"], 1) == model_gmacs
        if (
            fcn_gmacs is not None
        ):  # Table 5's FCN: the backbone and HRNet's head at D (bilinear upsampling counts 0)
            head = FCNHead(net.backbone.out_channels, 150)
            x = torch.zeros(1, net.backbone.out_channels, 128, 128)
            assert (
                round(counted["PyramidSegmenter.backbone"] + gmacs_by_module(head, x)["Global"], 1)
                == fcn_gmacs
            )


@pytest.mark.parametrize(
    ("name", "decoder_keys"),
    [
        ("hrnet_w18_small", set()),
        ("local", set()),
        ("resnet101", {"reduce", "fuse"}),
        ("convnext_atto", {"reduce", "fuse"}),
    ],
)
def test_a_checkpoint_from_before_model_decoder_rebuilds_its_network(
    name: str, decoder_keys: set[str]
) -> None:
    # Such a checkpoint's hyper_parameters have no decoder: the HRNets and local were HRNetV2's
    # concatenation and the stride-4 map, every other encoder the fusion decoder at D=720.
    hparams = {"backbone": {"name": name}, "num_classes": 3, "levels": 4, "context": {"name": "c2f"}}
    with torch.device("meta"):
        net = PyramidSegmenter.from_hparams(hparams, load_backbone_weights=False)
    parts = {key.split(".")[1] for key in net.state_dict() if key.startswith("backbone.")}
    assert parts == {"body", *decoder_keys}
    if decoder_keys:
        assert [reduce[0].out_channels for reduce in net.backbone.reduce] == [48, 96, 192, 384]


def test_a_config_picks_each_backbones_paper_decoder_unless_told(run_dir) -> None:
    def decoder(*overrides: str) -> tuple[str, int | None, int]:
        model = compose_config(list(overrides), run_dir).model
        return model.decoder.name, model.decoder.channels, model.semantic_channels

    assert decoder("experiment=ade20k_hrnet48", "data.root=/d")[:2] == ("concat", None)
    assert decoder("experiment=ade20k_resnet101", "data.root=/d") == ("hrnet", 720, 512)
    assert decoder("model/backbone=local")[:2] == ("concat", None)
    assert decoder("~experiment", "model/backbone=timm") == ("segformer", 256, 128)
    assert decoder("~experiment", "model/backbone=timm", "model/decoder=fpn") == ("fpn", 256, 128)
    assert decoder(
        "~experiment", "model/backbone=resnet101", "model/decoder=hrnet", "model.decoder.channels=360"
    ) == ("hrnet", 360, 512)
    backbone = create_backbone("resnet101", decoder={"name": "hrnet", "channels": 360})
    assert [reduce[0].out_channels for reduce in backbone.reduce] == [24, 48, 96, 192]
