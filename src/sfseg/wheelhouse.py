"""Wheels of every runtime dependency in one folder, for installs without internet (`make wheelhouse`).

    python -m sfseg.wheelhouse --dest wheelhouse [--python-version 3.11] [--platform manylinux_2_28_x86_64]
                               [--without torch,torchvision] [REQUIREMENT ...]

Run it where pip reaches the package registry (a cluster's login node); it needs only the standard
library and pip, not sfseg's dependencies. It resolves the requirements (default: pyproject.toml's
dependencies and its build backend, so that `pip install -e .` works offline) for the target Python
and platform, then downloads each resolved wheel. `--without` leaves out packages the target already
has (clusters often provide torch and torchvision) together with everything only they need.
Dependencies published as source archives only (antlr4-python3-runtime, which hydra-core and omegaconf
pin) are built into pure-Python wheels here. The folder also gets requirements.txt: the requirements
themselves, less --without, for `pip install --no-index --find-links <dest> -r <dest>/requirements.txt`.
Then, with no network (docs/gpu.md, "Clusters without internet"):

    make install-offline WHEELHOUSE=<dest>
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# Released as source archives only: built into wheels before the resolution, which takes wheels only.
# omegaconf 2.3 and hydra-core 1.3 pin antlr4-python3-runtime==4.9.*, whose one release is 4.9.3.
SOURCE_ONLY = ("antlr4-python3-runtime==4.9.3",)
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: "PyYAML" -> "pyyaml", "typing_extensions" ->
    "typing-extensions"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(requirement: str) -> tuple[str, frozenset[str]]:
    """The package and the extras a requirement names: "cuda-toolkit[cudart]>=13; ..." ->
    ("cuda-toolkit", {"cudart"})."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a package name from the requirement {requirement!r}")
    extras = frozenset(
        canonical(extra.strip()) for extra in (match.group(2) or "").split(",") if extra.strip()
    )
    return canonical(match.group(1)), extras


def requirement_name(requirement: str) -> str:
    return parse_requirement(requirement)[0]


def project_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """pyproject.toml's runtime dependencies, then its build-system requirements."""
    try:
        import tomllib
    except ModuleNotFoundError as error:  # Python 3.10
        raise SystemExit(
            "reading pyproject.toml needs Python >= 3.11 (tomllib) on this machine; the target's Python is "
            "--python-version, or give the requirements on the command line"
        ) from error
    config = tomllib.loads(pyproject.read_text())
    return [*config["project"]["dependencies"], *config["build-system"]["requires"]]


def platform_tags(platform: str) -> list[str]:
    """pip's --platform values for a target: a manylinux tag also admits every older glibc's wheels
    (pip itself matches the tags it is given exactly)."""
    for legacy, minor in LEGACY_MANYLINUX.items():
        if platform.startswith(legacy + "_"):
            platform = f"manylinux_2_{minor}_{platform.removeprefix(legacy + '_')}"
    match = MANYLINUX.match(platform)
    if match is None:
        return [platform]
    major, newest, arch = int(match.group(1)), int(match.group(2)), match.group(3)
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 4, -1)]
    if major == 2:
        tags += [f"{legacy}_{arch}" for legacy, minor in LEGACY_MANYLINUX.items() if minor <= newest]
    return tags


def dependency_edges(
    requires_dist: Iterable[str] | None, extras: Iterable[str]
) -> set[tuple[str, frozenset[str]]]:
    """What a package requires (its Requires-Dist) when installed with `extras`: (package, its extras)
    pairs, leaving out the requirements of the extras nobody asked for."""
    asked = {canonical(extra) for extra in extras}
    edges = set()
    for requirement in requires_dist or ():
        gates = {canonical(extra) for extra in EXTRA.findall(requirement.partition(";")[2])}
        if not gates or gates & asked:
            edges.add(parse_requirement(requirement))
    return edges


def kept_packages(report: Mapping[str, Any], without: Iterable[str]) -> list[dict[str, Any]]:
    """The resolved items to download: what the requested ones need, with the extras they ask for, not
    passing through `without` (so torch's own dependencies go when torch goes, unless something else
    needs them too)."""
    items = {canonical(item["metadata"]["name"]): item for item in report["install"]}
    left_out = {canonical(name) for name in without}
    todo = [
        (name, frozenset(item.get("requested_extras") or ()))
        for name, item in items.items()
        if item.get("requested") and name not in left_out
    ]
    kept: dict[str, frozenset[str]] = {}
    while todo:
        name, extras = todo.pop()
        if name in kept and extras <= kept[name]:
            continue
        kept[name] = kept.get(name, frozenset()) | extras
        edges = dependency_edges(items[name]["metadata"].get("requires_dist"), kept[name])
        todo += [(edge, edge_extras) for edge, edge_extras in edges if edge in items and edge not in left_out]
    return [items[name] for name in sorted(kept)]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def target_options(python_version: str, platforms: Sequence[str]) -> list[str]:
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platforms:
        options += ["--platform", tag]
    return options


def resolve(requirements: Sequence[str], dest: Path, options: Sequence[str], scratch: Path) -> dict[str, Any]:
    """pip's installation report of `requirements` for the target, wheels only (dest's among them)."""
    report = scratch / "report.json"
    pip(
        "install", "--dry-run", "--quiet", "--ignore-installed", "--target", str(scratch / "target"),
        "--report", str(report), "--find-links", str(dest), *options, *requirements,
    )  # fmt: skip
    return json.loads(report.read_text())


def build_wheelhouse(
    dest: Path,
    requirements: Sequence[str],
    python_version: str,
    platforms: Sequence[str],
    without: Sequence[str],
) -> list[str]:
    """Fill `dest`; return the pinned packages it holds."""
    dest.mkdir(parents=True, exist_ok=True)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), *SOURCE_ONLY)
    options = target_options(python_version, platforms)
    with tempfile.TemporaryDirectory() as scratch:
        report = resolve(requirements, dest, options, Path(scratch))
    kept = kept_packages(report, without)
    pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in kept]
    built = {requirement_name(requirement) for requirement in SOURCE_ONLY}
    for wheel in dest.glob("*.whl"):  # a built wheel nothing needs
        if canonical(wheel.name.split("-")[0]) in built - {requirement_name(pin) for pin in pins}:
            wheel.unlink()
    downloads = [pin for pin in pins if requirement_name(pin) not in built]
    pip("download", "--quiet", "--no-deps", "--dest", str(dest), *options, *downloads)
    left_out = {canonical(name) for name in without}
    kept_requirements = [req for req in requirements if requirement_name(req) not in left_out]
    (dest / "requirements.txt").write_text("\n".join(kept_requirements) + "\n")
    return pins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sfseg.wheelhouse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dest", type=Path, default=Path("wheelhouse"), help="the folder of wheels")
    parser.add_argument(
        "--python-version",
        default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="the target's Python, e.g. 3.11 (default: this one's)",
    )
    parser.add_argument(
        "--platform",
        default="manylinux_2_28_x86_64",
        help="the target's newest wheel tag: manylinux_2_28_x86_64 (glibc >= 2.28, the default) also takes "
        "older glibc's wheels; manylinux_2_17_x86_64 for glibc 2.17",
    )
    parser.add_argument(
        "--without", default="", help="comma list of packages the target already has, e.g. torch,torchvision"
    )
    parser.add_argument("requirements", nargs="*", help="default: pyproject.toml's dependencies")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.11")
    without = [name.strip() for name in args.without.split(",") if name.strip()]
    requirements = args.requirements or project_requirements()
    pins = build_wheelhouse(
        args.dest, requirements, args.python_version, platform_tags(args.platform), without
    )
    print(f"{args.dest}: {len(pins)} packages for Python {args.python_version} on {args.platform}", end="")
    print(f", without {', '.join(without)}" if without else "")


if __name__ == "__main__":
    main()
