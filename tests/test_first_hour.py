"""What a new user meets, through the real `medistill` executable: --version, progress in a log,
Ctrl-C, readable grids and the class-name check of `train --eval-data`."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medistill import __version__
from medistill.bundle import check_label_names, export_bundle
from medistill.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR
from medistill.data import load_dataset
from medistill.data.custom import write_npz_dataset
from medistill.errors import ConfigError, DataError
from medistill.methods import distill
from medistill.methods.checkpoint import CHECKPOINT_NAME
from medistill.pictures import MIN_TILE, ROWS_KEY
from medistill.pipeline import CHECKPOINTS_NAME
from medistill.study.runner import run_label
from medistill.study.spec import RunSpec

EXE = Path(sys.executable).parent / "medistill"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_PROGRESS_SECONDS": "0.2"}


def _run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=timeout)


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """A failed test must not leave its endless command running."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """Start a command with stdout and stderr going to a file (not a terminal), as under nohup or CI."""
    handle = log.open("w")
    # Ctrl-C as a terminal delivers it, even when these tests themselves run with SIGINT ignored (`pytest &`)
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=ENV, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _STARTED.append(process)
    return process


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the command ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("command", [[str(EXE)], [sys.executable, "-m", "medistill"]])
def test_version(command: list[str]) -> None:
    result = _run(*command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"medistill {__version__}; torch ") and "build" in result.stdout


@pytest.mark.slow
def test_a_log_gains_progress_lines_while_the_run_goes_on(tmp_path: Path, medmnist_root: Path) -> None:
    log = tmp_path / "run.log"
    process = _start([str(EXE), "distill", "breastmnist", "--method", "random", "--ipc", "10", "--out", str(tmp_path / "out"),
                      "--eval-models", "1", "--eval-epochs", "100000", "--data-root", str(medmnist_root), "--device", "cpu"], log)
    try:
        steps = re.compile(r"^medistill: evaluate convnet x1: (\d+)/100001 \(\d+%\), \S+ elapsed", re.MULTILINE)  # Epoch+1, as the reference
        _wait_for(lambda: len(steps.findall(log.read_text())) >= 2, process)
        done = [int(n) for n in steps.findall(log.read_text())]
        assert done == sorted(done) and done[-1] > done[0]  # the lines report growing progress, before the run ends
        assert "medistill: 1 torch CPU thread" in log.read_text()
    finally:
        code = _stop(process)
    assert code == EXIT_INTERRUPTED
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("medistill: interrupted. Nothing was kept") and "Start again with: medistill distill" in last


@pytest.mark.slow
def test_ctrl_c_keeps_the_checkpoint_and_the_printed_command_resumes_it(tmp_path: Path, medmnist_root: Path) -> None:
    out = tmp_path / "dm"
    checkpoint = out / CHECKPOINTS_NAME / CHECKPOINT_NAME
    args = [str(EXE), "distill", "breastmnist", "--method", "dm", "--ipc", "1", "--iterations", "100000", "--set",
            "checkpoint_every=2", "--set", "batch_real=16", "--out", str(out), "--data-root", str(medmnist_root), "--device", "cpu"]
    process = _start(args, tmp_path / "first.log")
    _wait_for(checkpoint.is_file, process)
    assert _stop(process) == EXIT_INTERRUPTED
    lines = (tmp_path / "first.log").read_text().strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith(f"medistill: interrupted. Kept: the distillation's last checkpoint in {out / CHECKPOINTS_NAME}")
    assert checkpoint.is_file()
    resume = shlex.split(lines[-1].split("Continue from it with: ", 1)[1])
    assert resume[0] == "medistill" and resume[-1] == "--resume"
    process = _start([str(EXE), *resume[1:]], tmp_path / "second.log")
    _wait_for(lambda: "dm: resuming after iteration" in (tmp_path / "second.log").read_text(), process)
    assert _stop(process) == EXIT_INTERRUPTED


@pytest.mark.slow
def test_grid_is_enlarged_and_rows_are_labelled(tmp_path: Path, medmnist_root: Path) -> None:
    out = tmp_path / "random"
    result = _run(EXE, "distill", "breastmnist", "--method", "random", "--ipc", "1", "--out", out, "--eval-models", "1",
                  "--eval-epochs", "1", "--data-root", medmnist_root, "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "(n=1)" in result.stdout and "±" not in result.stdout  # one network: no spread to show
    with Image.open(out / "grid.png") as image:
        assert json.loads(image.text[ROWS_KEY]) == ["malignant", "normal, benign"]
        width, height = image.size
        grid = np.asarray(image)
    assert height >= 2 * MIN_TILE and width >= MIN_TILE + 50  # two rows of enlarged images, plus a name column
    label_column = grid[:, : width - MIN_TILE - 8]
    for band in np.array_split(label_column, 2, axis=0):  # each row's name is drawn in dark ink on white
        assert (band < 100).sum() > 20
    for name in ("synthetic.safetensors", "grid.png", "result.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == stat.S_IMODE((out / "result.json").stat().st_mode)


@pytest.fixture(scope="module")
def bundle(breast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(distill("dm", breast, 1, {"iterations": 1, "batch_real": 8}), folder)
    return folder


def _relabelled_npz(breast, path: Path, label_names: list[str]) -> Path:
    """BreastMNIST's own images under other class names."""
    arrays = {}
    for split in ("train", "val", "test"):
        data = breast.split(split)
        pixels = (breast.denormalize(data.images)[:, 0] * 255).round().byte().numpy()
        arrays[split] = (pixels, data.labels.reshape(-1, 1).numpy().astype(np.uint8))
    return write_npz_dataset(path, arrays, task="binary-class", label_names=label_names)


@pytest.mark.slow
def test_train_refuses_eval_data_whose_classes_mean_something_else(bundle: Path, breast, tmp_path: Path) -> None:
    other = _relabelled_npz(breast, tmp_path / "breast_vs_pneumonia.npz", ["breastmnist", "pneumoniamnist"])
    common = ["--epochs", "1", "--device", "cpu", "--no-progress"]
    refused = _run(EXE, "train", bundle, "--eval-data", other, "--out", tmp_path / "a.pt", *common)
    assert refused.returncode == EXIT_USER_ERROR
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medistill: error: ") and "Traceback" not in refused.stderr
    assert "'breastmnist'" in lines[0] and "'malignant'" in lines[0] and "--ignore-label-names" in lines[0]
    assert not (tmp_path / "a.pt").exists()

    forced = _run(EXE, "train", bundle, "--eval-data", other, "--out", tmp_path / "b.pt", "--ignore-label-names", *common)
    assert forced.returncode == 0, forced.stderr
    assert "differ from the bundle's" in forced.stderr and "test ACC" in forced.stdout


def test_class_names_are_compared_loosely_and_unnamed_data_is_only_warned_about() -> None:
    said: list[str] = []
    check_label_names(["malignant", "normal, benign"], ["Malignant", "normal,  benign"], "same.npz", ignore=False, log=said.append)
    assert said == []  # case and spacing do not make another class
    check_label_names(["malignant", "normal, benign"], ["0", "1"], "plain.npz", ignore=False, log=said.append)
    assert len(said) == 1 and "plain.npz does not name its classes" in said[0] and "'malignant'" in said[0]
    with pytest.raises(ConfigError, match="'benign'.*'malignant'"):
        check_label_names(["malignant", "normal, benign"], ["benign", "malignant"], "swapped.npz", ignore=False, log=said.append)


def test_a_text_file_named_npz_is_called_what_it_is(tmp_path: Path) -> None:
    fake = tmp_path / "table.npz"
    fake.write_text("patient,label\n1,0\n")
    with pytest.raises(DataError, match="not a readable npz file: an npz is a zip archive") as info:
        load_dataset(fake)
    assert "pickle" not in str(info.value)


def test_the_study_log_names_the_full_set_instead_of_ipc_none() -> None:
    assert run_label(RunSpec(dataset="breastmnist", method="full", ipc=None, seed=0)) == "breastmnist full full set seed=0"
    assert run_label(RunSpec(dataset="breastmnist", method="dm", ipc=10, seed=1)) == "breastmnist dm ipc=10 seed=1"
