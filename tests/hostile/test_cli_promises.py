"""Hostile and careless inputs through the real executable (`python -m medistill` in a subprocess).

The cases live in scripts/hostile_inputs.py (which prints the table in docs/RESULTS.md); each test
here runs the cases of one promise and checks the exit code, the single stderr line, that no file
that existed before changed, and the case's own check. Inputs that only need the one-line error
path run in this process through `medistill.cli.main` (the same code, no interpreter start-up).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "scripts" / "hostile_inputs.py")
hostile = importlib.util.module_from_spec(_spec)
sys.modules["hostile_inputs"] = hostile
_spec.loader.exec_module(hostile)


def cases(topic: str, *names: str) -> list:
    chosen = [c for c in hostile.CASES if c.topic == topic and (not names or c.name in names)]
    assert chosen and (not names or len(chosen) == len(names)), f"unknown case(s) in {topic}: {names}"
    return chosen


def check_through_the_executable(topic: str, tmp_path: Path, *names: str) -> None:
    rows = [hostile.run_case(c, tmp_path / f"case{i}") for i, c in enumerate(cases(topic, *names))]
    failures = [f"{r['input']}: {'; '.join(r['problems'])} (stderr: {r['stderr']})" for r in rows if not r["ok"]]
    assert not failures, "\n".join(failures)


def test_no_code_runs_from_a_planted_checkpoint(tmp_path, medmnist_root) -> None:
    check_through_the_executable("no code from files", tmp_path)


def test_export_screens_the_set_itself_whatever_its_metadata_says(tmp_path, medmnist_root) -> None:
    check_through_the_executable("export gate", tmp_path)


def test_audit_never_writes_into_a_bundle(tmp_path, medmnist_root) -> None:
    check_through_the_executable("audit never writes into a bundle", tmp_path)


def test_memory_bombs_are_refused_before_allocating(tmp_path, medmnist_root) -> None:
    check_through_the_executable("memory bombs", tmp_path)


def test_outputs_are_atomic_and_never_clobber(tmp_path, medmnist_root) -> None:
    check_through_the_executable("atomic, non-clobbering outputs", tmp_path, "`distill --out BUNDLE` (a bundle as job folder)",
                                 "`train --out` into a bundle's own artifact", "disk full while `distill` writes its outputs")


def test_one_runner_per_study_folder_and_failed_runs_exit_non_zero(tmp_path, medmnist_root) -> None:
    check_through_the_executable("one runner per study", tmp_path)


def test_bad_inputs_get_one_line_through_the_executable(tmp_path, medmnist_root) -> None:
    check_through_the_executable("one line for every bad input", tmp_path, "1-D image array", "a truncated PNG in an image folder",
                                 "bundle card with `lr: NaN`", "YAML alias bomb (billion laughs) as a study config")


ONE_LINE = [c for c in hostile.CASES if c.topic in ("one line for every bad input", "atomic, non-clobbering outputs")
            and c.max_file_bytes is None and c.exit_code == 2]


@pytest.mark.parametrize("item", ONE_LINE, ids=[c.name for c in ONE_LINE])
def test_every_bad_input_is_one_line_and_exit_2(item, tmp_path, medmnist_root, monkeypatch, capsys) -> None:
    from medistill.cli import main

    folder = tmp_path / "case"
    folder.mkdir()
    args = item.prepare(folder)
    before = hostile.snapshot(folder)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["medistill", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("medistill: error: "), err
    after = hostile.snapshot(folder)
    assert all(after.get(name) == digest for name, digest in before.items()), "a file that existed before changed"


def test_downloads_never_follow_metadata_or_links_out(tmp_path, medmnist_root) -> None:
    check_through_the_executable("downloads", tmp_path)
    # an artifact whose source names another MedMNIST file with a forged MD5: refused, nothing downloaded
    check_through_the_executable("one line for every bad input", tmp_path / "source",
                                 "`evaluate` an artifact whose `source` names another file")


def test_numbers_in_settings_parse_as_users_type_them(tmp_path, medmnist_root) -> None:
    check_through_the_executable("values as users type them", tmp_path)
