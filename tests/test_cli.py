"""The `medistill` command: datasets, distill, evaluate, demo, and one-line errors with exit code 2.

Most calls go through typer's CliRunner (fast, in process); a few run the installed
`medistill` executable and `python -m medistill` as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import medistill.demo
from medistill.artifact import SyntheticSet
from medistill.cli import app
from medistill.runtime import native_bf16
from medistill.data import FLAGS
from medistill.pipeline import EvalSettings

EXE = Path(sys.executable).parent / "medistill"
REQUIRED = ("dataset", "method", "ipc", "seed", "test_acc_mean", "test_acc_std", "test_auc_mean", "test_auc_std", "wall_seconds")
runner = CliRunner()


def _invoke(*args: str | Path):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _subprocess(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory: pytest.TempPathFactory, medmnist_root: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "breast_random"
    _invoke("distill", "breastmnist", "--method", "random", "--ipc", "10", "--out", out, "--eval-models", "2",
            "--eval-epochs", "5", "--data-root", medmnist_root, "--device", "cpu", "--no-progress")
    return out


def test_datasets_lists_all_flags_and_marks_the_cached_one(medmnist_root: Path) -> None:
    output = _invoke("datasets", "--data-root", medmnist_root).output
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]] for line in output.splitlines() if line.startswith("│")}
    assert set(rows) == set(FLAGS)
    assert rows["breastmnist"][-1].split(",")[0] == "28"
    for flag, cells in rows.items():  # the cached column reflects the files in the data root, whatever they are
        names = [f"{flag}.npz"] + [f"{flag}_{size}.npz" for size in (64, 128, 224)]
        present = [size for size, name in zip(("28", "64", "128", "224"), names) if (medmnist_root / name).exists()]
        assert cells[-1] == (",".join(present) or "-"), flag
    assert rows["breastmnist"][:4] == ["binary-class", "2", "1", "546/78/156"]
    assert rows["chestmnist"][0] == "multi-label, binary-class" and rows["retinamnist"][0] == "ordinal-regression"


def test_distill_random_writes_result_grid_and_artifact(random_run: Path) -> None:
    record = json.loads((random_run / "result.json").read_text())
    assert set(REQUIRED) <= set(record)
    assert (record["dataset"], record["method"], record["ipc"], record["seed"]) == ("breastmnist", "random", 10, 0)
    assert len(record["test_acc"]) == 2 and record["eval_protocol"]["epochs"] == 5
    assert 0.0 <= record["test_acc_mean"] <= 1.0 and 0.0 <= record["test_auc_mean"] <= 1.0 and record["wall_seconds"] > 0
    assert (random_run / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    synthetic = SyntheticSet.load(random_run / "synthetic.safetensors")
    assert len(synthetic) == 20 and synthetic.method == "random"
    assert synthetic.metrics["test_acc_mean"] == record["test_acc_mean"]


@pytest.mark.slow
def test_distill_full_writes_result(tmp_path: Path, medmnist_root: Path) -> None:
    out = tmp_path / "full"
    _invoke("distill", "breastmnist", "--method", "full", "--out", out, "--eval-models", "1", "--eval-epochs", "1",
            "--data-root", medmnist_root, "--device", "cpu", "--no-progress")
    record = json.loads((out / "result.json").read_text())
    assert set(REQUIRED) <= set(record)
    assert record["method"] == "full" and record["num_images"] == 546 and record["ipc"] is None


def test_evaluate_across_architectures(random_run: Path, medmnist_root: Path, tmp_path: Path) -> None:
    scores = tmp_path / "scores.json"
    output = _invoke("evaluate", random_run, "--models", "convnet,mlp", "--eval-models", "1", "--eval-epochs", "2",
                     "--data-root", medmnist_root, "--device", "cpu", "--no-progress", "--out", scores).output
    report = json.loads(scores.read_text())
    assert set(report) == {"convnet", "mlp"}
    for name in ("convnet", "mlp"):
        assert name in output
        assert len(report[name]["test_acc"]) == 1 and 0.0 <= report[name]["test_acc_mean"] <= 1.0
        assert report[name]["eval_protocol"]["model"] == name and report[name]["eval_protocol"]["epochs"] == 2


def test_methods_lists_the_baselines() -> None:
    output = _invoke("methods").output
    assert "random" in output and "full" in output


@pytest.mark.parametrize(("case", "needles"), [
    ("unknown_method", ("unknown method 'nosuch'", "random")),
    ("ipc_too_large", ("IPC 500", "malignant")),
    ("ipc_zero", ("--ipc 0 is outside 1..",)),
    ("unknown_model", ("nosuchnet",)),
    ("missing_artifact", ("no synthetic set", "does-not-exist")),
    ("cuda_without_gpu", ("cuda", "no CUDA GPU")),
    ("eval_epochs_zero", ("epochs must be at least 1",)),
    ("eval_models_zero", ("at least 1", "0")),
    ("unknown_eval_model", ("nosuchnet",)),
    ("out_is_a_file", ("not a folder",)),
])
def test_bad_input_is_one_line_exit_2(case, needles, random_run, medmnist_root, tmp_path, run_main, assert_one_line_error) -> None:
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    common = ["--data-root", medmnist_root, "--no-progress", "--eval-models", "1", "--eval-epochs", "1"]
    argv = {
        "unknown_method": ["distill", "breastmnist", "--method", "nosuch", "--out", out, *common],
        "ipc_too_large": ["distill", "breastmnist", "--method", "random", "--ipc", "500", "--out", out, *common],
        "ipc_zero": ["distill", "breastmnist", "--method", "random", "--ipc", "0", "--out", out, *common],
        "unknown_model": ["evaluate", random_run, "--models", "convnet,nosuchnet", *common],
        "missing_artifact": ["evaluate", tmp_path / "does-not-exist", *common],
        "cuda_without_gpu": ["distill", "breastmnist", "--method", "random", "--out", out, "--device", "cuda", *common],
        "eval_epochs_zero": ["distill", "breastmnist", "--method", "random", "--out", out, *common, "--eval-epochs", "0"],
        "eval_models_zero": ["distill", "breastmnist", "--method", "random", "--out", out, *common, "--eval-models", "0"],
        "unknown_eval_model": ["distill", "breastmnist", "--method", "random", "--out", out, *common, "--eval-model", "nosuchnet"],
        "out_is_a_file": ["distill", "breastmnist", "--method", "random", "--out", tmp_path / "taken", *common],
    }[case]
    (tmp_path / "taken").write_text("a file where the output folder should go")
    code, err = run_main(argv)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # nothing written for a refused run


@pytest.mark.slow
def test_subprocess_unknown_dataset(tmp_path: Path, assert_one_line_error) -> None:
    result = _subprocess(EXE, "distill", "nosuchmnist", "--method", "random", "--out", tmp_path / "o", "--no-progress")
    assert_one_line_error(result.returncode, result.stderr, "unknown dataset 'nosuchmnist'", "breastmnist")


@pytest.mark.slow
def test_subprocess_corrupt_data_file(tmp_path: Path, medmnist_root: Path, assert_one_line_error) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bad = root / "breastmnist.npz"
    shutil.copyfile(medmnist_root / "breastmnist.npz", bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 32] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 32])
    bad.write_bytes(bytes(data))
    result = _subprocess(EXE, "distill", "breastmnist", "--method", "random", "--out", tmp_path / "o",
                         "--data-root", root, "--no-progress")
    assert_one_line_error(result.returncode, result.stderr, "MD5", str(bad))
    assert bad.read_bytes() == bytes(data)  # reported, not replaced


@pytest.mark.slow
def test_python_dash_m_help() -> None:
    result = _subprocess(sys.executable, "-m", "medistill", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("datasets", "distill", "evaluate", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end(medmnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`medistill demo` with a tiny evaluation budget; run_demo's own return value is checked through a spy."""
    import medistill.cli.core

    monkeypatch.setattr(medistill.demo, "DEMO_EVALUATION", EvalSettings(num_models=1, epochs=2))
    monkeypatch.setattr(medistill.demo, "FULL_EVALUATION", EvalSettings(num_models=1, epochs=1))
    returned: list[list[dict]] = []

    def spy(*args, **kwargs):
        returned.append(medistill.demo.run_demo(*args, **kwargs, method_settings={"iterations": 2}))
        return returned[-1]

    monkeypatch.setattr(medistill.cli.core, "run_demo", spy)
    out = tmp_path / "demo"
    output = _invoke("demo", "--data-root", medmnist_root, "--device", "cpu", "--out", out, "--no-progress").output
    best = medistill.demo.best_distillation_method()
    expected = ["random", *([best] if best else []), "full"]
    (records,) = returned
    assert [r["method"] for r in records] == expected
    for record in records:
        epochs = 1 if record["method"] == "full" else 2
        assert record["dataset"] == "breastmnist" and record["eval_protocol"]["epochs"] == epochs and record["eval_models"] == 1
        assert 0.0 <= record["test_acc_mean"] <= 1.0
        assert (out / f"{record['method']}-seed0{'-bf16' if record['eval_protocol']['bf16'] else ''}" / "result.json").is_file()
        assert f"{record['test_acc_mean']:.3f}" in output  # the printed table shows each row's score
    assert records[0]["num_images"] == 20 and records[-1]["num_images"] == 546
    assert "expected time on this machine: about" in output  # the plan and its time are stated before the work
    assert output.index("expected time") < output.index("runs written to")
    assert "n=1" in output  # one network per set: no spread is shown

    again = _invoke("demo", "--data-root", medmnist_root, "--device", "cpu", "--out", out, "--no-progress").output
    assert again.count("finished earlier: reused") == len(expected) and "expected time" not in again
    assert [r["test_acc_mean"] for r in returned[-1]] == [r["test_acc_mean"] for r in records]
    assert all(r["reused"] for r in returned[-1])

    native = native_bf16(torch.device("cpu"))  # the demo trains in the CLI's default precision, and says which
    assert f"{'bf16' if native else 'fp32'} networks (" in output
    assert all(r["eval_protocol"]["bf16"] is native for r in records)
    assert all(r["hyperparameters"]["bf16"] is native for r in records if r["method"] == best)
    # in the other precision, the plan's first run is enough to show nothing is reused (bf16 is emulated, and slow, on a
    # CPU without it), and its plan is not timed again
    whole_plan = medistill.demo.demo_plan
    monkeypatch.setattr(medistill.demo, "demo_plan", lambda *args, **kwargs: whole_plan(*args, **kwargs)[:1])
    monkeypatch.setattr(medistill.demo, "estimate_seconds", lambda *args, **kwargs: 0.0)
    other = _invoke("demo", "--data-root", medmnist_root, "--device", "cpu", "--out", out, "--no-progress", "--fp32" if native else "--bf16").output
    assert "finished earlier: reused" not in other  # a run of the other precision is not reused
    assert all(r["eval_protocol"]["bf16"] is not native for r in returned[-1])


def test_a_bf16_setting_that_is_not_a_boolean_is_one_clear_line(medmnist_root: Path, tmp_path: Path, run_main, assert_one_line_error) -> None:
    code, err = run_main(["distill", "breastmnist", "-m", "dc", "--ipc", "1", "--out", tmp_path / "x", "--data-root", medmnist_root,
                          "--device", "cpu", "--set", "bf16=maybe", "--no-progress"])
    assert_one_line_error(code, err, "setting 'bf16' must be true or false, got 'maybe' (str)")
    assert not (tmp_path / "x").exists()
