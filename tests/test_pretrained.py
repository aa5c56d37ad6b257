"""Models others can load: `python -m sfseg.export format=pretrained` writes a model folder (safetensors
weights, config with classes and palette, the training run's config and metrics, a model card) that
`sfseg.inference.load(<folder>)` loads, and `load("hf-hub:<owner>/<name>")` through the real
huggingface_hub, offline, from a Hugging Face cache laid out here as huggingface_hub lays it out. predict,
eval and export take the folder or the hub id as `ckpt_path`; a broken folder or an id that is not cached
is an error naming the file, or saying what to do, in one line."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants, hf_hub_download, snapshot_download
from PIL import Image
from safetensors.torch import load_file, save_file

from sfseg.data.classes import ADE20K_CLASSES, ADE20K_PALETTE, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from sfseg.data.datasets import decode_rgb
from sfseg.eval import default_eval_folder
from sfseg.eval import run as evaluate
from sfseg.export import run as export
from sfseg.inference import Predictor, export_pretrained, load
from tests.conftest import compose_config
from tests.test_eval import train_tiny_checkpoint
from tests.test_predict import untrained_checkpoint

HUB_ID = "sfseg-tests/tiny-synthetic"
MODEL_FILES = {"model.safetensors", "config.json", "training_config.yaml", "metrics.json", "README.md"}


def export_folder(ckpt_path: str | Path, folder: Path, *overrides: str) -> Path:
    """`python -m sfseg.export ckpt_path=... format=pretrained output=<folder>`, in process."""
    overrides = (f"ckpt_path={ckpt_path}", "format=pretrained", f"output={folder}", *overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        return export(compose_config(list(overrides), folder.parent, config_name="export"))


def hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """`folder`'s files as a model repo in huggingface_hub's cache layout: models--<owner>--<name>/ with
    blobs/<sha256>, snapshots/<commit>/<file> (a relative link to its blob) and refs/main (the commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, as a git commit
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        link = repo / "snapshots" / commit / file.name
        blob.parent.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: huggingface_hub reads both at call time from its constants
    (set from HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, as a subprocess does)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def noise_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(sizes):
        path = folder / f"image{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def assert_same_predictions(model: Predictor, reference: Predictor, images: list[Path]) -> None:
    assert (model.class_names, model.palette, model.tau) == (
        reference.class_names,
        reference.palette,
        reference.tau,
    )
    for path in images:
        rgb = decode_rgb(path)[0]
        ours, theirs = model.predict(rgb), reference.predict(rgb)
        np.testing.assert_array_equal(ours.mask, theirs.mask)
        np.testing.assert_array_equal(ours.level_map, theirs.level_map)


# ---------------------------------------------------------------------------------------------
# A trained run's model folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model_folder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_folder(
        trained_run / "checkpoints" / "last.ckpt", tmp_path_factory.mktemp("export") / "tiny"
    )


def card_facts(run: Path) -> list[str]:
    """What the model card of `run`'s model must say of its training: the command and the scores."""
    metrics = json.loads((run / "metrics.json").read_text())
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return [
        f"| trained with | `{shlex.join(['python', '-m', 'sfseg.train', *overrides])}` |",
        f"| {100 * metrics['mIoU']:.2f} | {100 * metrics['mIoU_finest']:.2f} | {100 * metrics['pixel_acc']:.2f} |",
        f"`metrics.json`, checkpoint `{Path(metrics['checkpoint']).name}`, step {metrics['step']}",
    ]


@pytest.mark.slow
def test_the_model_folder_holds_weights_config_classes_and_a_model_card(
    trained_run: Path, model_folder: Path
):
    assert {path.name for path in model_folder.iterdir()} == MODEL_FILES
    config = json.loads((model_folder / "config.json").read_text())
    assert config["class_names"] == list(SYNTHETIC_CLASSES)
    assert config["palette"] == [list(colour) for colour in SYNTHETIC_PALETTE]
    assert config["model"]["levels"] == 4 and config["model"]["backbone"]["name"] == "hrnet_w18_small"
    weights = load_file(model_folder / "model.safetensors")
    net = load(trained_run / "checkpoints" / "last.ckpt", device="cpu").net.state_dict()
    assert weights.keys() == net.keys()
    assert all(torch.equal(weights[key], net[key]) for key in net)
    assert json.loads((model_folder / "metrics.json").read_text()) == json.loads(
        (trained_run / "metrics.json").read_text()
    )
    card = (model_folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sfseg\n")  # the Hub's metadata header
    for fact in (
        "| dataset | synthetic (12 classes) |",
        "| backbone | hrnet_w18_small |",
        "| pyramid levels L | 4 |",
        "| fuse rule | hard, tau = 0.9 |",
        *card_facts(trained_run),
    ):
        assert fact in card, fact


@pytest.mark.slow
def test_the_folder_and_its_hub_id_load_the_checkpoints_model(
    trained_run: Path, model_folder: Path, offline_hub: Path, tmp_path: Path
):
    images = noise_images(tmp_path / "images", [(64, 64), (37, 90)])
    reference = load(trained_run / "checkpoints" / "last.ckpt", device="cpu")
    from_folder = load(model_folder, device="cpu")
    assert_same_predictions(from_folder, reference, images)
    assert from_folder.label_ids("class").tolist() == list(range(12))

    snapshot = hub_cache(model_folder, offline_hub, HUB_ID)
    # The real huggingface_hub resolves the cache offline, as it would after a download.
    assert Path(snapshot_download(HUB_ID)) == snapshot
    assert Path(hf_hub_download(HUB_ID, "config.json")) == snapshot / "config.json"
    assert_same_predictions(load(f"hf-hub:{HUB_ID}", device="cpu"), reference, images)
    assert_same_predictions(load(f"hf-hub:{HUB_ID}@main", device="cpu"), reference, images)


@pytest.mark.slow
def test_eval_and_export_take_the_folder_or_the_hub_id(
    trained_run: Path, model_folder: Path, offline_hub: Path, tmp_path: Path
):
    # eval scores the validation split of the run that trained it (training_config.yaml), as training did.
    metrics = evaluate(compose_config([f"ckpt_path={model_folder}", "eval.device=cpu"], tmp_path, "eval"))
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    assert default_eval_folder(str(model_folder), "whole", [1.0], False, True) == str(
        model_folder.parent / "tiny_results" / "eval"
    )
    assert default_eval_folder(f"hf-hub:{HUB_ID}", "whole", [1.0], False, True) == str(
        Path("outputs") / "hf-hub" / "sfseg-tests--tiny-synthetic" / "eval"
    )
    # export writes the hub model's folder again, with its card, command and metrics, at another tau.
    hub_cache(model_folder, offline_hub, HUB_ID)
    again = export_folder(f"hf-hub:{HUB_ID}", tmp_path / "again", "tau=0.5")
    assert {path.name for path in again.iterdir()} == MODEL_FILES
    card = (again / "README.md").read_text()
    for fact in ("| fuse rule | hard, tau = 0.5 |", *card_facts(trained_run)):
        assert fact in card, fact
    assert load(again, device="cpu").tau == 0.5


@pytest.mark.slow
def test_predict_cli_takes_a_hub_id_offline(model_folder: Path, tmp_path: Path):
    """The command line a user types, in a fresh process that reads HF_HUB_CACHE and HF_HUB_OFFLINE."""
    cache = tmp_path / "hf_cache"
    hub_cache(model_folder, cache, HUB_ID)
    images = noise_images(tmp_path / "photos" / "street", [(48, 64)])
    command = [
        sys.executable,
        "-m",
        "sfseg.predict",
        f"ckpt_path=hf-hub:{HUB_ID}",
        f"input={tmp_path / 'photos'}",
    ]
    command += [f"output={tmp_path / 'out'}", "write=[mask]", "device=cpu"]
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mask = np.asarray(Image.open(tmp_path / "out" / "street" / "image0.png"))
    np.testing.assert_array_equal(
        mask, load(model_folder, device="cpu").predict(decode_rgb(images[0])[0]).mask
    )


# ---------------------------------------------------------------------------------------------
# Bad input, on an untrained model folder


@pytest.fixture
def untrained_folder(tmp_path: Path) -> Path:
    checkpoint = untrained_checkpoint(tmp_path / "ade20k.ckpt", ADE20K_CLASSES)
    folder = tmp_path / "model"
    export_pretrained(load(checkpoint, device="cpu"), folder)
    return folder


def test_a_model_folder_without_its_run_still_loads_and_says_what_it_lacks(untrained_folder: Path):
    assert {path.name for path in untrained_folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "README.md",
    }
    model = load(untrained_folder, device="cpu")
    assert model.class_names == list(ADE20K_CLASSES) and model.palette == list(ADE20K_PALETTE)
    assert model.label_ids("raw").tolist() == list(range(1, 151))  # ADE20K's own ids, from its classes
    card = (untrained_folder / "README.md").read_text()
    assert "| trained with | not recorded |" in card and "Not recorded" in card
    with pytest.raises(FileNotFoundError, match=r"no training_config\.yaml"):
        model.datamodule()


def test_a_missing_or_corrupt_file_is_named(untrained_folder: Path):
    weights, config = untrained_folder / "model.safetensors", untrained_folder / "config.json"
    original = config.read_text()
    config.write_text(original[:100])
    with pytest.raises(ValueError, match=re.escape(f"{config}: not a readable JSON file")):
        load(untrained_folder, device="cpu")
    config.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=re.escape(f"{config}: not an sfseg model config")):
        load(untrained_folder, device="cpu")
    config.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{config}: missing")):
        load(untrained_folder, device="cpu")
    config.write_text(original)

    tensors = load_file(weights)
    dropped = sorted(tensors)[0]  # backbone.body.bn1.bias, a weight the model needs
    save_file({key: value for key, value in tensors.items() if key != dropped}, weights)
    with pytest.raises(
        ValueError, match=re.escape(f"{weights}: its weights do not fit the model it describes")
    ):
        load(untrained_folder, device="cpu")
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load(untrained_folder, device="cpu")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{weights}: missing")):
        load(untrained_folder, device="cpu")


def test_a_hub_id_not_in_the_cache_offline_says_to_download_it_first(offline_hub: Path):
    with pytest.raises(FileNotFoundError) as raised:
        load("hf-hub:nobody/not-cached", device="cpu")
    message = str(raised.value)
    assert "\n" not in message
    assert "ckpt_path=hf-hub:nobody/not-cached: not in the Hugging Face cache" in message
    assert str(offline_hub) in message and "HF_HUB_OFFLINE=1" in message
    assert "`hf download nobody/not-cached`" in message
    with pytest.raises(ValueError, match="not a Hub model id"):
        load("hf-hub:not a valid/id/at all", device="cpu")
    assert huggingface_hub.constants.HF_HUB_OFFLINE
