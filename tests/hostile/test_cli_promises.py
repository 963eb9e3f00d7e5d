"""Hostile and careless inputs on the `medistill` command, one test per promise.

The cases live in scripts/hostile_inputs.py (which prints the table in docs/notebook/hardening.md). Each
promise's test runs representative cases through the real executable (`python -m medistill` in a
subprocess) and checks the exit code, the single stderr line, that no file that existed before
changed, and the case's own check (no code ran, nothing was written). Every other case runs in
this process through `medistill.cli.main`, the same code without an interpreter start-up per case.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "scripts" / "hostile_inputs.py")
hostile = importlib.util.module_from_spec(_spec)
sys.modules["hostile_inputs"] = hostile
_spec.loader.exec_module(hostile)

THROUGH_THE_EXECUTABLE = {
    "no code from files": ["pickle payload as the checkpoint of `distill --resume`"],
    "export gate": ["random subset relabelled `dc` in its header"],
    "audit never writes into a bundle": ["`audit BUNDLE --report BUNDLE/audit`"],
    "memory bombs": ["one label value of 2^40 in an own npz"],
    "atomic, non-clobbering outputs": ["disk full while `distill` writes its outputs"],
    "one runner per study": ["a second runner on a study folder in use", "a study whose runs fail"],
    "one line for every bad input": ["YAML alias bomb (billion laughs) as a study config"],
    "downloads": ["a link out of an image folder"],
}
NEEDS_A_PROCESS = [c for c in hostile.CASES if c.max_file_bytes is not None or c.topic == "one runner per study" or c.executable]
EXECUTABLE = [c for c in hostile.CASES if c.executable]
IN_PROCESS = [c for c in hostile.CASES if c not in NEEDS_A_PROCESS
              and c.name not in {name for names in THROUGH_THE_EXECUTABLE.values() for name in names}]


def through_the_executable(topic: str, tmp_path: Path) -> None:
    chosen = [c for c in hostile.CASES if c.topic == topic and c.name in THROUGH_THE_EXECUTABLE[topic]]
    assert len(chosen) == len(THROUGH_THE_EXECUTABLE[topic]), "a listed case does not exist"
    rows = [hostile.run_case(c, tmp_path / f"case{i}") for i, c in enumerate(chosen)]
    failures = [f"{r['input']}: {'; '.join(r['problems'])} (stderr: {r['stderr']})" for r in rows if not r["ok"]]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_no_code_runs_from_a_planted_checkpoint(tmp_path, medmnist_root) -> None:
    through_the_executable("no code from files", tmp_path)


@pytest.mark.slow
def test_export_screens_the_set_itself_whatever_its_metadata_says(tmp_path, medmnist_root) -> None:
    through_the_executable("export gate", tmp_path)


@pytest.mark.slow
def test_audit_never_writes_into_a_bundle(tmp_path, medmnist_root) -> None:
    through_the_executable("audit never writes into a bundle", tmp_path)


@pytest.mark.slow
def test_memory_bombs_are_refused_before_allocating(tmp_path, medmnist_root) -> None:
    through_the_executable("memory bombs", tmp_path)


@pytest.mark.slow
def test_outputs_are_atomic_and_never_clobber(tmp_path, medmnist_root) -> None:
    through_the_executable("atomic, non-clobbering outputs", tmp_path)


@pytest.mark.slow
def test_one_runner_per_study_folder_and_failed_runs_exit_non_zero(tmp_path, medmnist_root) -> None:
    through_the_executable("one runner per study", tmp_path)


@pytest.mark.slow
def test_bad_inputs_get_one_line_through_the_executable(tmp_path, medmnist_root) -> None:
    through_the_executable("one line for every bad input", tmp_path)


@pytest.mark.slow
def test_downloads_never_follow_links_out_of_an_image_folder(tmp_path, medmnist_root) -> None:
    through_the_executable("downloads", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("item", EXECUTABLE, ids=[c.name for c in EXECUTABLE])
def test_case_through_the_executable(item, tmp_path, medmnist_root) -> None:
    row = hostile.run_case(item, tmp_path / "case")
    assert row["ok"], f"{'; '.join(row['problems'])} (stderr: {row['stderr']})"


@pytest.mark.parametrize("item", IN_PROCESS, ids=[c.name for c in IN_PROCESS])
def test_every_other_case_keeps_its_promise(item, tmp_path, medmnist_root, monkeypatch, capsys) -> None:
    from medistill.cli import main

    folder = tmp_path / "case"
    folder.mkdir()
    args = item.prepare(folder)
    before = hostile.snapshot(folder)
    for name, value in item.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["medistill", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    done = subprocess.CompletedProcess(args, exited.value.code or 0, out, err)
    problems, _ = hostile.judge(item, folder, before, done)
    assert not problems, f"{'; '.join(problems)} (stderr: {err.strip()})"
