"""Every command, run as a user would with a mandatory key left out or a wrong value: one short message
(the key, what it expects, the command completed with an example), a non-zero exit, no traceback, and
nothing written. Each command fails before it builds a model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import sfseg.eval  # noqa: F401  (registers eval's default data, data=checkpoint)
from sfseg.cli import EXPECTED, expectation, missing_keys, short_errors
from sfseg.data.validate import main as validate_main
from tests.conftest import CONF_DIR, compose_config
from tests.processes import run_module

ENV = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}


def run_command(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_module(module, *overrides, cwd=cwd, env=ENV, timeout=300)


@pytest.mark.parametrize(
    ("module", "overrides", "keys", "example"),
    [
        (
            "sfseg.train",
            ["data=ade20k", "seed=3"],
            ["data.root"],
            "seed=3 data.root=/data/ADEChallengeData2016",
        ),
        ("sfseg.eval", [], ["ckpt_path"], "'ckpt_path=outputs/train/<time>/checkpoints/last.ckpt'"),
        ("sfseg.predict", [], ["ckpt_path", "input"], "last.ckpt' input=photos/"),
        ("sfseg.export", ["format=torchscript"], ["ckpt_path"], "format=torchscript 'ckpt_path="),
        ("sfseg.data.validate", ["data=pascal_context59"], ["data.root"], "data.root=/data/VOCdevkit"),
        ("sfseg.data.browse", ["data=coco_stuff164k"], ["data.root"], "data.root=/data/coco_stuff164k"),
    ],
)
def test_a_missing_key_prints_one_message_with_an_example(
    module: str, overrides: list[str], keys: list[str], example: str, tmp_path: Path
):
    result = run_command(module, *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    first, second = result.stderr.strip().splitlines()
    assert first.startswith(f"error: python -m {module} needs {keys[0]} (")
    assert all(f"{key} (" in first for key in keys)
    assert second.startswith(f"  e.g. python -m {module} {' '.join(overrides)}") and example in second
    assert list(tmp_path.iterdir()) == []  # no run folder, no eval folder, nothing


def test_a_sweep_job_without_its_key_stops_the_sweep_with_the_message(tmp_path: Path):
    result = run_command("sfseg.train", "-m", "data=ade20k", "seed=0,1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith("error: python -m sfseg.train needs data.root (")
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("module", "overrides", "message"),
    [
        (
            "sfseg.export",
            ["ckpt_path=a.ckpt", "format=tflite"],
            "format='tflite' is not one of onnx, torchscript, pretrained",
        ),
        (
            "sfseg.eval",
            ["ckpt_path=typo.ckpt"],
            "ckpt_path=typo.ckpt: no such checkpoint file or model folder",
        ),  # a resolver's
    ],
)
def test_a_wrong_value_prints_the_key_and_what_it_allows_without_a_traceback(
    module: str, overrides: list[str], message: str, tmp_path: Path
):
    result = run_command(module, *overrides, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"error: {message}\n" and "Traceback" not in result.stdout


def test_hydras_own_errors_are_one_message_too(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        validate_main(["data=nope"])  # composed by sfseg.data.validate itself, not by hydra.main
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: In 'train': Could not find 'data/nope'")


def test_the_traceback_is_still_there_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    with pytest.raises(SystemExit), short_errors():
        raise FileNotFoundError("data.root=/x: not found")
    assert capsys.readouterr().err == "error: data.root=/x: not found\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError, match=r"data\.root=/x"), short_errors():
        raise FileNotFoundError("data.root=/x: not found")


@pytest.mark.parametrize(
    ("config_name", "overrides", "expected"),
    [
        ("train", [], {}),
        ("train", ["data=ade20k"], {"data.root": "/data/ADEChallengeData2016"}),
        ("train", ["data=coco_stuff10k"], {"data.root": "/data/cocostuff-10k"}),
        ("train", ["data=coco_stuff164k"], {"data.root": "/data/coco_stuff164k"}),
        ("train", ["data=pascal_context59"], {"data.root": "/data/VOCdevkit"}),
        ("train", ["data=cityscapes"], {"data.root": "/data/cityscapes"}),
        ("train", ["data=folder"], {"data.root": "/data/<dataset>", "data.classes": "classes.yaml"}),
        ("eval", [], {"ckpt_path": EXPECTED["ckpt_path"][1]}),
        (
            "eval",
            ["data=ade20k"],
            {"ckpt_path": EXPECTED["ckpt_path"][1], "data.root": "/data/ADEChallengeData2016"},
        ),
        ("predict", [], {"ckpt_path": EXPECTED["ckpt_path"][1], "input": EXPECTED["input"][1]}),
        ("export", [], {"ckpt_path": EXPECTED["ckpt_path"][1]}),
        ("browse", ["data=pascal_context59"], {"data.root": "/data/VOCdevkit"}),
    ],
)
def test_missing_keys_are_found_with_an_example_value_each(
    config_name: str, overrides: list[str], expected: dict[str, str], run_dir: Path
):
    cfg = compose_config(overrides, run_dir, config_name)
    assert missing_keys(cfg) == list(expected)
    assert {key: expectation(key, cfg)[1] for key in expected} == expected


def test_every_mandatory_key_in_conf_has_its_expectation():
    # A new `???` key needs its entry in sfseg.cli.EXPECTED (data.root: the dataset's layout).
    mandatory = {
        ("data." if path.parent.name == "data" else "") + line.split(":")[0].strip()
        for path in CONF_DIR.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if line.split("#")[0].rstrip().endswith(": ???")
    }
    assert mandatory == {*EXPECTED, "data.root"}
