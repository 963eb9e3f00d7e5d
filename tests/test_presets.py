"""Presets ship inside the package, are listed by `medistill presets`, and are found by name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medistill.cli.options import parse_settings
from medistill.configfile import read_yaml
from medistill.errors import ConfigError
from medistill.presets import PRESETS_DIR, list_presets, preset_path, resolve_config_path

REPO = Path(__file__).resolve().parents[1]


def _medistill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medistill", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_presets_are_listed_with_their_kind() -> None:
    presets = {p.name: p for p in list_presets()}
    assert {"dc", "dsa", "dm", "mtt-28-ipc1", "mtt-28-ipc10", "mtt-28-ipc50", "paper-per-dataset", "paper-simulation"} <= set(presets)
    assert presets["dc"].kind == "method settings" and presets["paper-per-dataset"].kind == "study"
    done = _medistill("presets")
    assert done.returncode == 0 and "paper-simulation-stable" in done.stdout and "mtt-28-ipc10" in done.stdout


def test_a_name_finds_a_preset_and_a_file_stays_a_file(tmp_path: Path) -> None:
    assert resolve_config_path("dc") == resolve_config_path("dc.yaml") == PRESETS_DIR / "dc.yaml"
    assert parse_settings(Path("dm"), ["iterations=5"]) == {**read_yaml(preset_path("dm")), "iterations": 5}
    own = tmp_path / "dc"
    own.write_text("iterations: 3\n")
    assert resolve_config_path(own) == own  # an existing file wins over a preset of the same name
    assert resolve_config_path("missing/dc.yaml") == Path("missing/dc.yaml")  # a path is never taken for a preset
    with pytest.raises(ConfigError, match="no file or preset named 'nope'"):
        resolve_config_path("nope")


@pytest.mark.slow
def test_an_unknown_study_preset_is_one_line() -> None:
    done = _medistill("study", "no-such-preset")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "paper-per-dataset" in done.stderr


def test_the_wheel_ships_the_presets(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("medistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"medistill/presets/{p.name}.yaml" for p in list_presets()} <= names
