"""Offline installs: `python -m sfseg.wheelhouse` (make wheelhouse) fills a folder with wheels that install
with `pip install --no-index` into an environment that already has torch."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import pytest

from sfseg.wheelhouse import (
    SOURCE_ONLY,
    canonical,
    dependency_edges,
    kept_packages,
    main,
    parse_requirement,
    platform_tags,
    project_requirements,
    requirement_name,
)

REPO = Path(__file__).resolve().parents[1]
# What the fresh environment has (a cluster's torch, and what the node has), with their needs.
PRESENT = ("torch", "torchvision", "lightning", "timm", "torchmetrics", "scipy", "opencv-python-headless")
# sfseg's config stack, which the fresh environment lacks: its wheels come from the wheelhouse.
CONFIG_STACK = ("hydra-core", "omegaconf", "albumentations")


def item(name: str, requires: list[str], requested: bool = False, extras: list[str] | None = None) -> dict:
    """One entry of pip's installation report."""
    entry = {"metadata": {"name": name, "version": "1", "requires_dist": requires}, "requested": requested}
    return entry | ({"requested_extras": extras} if extras else {})


def names(items: list[dict]) -> list[str]:
    return [canonical(entry["metadata"]["name"]) for entry in items]


def test_without_torch_its_own_dependencies_go_and_shared_ones_stay() -> None:
    report = {
        "install": [
            item(
                "torch",
                ["filelock", "sympy", "cuda-toolkit[cudart]; sys_platform == 'linux'"],
                requested=True,
            ),
            item(
                "cuda-toolkit", ["nvidia-cuda-runtime; extra == 'cudart'", "nvidia-cufft; extra == 'cufft'"]
            ),
            item("nvidia-cuda-runtime", []),
            item("sympy", ["mpmath"]),
            item("mpmath", []),
            item("huggingface_hub", ["filelock", 'pytest; extra == "testing"']),
            item("timm", ["torch", "huggingface-hub"], requested=True),
            item("filelock", []),
            item("lightning", ["fsspec[http]", "torch"], requested=True),
            item("fsspec", ["aiohttp; extra == 'http'", "requests; extra == 'http'"]),
            item("aiohttp", []),
            item("requests", []),
            item("pytest", []),
        ]
    }
    everything = names(kept_packages(report, []))
    # torch's extra cudart brings nvidia-cuda-runtime; an extra nobody asked for (cufft, testing) does not.
    assert "nvidia-cuda-runtime" in everything and "pytest" not in everything
    assert names(kept_packages(report, ["Torch"])) == [
        "aiohttp", "filelock", "fsspec", "huggingface-hub", "lightning", "requests", "timm"
    ]  # fmt: skip


def test_requirements_and_their_extras_are_read_as_pip_compares_them() -> None:
    assert parse_requirement("cuda-toolkit[cuBLAS, cudart]==13.0; sys_platform == 'linux'") == (
        "cuda-toolkit",
        frozenset({"cublas", "cudart"}),
    )
    assert requirement_name("PyYAML>=6") == "pyyaml" and requirement_name("torch (==2.13.0)") == "torch"
    edges = dependency_edges(["a", "b; extra == 'x'", "c; extra == 'y' and python_version > '3'"], ["X"])
    assert edges == {("a", frozenset()), ("b", frozenset())}
    with pytest.raises(ValueError, match="cannot read a package name"):
        parse_requirement("[broken")


def test_a_manylinux_target_takes_every_older_glibc() -> None:
    tags = platform_tags("manylinux_2_28_x86_64")
    assert (
        tags[0] == "manylinux_2_28_x86_64"
        and "manylinux_2_17_x86_64" in tags
        and "manylinux_2_5_x86_64" in tags
    )
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_31_x86_64" not in tags
    assert platform_tags("manylinux2014_aarch64")[0] == "manylinux_2_17_aarch64"
    assert platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_the_default_requirements_are_the_projects() -> None:
    requirements = project_requirements()
    names = {requirement_name(requirement) for requirement in requirements}
    assert {"torch", "torchvision", *CONFIG_STACK, "setuptools"} <= names  # setuptools: pip install -e .


def test_refuses_a_python_version_it_cannot_pass_to_pip(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--python-version", "311", "--dest", "unused"])
    assert exit_info.value.code == 2 and "--python-version '311'" in capsys.readouterr().err


def installed_closure(names: Iterable[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions `names` need, with the extras they ask for."""
    found: dict[str, importlib.metadata.Distribution] = {}
    extras_seen: dict[str, frozenset[str]] = {}
    todo = [(canonical(name), frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        try:
            found[name] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform
        extras_seen[name] = extras_seen.get(name, frozenset()) | extras
        todo += dependency_edges(found[name].requires, extras_seen[name])
    return found


def environment_with(tmp_path: Path, names: Iterable[str]) -> tuple[Path, set[str]]:
    """A fresh virtual environment that sees this one's `names` and what they need, and nothing else: a
    folder of links to their files, on its path through a .pth file. Returns its python and what it has."""
    present = installed_closure(names)
    folder = tmp_path / "present"
    folder.mkdir()
    for dist in present.values():
        for top in {file.parts[0] for file in dist.files or () if file.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "present.pth").write_text(f"{folder}\n")
    return python, set(present)


# Compose the real config, build its datamodule and transform a training sample: hydra, omegaconf and
# albumentations at work, with sfseg from the checkout (PYTHONPATH=src) as on a node without make.
CONFIG_STACK_CHECK = """
import hydra, omegaconf, albumentations, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sfseg import CONFIG_DIR
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=["data.size=64", "data.train_samples=2"])
datamodule = instantiate(cfg.data)
datamodule.setup("fit")
print(hydra.__file__, tuple(datamodule.train_set[0]["image"].shape))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or sysconfig.get_platform() != "linux-x86_64", reason="x86-64 Linux"
)
@pytest.mark.slow
def test_a_wheelhouse_installs_the_missing_config_stack_with_no_index(tmp_path: Path) -> None:
    python, present = environment_with(tmp_path, PRESENT)
    lacks = subprocess.run([str(python), "-c", "import torch, hydra"], capture_output=True, text=True)
    assert "No module named 'hydra'" in lacks.stderr  # torch is there, the config stack is not

    wheels = tmp_path / "wheels"
    requirements = [req for req in project_requirements() if requirement_name(req) in CONFIG_STACK]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = [sys.executable, "-m", "sfseg.wheelhouse", "--dest", str(wheels), "--python-version", version]
    subprocess.run([*build, "--without", ",".join(sorted(present)), *requirements], check=True, timeout=600)
    built = {canonical(wheel.name.split("-")[0]) for wheel in wheels.glob("*.whl")}
    assert set(CONFIG_STACK) | {requirement_name(SOURCE_ONLY[0])} <= built
    assert not built & present  # nothing the environment has
    assert (wheels / "requirements.txt").read_text().split() == requirements

    # Only the wheelhouse: no configured index or find-links either.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PYTHONPATH": str(REPO / "src")}
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--find-links"]
    install += [str(wheels), "-r", str(wheels / "requirements.txt")]
    subprocess.run(install, check=True, env=env, timeout=600)
    done = subprocess.run(
        [str(python), "-c", CONFIG_STACK_CHECK], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    hydra_file, shape = done.stdout.split(maxsplit=1)
    assert hydra_file.startswith(str(tmp_path / "venv")) and shape.strip() == "(3, 64, 64)"
