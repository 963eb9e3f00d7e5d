"""The package's layers: a module imports only from its own layer or the layers below it (docs/ARCHITECTURE.md).

Every import is counted, also one inside a function or under `TYPE_CHECKING`: a lower layer that reaches
up "only when called" still depends on the higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medistill"

# Lowest first. A unit is a top-level module or a subpackage of medistill ("__init__" is the package's version).
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"__init__", "errors", "registry", "atomic", "configfile", "markdown", "progress", "runtime",
                    "transfer", "microbatch", "scoretext", "presets"}),
    ("inputs", {"data", "models", "augment", "zca", "pictures"}),
    ("training and sets", {"train", "artifact", "outputs"}),
    ("privacy mechanism", {"dp"}),
    ("methods", {"methods"}),
    ("jobs and audits", {"pipeline", "audit"}),
    ("sharing, studies, demo", {"bundle", "study", "demo"}),
    ("interface", {"cli", "__main__"}),
]
LAYER_OF = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
# Modules of one package that must not import each other: the two trainers share `train.protocol` instead.
INDEPENDENT = [("medistill.train.engine", "medistill.train.stacked")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> set[str]:
    """Every medistill module `path` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "medistill")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "medistill":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from medistill.train import engine`
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add(f"relative import in {path.name}")
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_layer() -> None:
    assert {unit_of(module) for module in MODULES} == set(LAYER_OF)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_never_imports_a_higher_layer(module: str) -> None:
    source = LAYER_OF[unit_of(module)]
    imports = imported_modules(MODULES[module])
    assert not [name for name in imports if name.startswith("relative import")], "use absolute imports"
    upward = sorted(name for name in imports if name in MODULES and LAYER_OF[unit_of(name)] > source)
    assert not upward, f"{module} ({LAYERS[source][0]}) imports {upward} from a higher layer"


def test_the_units_form_no_cycle() -> None:
    """Within a layer units may import each other, but never both ways round, directly or through others."""
    graph = {unit: set() for unit in LAYER_OF}
    for module, path in MODULES.items():
        graph[unit_of(module)].update(unit_of(name) for name in imported_modules(path) if name in MODULES)
    for unit in graph:
        graph[unit].discard(unit)
    done: set[str] = set()

    def visit(unit: str, trail: tuple[str, ...]) -> None:
        assert unit not in trail, f"import cycle: {' -> '.join((*trail, unit))}"
        if unit in done:
            return
        for target in sorted(graph[unit]):
            visit(target, (*trail, unit))
        done.add(unit)

    for unit in sorted(graph):
        visit(unit, ())


@pytest.mark.parametrize(("a", "b"), INDEPENDENT)
def test_independent_modules_do_not_import_each_other(a: str, b: str) -> None:
    assert b not in imported_modules(MODULES[a]) and a not in imported_modules(MODULES[b])


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a foundation module that imports the job runner is reported."""
    fake = tmp_path / "medistill" / "errors.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from medistill.pipeline import run_job\n")
    imports = imported_modules(fake)
    assert "medistill.pipeline" in imports and LAYER_OF[unit_of("medistill.pipeline")] > LAYER_OF["errors"]
