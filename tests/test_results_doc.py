"""docs/RESULTS.md is a short summary whose tables come from results/*.json, and the docs name no issue numbers."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS_DOC = DOCS / "RESULTS.md"
RESULTS_DIR = REPO / "results"
ISSUE_IN_TEXT = re.compile(r"\bissue\s*#?\d+", re.IGNORECASE)
ISSUE_IN_NAME = re.compile(r"issue[\s_-]*#?\d+|#\d+", re.IGNORECASE)
HASH_NUMBER = re.compile(r"#\d+")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def load_benchmark(name: str) -> ModuleType:
    """A module of benchmarks/ loaded from its file (the benchmarks are scripts, not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def headings(markdown: Path) -> list[str]:
    """The Markdown headings of a file, leaving out lines of fenced code blocks (shell comments start with #)."""
    found, in_code = [], False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6}\s", line):
            found.append(line)
    return found


def test_results_doc_tables_match_the_results_files() -> None:
    summary = load_benchmark("results_summary")
    assert summary.check(RESULTS_DOC, RESULTS_DIR) is None


def test_every_table_reads_an_existing_results_file_and_appears_in_the_doc() -> None:
    summary = load_benchmark("results_summary")
    text = RESULTS_DOC.read_text()
    for name, table in summary.TABLES.items():
        assert (RESULTS_DIR / f"{table.source}.json").exists(), name
        assert f"<!-- table: {name} -->" in text, name


def test_results_doc_is_a_short_summary() -> None:
    assert len(RESULTS_DOC.read_text().splitlines()) <= 250


@pytest.mark.parametrize("markdown", sorted([*DOCS.glob("*.md"), *DOCS.glob("notebook/*.md")]), ids=lambda p: p.name)
def test_no_heading_names_an_issue(markdown: Path) -> None:
    offending = [h for h in headings(markdown) if ISSUE_IN_TEXT.search(h) or HASH_NUMBER.search(h)]
    assert offending == []


def test_no_file_name_names_an_issue() -> None:
    names = [
        p.relative_to(REPO)
        for folder in ("docs", "results", "benchmarks")
        for p in (REPO / folder).rglob("*")
        if "__pycache__" not in p.parts
    ]
    assert [str(name) for name in names if ISSUE_IN_NAME.search(name.name)] == []


@pytest.mark.parametrize("path", sorted(RESULTS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_results_file_says_where_it_came_from(path: Path) -> None:
    provenance = json.loads(path.read_text()).get("provenance")
    assert isinstance(provenance, dict), "no provenance block"
    for key in ("command", "hardware", "date"):
        assert provenance.get(key), f"provenance lacks {key}"


def test_every_local_link_in_the_results_doc_resolves() -> None:
    targets = [t for t in LINK.findall(RESULTS_DOC.read_text()) if not re.match(r"[a-z]+:|#", t)]
    assert targets, "the summary links to its results files and the notebook"
    missing = [t for t in targets if not (RESULTS_DOC.parent / t.split("#", 1)[0]).exists()]
    assert missing == []


def test_check_reports_the_first_table_that_differs(tmp_path: Path) -> None:
    summary = load_benchmark("results_summary")
    document, results = tmp_path / "docs" / "RESULTS.md", tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    document.parent.mkdir()
    document.write_text(RESULTS_DOC.read_text().replace("0.717 ± 0.034", "0.999 ± 0.034", 1))
    difference = summary.check(document, results)
    assert difference is not None and difference.startswith("table 'distillation_vs_random' differs")
    assert summary.main(["--check", "--document", str(document), "--results", str(results)]) == 1
    assert summary.main(["--document", str(document), "--results", str(results)]) == 0
    assert document.read_text() == RESULTS_DOC.read_text()


def test_write_result_adds_provenance_and_replaces_the_file_whole(tmp_path: Path) -> None:
    record = load_benchmark("record")
    target = record.write_result("example", {"rows": [1, 2]}, path=tmp_path / "example.json", command="python benchmarks/x.py")
    written = json.loads(target.read_text())
    assert written["rows"] == [1, 2]
    assert written["provenance"]["command"] == "python benchmarks/x.py"
    assert {"commit", "dirty", "hardware", "date"} <= written["provenance"].keys()
    assert written["provenance"]["hardware"]["cpu_count"] >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["example.json"]  # no temporary file left behind
