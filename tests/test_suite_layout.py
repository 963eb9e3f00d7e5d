"""The test suite's own layout: no test file imports another test module or the digest script.

Shared helpers live in tests/conftest.py as fixtures; a test module that imports `test_other` runs that
module's import-time code, ties two files together, and breaks when one is renamed or run alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FORBIDDEN = "result_digest", "conftest"  # besides any test_* module; conftest is pytest's to load, never to import


def forbidden_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) for each import, anywhere in the file, of a test_* module, result_digest or conftest."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            modules = [base] if base else []
            if node.level or not base:  # `from . import test_x`, `from .pkg import test_x`: the names are modules too
                modules += [f"{base}.{alias.name}".lstrip(".") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in ("__import__", "import_module"))):
            modules = [node.args[0].value]
        else:
            continue
        bad = [m for m in modules if any(part.startswith("test_") or part in FORBIDDEN for part in m.split("."))]
        if bad:
            found.append((node.lineno, bad[0]))
    return found


def test_no_test_file_imports_a_test_module_or_the_digest_script() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 30 and TESTS / "conftest.py" in files
    offenders = [f"{path.relative_to(TESTS)}:{line}: imports {module}"
                 for path in files for line, module in forbidden_imports(path.read_text(encoding="utf-8"))]
    assert offenders == [], "\n".join(offenders)


def test_the_check_sees_every_spelling_of_such_an_import() -> None:
    bad = {
        "from result_digest import without_seconds": "result_digest",
        "import test_dm": "test_dm",
        "def f():\n    from test_cli import _run_main": "test_cli",
        "from . import test_dm": "test_dm",
        "from .test_dm import tiny_dataset": "test_dm",
        "from tests.test_dm import tiny_dataset": "tests.test_dm",
        "from conftest import MEDMNIST_ROOT": "conftest",
        "import importlib\nimportlib.import_module('test_dm')": "test_dm",
    }
    for source, module in bad.items():
        assert [m for _, m in forbidden_imports(source)] == [module], source
    fine = "import pytest\nfrom medistill.methods import distill\nfrom medistill.study import testing_grid\nimport contest"
    assert forbidden_imports(fine) == []
