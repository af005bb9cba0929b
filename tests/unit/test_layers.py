"""The runtime's import graph: each sub-package imports only its own layer or those below it,
there are no import cycles, and no module grows past the size a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "runtime" / "cellsam_rt"

# Lower rank = lower layer. Data flows read -> stages -> pipeline -> workflows; the faces (cli,
# napari) sit on top and nothing imports them.
RANKS = {
    "cellsam_rt": 0, "cellsam_rt.errors": 0, "cellsam_rt.config": 0,
    "cellsam_rt.io": 1,
    "cellsam_rt.model_dir": 2, "cellsam_rt.kernels": 2,
    "cellsam_rt.backends": 3,
    "cellsam_rt.stages": 4,
    "cellsam_rt.pipeline": 5,
    "cellsam_rt.workflows": 6,
    "cellsam_rt.tools": 7,
    "cellsam_rt.cli": 8, "cellsam_rt.napari": 8,
}
MAX_LINES = 450


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layer: add its package to RANKS")


def _imports(path: Path) -> set[str]:
    """cellsam_rt modules that `path` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cellsam_rt"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "cellsam_rt":
                found.add(module)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = RANKS[_layer(module)]
    for target in _imports(MODULES[module]):
        assert RANKS[_layer(target)] <= mine, (
            f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")


def test_no_import_cycles():
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_runtime_never_imports_torch_or_the_export_side():
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"torch", "cellsam_export", "cellsam_train"}, \
                    f"{module} imports {name}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{module}: {n} lines (keep modules to one concept, <= {MAX_LINES})"
