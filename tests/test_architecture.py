"""The import graph runs one way (README, "Architecture"): entry points -> inference / module / runs ->
models, data, metrics, analysis, visualize -> pyramid. Entry points never import each other, and no
modules import each other in a loop, not even through an import inside a function."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Commands (`python -m ...`): they wire a config to library code and are imported by nothing in src. A
# command with library code of its own is a package: its `__main__` is the entry point, the rest library.
ENTRY_POINTS = {
    "sfseg.train",
    "sfseg.eval",
    "sfseg.predict",
    "sfseg.export",
    "sfseg.bench.__main__",
    "sfseg.report",
    "sfseg.ablation",
    "sfseg.data.prepare",
    "sfseg.data.validate",
    "sfseg.data.browse",
    "sfseg.gpu_check.__main__",
    "sfseg.wheelhouse",
}
# Library layers, upper to lower: a module may import its own layer and the layers below it.
LIBRARY_LAYERS = (
    (
        "sfseg.inference",
        "sfseg.module",
        "sfseg.builder",
        "sfseg.runs",
        "sfseg.callbacks",
        "sfseg.sweeps",
        "sfseg.cli",
        "sfseg.bench",
        "sfseg.gpu_check",
    ),
    ("sfseg.models", "sfseg.data", "sfseg.metrics", "sfseg.analysis", "sfseg.visualize"),
    ("sfseg.pyramid", "sfseg"),  # `sfseg` itself holds only CONFIG_DIR
)
MAX_FUNCTION_LINES = 60


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """0 for entry points, then 1.. for the library layers, upper to lower; None for no layer."""
    if module in ENTRY_POINTS:
        return 0
    owners = [
        (len(package), index)
        for index, packages in enumerate(LIBRARY_LAYERS, start=1)
        for package in packages
        # `sfseg` is the package itself, not a catch-all for its modules
        if module == package or (package != "sfseg" and module.startswith(package + "."))
    ]
    return max(owners)[1] if owners else None  # the most specific package decides


def sfseg_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Every sfseg module `path` (module `module`) imports, at the top or inside a function, absolute
    or relative. `from package import name` imports package.name where that is one of `modules`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # from x import y, from .x import y, from .. import y
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            names = {f"{source}.{alias.name}" for alias in node.names}
            imported.update(names & modules or {source})
    return {name for name in imported if name == "sfseg" or name.startswith("sfseg.")}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module of the sfseg package under `root` -> the sfseg modules it imports."""
    paths = {module_name(path, root): path for path in sorted((root / "sfseg").rglob("*.py"))}
    return {module: sfseg_imports(path, module, set(paths)) for module, path in paths.items()}


def import_violations(root: Path) -> list[str]:
    """What breaks the layer rules in the sfseg package under `root`: a module in no layer, an import of
    an upper layer, an entry point importing another one."""
    problems = []
    for module, imported in import_graph(root).items():
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module} is in no layer: add it to LIBRARY_LAYERS (and the README)")
            continue
        for target in sorted(imported):
            target_layer = layer_of(target)
            if layer == 0 and target_layer == 0:
                problems.append(
                    f"entry point {module} imports entry point {target}: move what they share into library code"
                )
            elif layer > 0 and target_layer is not None and target_layer < layer:
                problems.append(
                    f"{module} (layer {layer}) imports {target} (layer {target_layer}), an upper layer"
                )
    return problems


def import_cycle(root: Path) -> list[str]:
    """Modules of the sfseg package under `root` that import each other in a loop, lazy imports included,
    as [a, b, ..., a] where a imports b; [] when there is none."""
    graph = import_graph(root)
    try:
        TopologicalSorter({module: imported & set(graph) for module, imported in graph.items()}).prepare()
    except CycleError as error:
        return error.args[1][::-1]  # graphlib lists a loop against the direction of its imports
    return []


SOURCES = sorted((SRC / "sfseg").rglob("*.py"))


def test_imports_run_one_way():
    assert import_violations(SRC) == []


def test_no_modules_import_each_other_in_a_loop():
    assert import_cycle(SRC) == []


def write_tree(root: Path, modules: dict[str, str]) -> Path:
    """A package tree under root: module name -> source (a name with modules under it is a package)."""
    for name, source in modules.items():
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        if any(other.startswith(name + ".") for other in modules):
            path = root.joinpath(*name.split("."), "__init__.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


LAWFUL_TREE = {
    "sfseg": "CONFIG_DIR = 'conf'\n",
    "sfseg.pyramid": "import torch\n",
    "sfseg.models": "from sfseg.models.heads import Head\n",
    "sfseg.models.heads": "from sfseg.pyramid import fuse\nfrom . import layers\n",
    "sfseg.models.layers": "import sfseg.pyramid\n",
    "sfseg.inference": "from sfseg.models import heads\n",
    "sfseg.module": "from sfseg.inference import Predictor\nfrom sfseg import CONFIG_DIR\n",
    "sfseg.train": "from sfseg.module import Module\n",
    "sfseg.eval": "from sfseg.inference import Predictor\n",
    # a command that is a package: its __main__ the entry point, the rest library code
    "sfseg.bench": '"""The benchmark."""\n',
    "sfseg.bench.__main__": "from sfseg.bench import table5\nfrom sfseg.bench.harness import median\n",
    "sfseg.bench.table5": "from sfseg.bench.harness import median\nfrom sfseg.inference import Predictor\n",
    "sfseg.bench.harness": "from sfseg.models import heads\n",
}


def test_a_lawful_tree_passes(tmp_path: Path):
    root = write_tree(tmp_path, LAWFUL_TREE)
    assert import_violations(root) == [] and import_cycle(root) == []
    # `from package import module` is an import of the module
    assert import_graph(root)["sfseg.bench.__main__"] == {"sfseg.bench.table5", "sfseg.bench.harness"}


@pytest.mark.parametrize(
    ("module", "source", "problem"),
    [
        # the pyramid math imports a model: an upper layer
        ("sfseg.pyramid", "from sfseg.models.heads import Head\n", "sfseg.pyramid (layer 3) imports sfseg.models.heads (layer 2), an upper layer"),
        # a model imports inference, inside a function
        ("sfseg.models.heads", "def build():\n    import sfseg.inference\n", "sfseg.models.heads (layer 2) imports sfseg.inference (layer 1), an upper layer"),
        # a relative import of an upper layer
        ("sfseg.models.layers", "from ..module import Module\n", "sfseg.models.layers (layer 2) imports sfseg.module (layer 1), an upper layer"),
        # library code imports an entry point
        ("sfseg.inference", "from sfseg.eval import main\n", "sfseg.inference (layer 1) imports sfseg.eval (layer 0), an upper layer"),
        # one entry point imports another
        ("sfseg.eval", "from sfseg.train import main\n", "entry point sfseg.eval imports entry point sfseg.train"),
        ("sfseg.train", "import sfseg.data.browse\n", "entry point sfseg.train imports entry point sfseg.data.browse"),
        # a module the layers do not know
        ("sfseg.helpers", "import torch\n", "sfseg.helpers is in no layer"),
        # library code of a command's package imports its entry point
        ("sfseg.bench.harness", "from sfseg.bench import __main__\n", "sfseg.bench.harness (layer 1) imports sfseg.bench.__main__ (layer 0), an upper layer"),
        # another command's entry point imports it
        ("sfseg.eval", "def main():\n    from sfseg.bench.__main__ import main\n", "entry point sfseg.eval imports entry point sfseg.bench.__main__"),
    ],
)  # fmt: skip
def test_the_checker_reports_a_wrong_import(module: str, source: str, problem: str, tmp_path: Path):
    root = write_tree(tmp_path, {**LAWFUL_TREE, module: source})
    problems = import_violations(root)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize(
    ("modules", "cycle"),
    [
        # two modules of one layer, one of them through an import inside a function (gpu_check's old loop)
        (
            {
                "sfseg.module": "from sfseg.inference import Predictor\n",
                "sfseg.inference": "def load():\n    from sfseg.module import Module\n",
            },
            ["sfseg.inference", "sfseg.module", "sfseg.inference"],
        ),
        # a package's library modules, through `from package import module` and a relative import
        (
            {
                "sfseg.bench.table5": "from sfseg.bench import harness\n",
                "sfseg.bench.harness": "def run():\n    from .table5 import rows\n",
            },
            ["sfseg.bench.harness", "sfseg.bench.table5", "sfseg.bench.harness"],
        ),
        # three modules, a package's face among them
        (
            {
                "sfseg.models": "from sfseg.models.heads import Head\n",
                "sfseg.models.heads": "import sfseg.models.layers\n",
                "sfseg.models.layers": "from sfseg.models import Head\n",
            },
            ["sfseg.models", "sfseg.models.heads", "sfseg.models.layers", "sfseg.models"],
        ),
    ],
)
def test_the_checker_reports_an_import_cycle(modules: dict[str, str], cycle: list[str], tmp_path: Path):
    root = write_tree(tmp_path, {**LAWFUL_TREE, **modules})
    assert import_violations(root) == []  # within the layers: only the loop is wrong
    found = import_cycle(root)
    # the loop from any of its modules, in its direction
    assert found[0] == found[-1] and sorted(found[:-1]) == sorted(cycle[:-1]), found
    start = cycle.index(found[0])
    assert found == cycle[start:-1] + cycle[: start + 1], found


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_functions_stay_short(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{module_name(path)}.{node.name} has {length} lines"
