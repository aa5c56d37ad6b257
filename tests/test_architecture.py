"""The import graph runs one way (README, "Architecture"): entry points -> inference / module / runs ->
models, data, metrics, analysis, visualize -> pyramid. Entry points never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Commands (`python -m ...`): they wire a config to library code and are imported by nothing in src.
ENTRY_POINTS = {
    "sfseg.train",
    "sfseg.eval",
    "sfseg.predict",
    "sfseg.export",
    "sfseg.bench",
    "sfseg.report",
    "sfseg.ablation",
    "sfseg.data.prepare",
    "sfseg.data.validate",
    "sfseg.data.browse",
    "sfseg.gpu_check",
    "sfseg.wheelhouse",
}
# Library layers, upper to lower: a module may import its own layer and the layers below it.
LIBRARY_LAYERS = (
    (
        "sfseg.inference",
        "sfseg.module",
        "sfseg.runs",
        "sfseg.callbacks",
        "sfseg.sweeps",
        "sfseg.check_runner",
        "sfseg.check_stages",
        "sfseg.check_report",
    ),
    ("sfseg.models", "sfseg.data", "sfseg.metrics", "sfseg.analysis", "sfseg.visualize"),
    ("sfseg.pyramid", "sfseg"),  # `sfseg` itself holds only CONFIG_DIR
)
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """0 for entry points, then 1.. for the library layers, upper to lower."""
    if module in ENTRY_POINTS:
        return 0
    owners = [
        (len(package), index)
        for index, packages in enumerate(LIBRARY_LAYERS, start=1)
        for package in packages
        if module == package or module.startswith(package + ".")
    ]
    if not owners:
        raise AssertionError(f"{module} is in no layer: add it to LIBRARY_LAYERS (and the README)")
    return max(owners)[1]  # the most specific package decides


def sfseg_imports(path: Path) -> set[str]:
    """Every sfseg module `path` imports, at the top or inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    return {name for name in imported if name == "sfseg" or name.startswith("sfseg.")}


SOURCES = sorted((SRC / "sfseg").rglob("*.py"))


def test_every_module_has_a_layer():
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_imports_run_one_way(path: Path):
    module = module_name(path)
    for target in sorted(sfseg_imports(path)):
        if layer_of(module) == 0:
            assert layer_of(target) > 0, (
                f"entry point {module} imports entry point {target}: move what they share into library code"
            )
        else:
            assert layer_of(target) >= layer_of(module), (
                f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)}), an upper layer"
            )


def test_the_layer_rules_catch_a_wrong_import():
    # The checks above must be able to fail: these are the imports they refuse.
    assert layer_of("sfseg.eval") == layer_of("sfseg.train") == 0
    assert layer_of("sfseg.pyramid") > layer_of("sfseg.models") > layer_of("sfseg.inference") > 0
    assert layer_of("sfseg.data.datasets") == layer_of("sfseg.models.heads")
    assert layer_of("sfseg.data.browse") == 0


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_functions_stay_short(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{module_name(path)}.{node.name} has {length} lines"
