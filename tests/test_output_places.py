"""Writes confined to their place: every command that writes asks `medistill.outputs` first, before any work.

A bundle and a set's folder are never written into (a set's folder only by its own job), links and `..`
are resolved first, names from configs and metadata never leave their folder, lock files are never
followed through a link, a folder's second job is refused, and a failure while writing never leaves a
half-written bundle or loses a finished set.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medistill.artifact import ARTIFACT_NAME, BUNDLE_MARKER, SyntheticSet
from medistill.errors import ConfigError, DataError, MedistillError
from medistill.outputs import (
    LOCK_NAME,
    exclusive_lock,
    inside,
    output_file,
    output_folder,
    safe_name,
    staged_folder,
)

REPO = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------------------------------------


def _noise_set(breast, method: str = "dc") -> SyntheticSet:
    """Four images of random pixels on BreastMNIST: far from every real image, so the near-copy screen passes."""
    from medistill.methods import new_set

    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return new_set(breast, images, torch.tensor([0, 0, 1, 1]), method=method, ipc=2, seed=0)


@pytest.fixture(scope="module")
def places(breast, tmp_path_factory) -> Path:
    """A folder holding a saved set (`set/`), a bundle (`bundle/`) and a plain file (`file`)."""
    from medistill.bundle import export_bundle

    root = tmp_path_factory.mktemp("places")
    _noise_set(breast).save(root / "set")
    export_bundle(_noise_set(breast), root / "bundle")
    (root / "file").write_text("mine\n")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _main(argv: list, monkeypatch, capsys) -> tuple[int, str]:
    """Run the `medistill` entry point in process; returns (exit code, stderr)."""
    from medistill.cli import main

    monkeypatch.setattr(sys, "argv", ["medistill", *map(str, argv)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medistill: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _study_config(folder: Path) -> Path:
    config = folder / "study.yaml"
    config.write_text("datasets: [breastmnist]\nmethods: [random]\nipcs: [1]\neval: {num_models: 1, epochs: 1}\n")
    return config


def _unwritable(folder: Path) -> bool:
    """Make `folder` refuse new files, also for root (the immutable attribute); False when that cannot be done."""
    folder.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        folder.chmod(0o755)
        return False
    return True


def _writable_again(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


# --- names ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", " ", ".", "..", "../x", "../../x", "a/b", "/etc/passwd", "a\\b", "a\0b", "a\nb", "\x1b[2J", 7, None])
def test_a_name_that_would_leave_its_folder_is_refused(name) -> None:
    with pytest.raises(ConfigError):
        safe_name(name, "simulation name")
    with pytest.raises(ConfigError):
        inside("/tmp/study", name)


@pytest.mark.parametrize("name", ["mix", "my-sim", "a.b", "..x", "x..", "sim@1", "ünïcode"])
def test_a_plain_name_is_kept(name) -> None:
    assert safe_name(name) == name and inside("/tmp/study", name) == Path("/tmp/study") / name


def test_a_simulation_named_with_a_path_is_refused_by_the_study_config(tmp_path) -> None:
    from medistill.study.spec import parse_study, simulation_file

    config = {"datasets": ["x"], "methods": ["random"], "simulations": {"../../x": {"datasets": ["breastmnist", "pneumoniamnist"]}}}
    with pytest.raises(ConfigError, match="simulation name"):
        parse_study(config, base=tmp_path)
    with pytest.raises(ConfigError, match="simulation name"):  # a reference read back from a study.json
        simulation_file("sim:../../x@0123", tmp_path)
    assert simulation_file("sim:mix@0123", tmp_path) == tmp_path / "simulations" / "mix-0123.npz"


def test_run_keys_and_file_names_stay_in_the_study_folder(tmp_path) -> None:
    from medistill.study.store import ResultStore

    store = ResultStore(tmp_path / "study")
    for key in ("../../x", "/abs", "a/b", ""):
        for where in (store.record_path, store.artifact_dir, store.work_dir):
            with pytest.raises(ConfigError):
                where(key)
    with pytest.raises(ConfigError):
        store.write({"key": "k1", "spec": {}, "status": "ok", "result": {}, "files": {"../../escaped.png": b"x"}})
    assert not list(tmp_path.rglob("escaped.png"))


def test_an_expert_buffer_named_by_its_dataset_stays_in_its_root(tmp_path, tiny_dataset_factory) -> None:
    from medistill.methods.experts import ExpertSettings, buffer_dir

    data = tiny_dataset_factory()
    assert buffer_dir(data, ExpertSettings(), tmp_path).parent.parent == tmp_path
    data.name = "../../outside"
    with pytest.raises(ConfigError, match="path separator"):
        buffer_dir(data, ExpertSettings(), tmp_path)


@pytest.fixture
def tiny_dataset_factory():
    """A small in-memory dataset (two classes, 8x8), for what only needs a `Dataset`."""
    import numpy as np

    from medistill.data.dataset import BINARY, DataSource, build_dataset

    def make():
        rng = np.random.default_rng(0)
        arrays = {s: (rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), np.array([0, 1, 0, 1])) for s in ("train", "val", "test")}
        return build_dataset(name="tiny", task=BINARY, label_names=["a", "b"], arrays=arrays, source=DataSource(kind="npz", name="tiny", path="-"))

    return make


# --- the place of a folder of outputs ---------------------------------------------------------------------------------


def test_a_bundle_is_refused_as_it_is_through_a_link_and_through_dots(places, tmp_path) -> None:
    before = _files(places / "bundle")
    (tmp_path / "link").symlink_to(places / "bundle")
    (tmp_path / "sub").mkdir()
    for path in (places / "bundle", tmp_path / "link", tmp_path / "sub" / ".." / "link", places / "set" / ".." / "bundle"):
        with pytest.raises(ConfigError, match="a shared bundle"):
            output_folder(path, files=("result.json",))
    for path in (places / "bundle" / "x", tmp_path / "link" / "x" / "y"):  # and anything inside one, at any depth
        with pytest.raises(ConfigError, match="inside .*a shared bundle"):
            output_folder(path)
    assert _files(places / "bundle") == before and not (places / "bundle" / "x").exists()


def test_a_sets_folder_is_refused_unless_the_command_makes_a_set_there(places, tmp_path) -> None:
    from medistill.outputs import SET_FOLDER

    (tmp_path / "link").symlink_to(places / "set")
    for path in (places / "set", tmp_path / "link"):
        with pytest.raises(ConfigError, match="a synthetic set's folder"):
            output_folder(path, files=("audit.json",))
    with pytest.raises(ConfigError, match="inside .*a synthetic set's folder"):
        output_folder(places / "set" / "audit")
    with pytest.raises(ConfigError, match="already exists"):  # its own job: refused without --force/--resume
        output_folder(places / "set", files=(ARTIFACT_NAME,), makes=SET_FOLDER)
    assert output_folder(places / "set", files=(ARTIFACT_NAME,), replace=True, makes=SET_FOLDER) == places / "set"
    assert output_folder(places / "set", into_set=True) == places / "set"  # a command that may write beside a set
    assert sorted(p.name for p in (places / "set").iterdir()) == [ARTIFACT_NAME]


def test_a_file_on_the_way_or_in_the_place_is_refused(places) -> None:
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        output_folder(places / "file")
    with pytest.raises(ConfigError, match="file, not a folder"):
        output_folder(places / "file" / "x")
    with pytest.raises(ConfigError, match="file, not a folder"):
        output_file(places / "file" / "x.json")
    with pytest.raises(ConfigError, match="is a folder; give a file path"):
        output_file(places / "set")
    assert (places / "file").read_text() == "mine\n"


def test_a_link_loop_is_one_line(tmp_path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match="cannot be resolved"):
        output_folder(tmp_path / "a" / "run")
    with pytest.raises(ConfigError):
        output_file(tmp_path / "a" / "scores.json")


def test_what_the_command_writes_must_not_exist_unless_replaced(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "grid.png").write_bytes(b"my own picture")
    (out / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match="grid.png already exists"):
        output_folder(out, files=("grid.png", "result.json"))
    assert output_folder(out, files=("grid.png", "result.json"), replace=True) == out
    with pytest.raises(ConfigError, match="not an empty folder .*notes.txt"):
        output_folder(out, files=("grid.png",), replace=True, empty=True)
    (out / "checkpoints").write_text("a file where a folder goes")
    with pytest.raises(ConfigError, match="checkpoints there is a file"):
        output_folder(out, folders=("checkpoints",), replace=True)
    assert (out / "grid.png").read_bytes() == b"my own picture"


def test_a_link_where_the_command_writes_is_refused(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(outside)
    (out / "result.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ConfigError, match="link"):
        output_folder(out, files=("result.json",), replace=True)
    with pytest.raises(ConfigError, match="link"):
        output_folder(out, folders=("checkpoints",), replace=True)
    (tmp_path / "model.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(ConfigError, match="link"):
        output_file(tmp_path / "model.pt", force=True)


def test_the_probe_leaves_no_trace_and_an_unwritable_folder_is_refused(tmp_path) -> None:
    assert output_folder(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    assert list(tmp_path.iterdir()) == []  # the folders made for the probe are gone again
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _unwritable(locked):
        pytest.skip("cannot make a folder unwritable here")
    try:
        with pytest.raises(DataError, match="cannot write to"):
            output_folder(locked)
        with pytest.raises(DataError, match="cannot write to"):
            output_folder(locked / "run")
        with pytest.raises(DataError, match="cannot write to"):
            output_file(locked / "scores.json")
    finally:
        _writable_again(locked)
    assert list(locked.iterdir()) == []


# --- locks ------------------------------------------------------------------------------------------------------------


def test_a_lock_file_that_is_a_link_is_never_followed(tmp_path) -> None:
    from medistill.study.store import exclusive_lock as study_lock

    target = tmp_path / "precious.txt"
    target.write_text("my thesis\n")
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(target)
    for lock in (exclusive_lock, study_lock):
        with pytest.raises(ConfigError, match="symbolic link"), lock(folder):
            pass
    assert target.read_text() == "my thesis\n"
    (folder / LOCK_NAME).unlink()
    os.link(target, folder / LOCK_NAME)  # a second name of a file elsewhere: emptying it would empty that file
    with pytest.raises(ConfigError, match="not a plain lock file"), exclusive_lock(folder):
        pass
    assert target.read_text() == "my thesis\n"


def test_a_second_holder_of_a_folder_lock_is_refused_and_named(tmp_path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from medistill.outputs import exclusive_lock\n"
        "with exclusive_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by a distill run .*pid {holder.pid}"), exclusive_lock(tmp_path / "run", user="a distill run"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(tmp_path / "run"):  # free again once the holder is gone
        assert (tmp_path / "run" / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")


# --- a folder assembled beside its destination --------------------------------------------------------------------------


def test_a_staged_folder_replaces_its_destination_only_when_complete(tmp_path) -> None:
    destination = tmp_path / "bundle"
    with staged_folder(destination) as staging:
        (staging / "a.txt").write_text("first")
    assert _files(destination) == {"a.txt": b"first"}
    with pytest.raises(RuntimeError), staged_folder(destination) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("the disk filled up")
    assert _files(destination) == {"a.txt": b"first"}
    with staged_folder(destination) as staging:
        (staging / "b.txt").write_text("second")
    assert _files(destination) == {"b.txt": b"second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary folder left beside it
    assert oct(destination.stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one


# --- jobs ---------------------------------------------------------------------------------------------------------------


def test_a_job_refuses_a_folder_holding_what_it_writes_before_any_work(breast, tmp_path, monkeypatch) -> None:
    from medistill import pipeline

    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: pytest.fail("the work started"))
    for name, kind in (("grid.png", "file"), ("result.json", "file"), (ARTIFACT_NAME, "file"), ("checkpoints", "folder")):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).mkdir() if kind == "folder" else (out / name).write_bytes(b"mine")
        with pytest.raises(ConfigError, match="already exists"):
            pipeline.run_job(breast, "random", 1, out_dir=out)
        assert _files(out) == ({} if kind == "folder" else {name: b"mine"})


def test_a_job_folder_in_use_by_another_job_is_refused(breast, tmp_path, monkeypatch) -> None:
    from medistill import pipeline

    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: pytest.fail("the work started"))
    with exclusive_lock(tmp_path / "run", user="the first job"):
        with pytest.raises(ConfigError, match="in use by another job"):
            pipeline.run_job(breast, "random", 1, out_dir=tmp_path / "run")


def test_a_write_failing_after_the_work_keeps_the_set_and_says_where(breast, tmp_path, monkeypatch) -> None:
    from medistill import pipeline
    from medistill.pipeline import EvalSettings

    def full_disk(self, path, max_per_class=10):
        raise DataError(f"cannot write {path}: No space left on device; nothing was replaced")

    monkeypatch.setattr(SyntheticSet, "to_png_grid", full_disk)
    out = tmp_path / "run"
    with pytest.raises(DataError) as failure:
        pipeline.run_job(breast, "random", 1, evaluation=EvalSettings(num_models=1, epochs=1), out_dir=out)
    message = str(failure.value)
    assert "No space left on device" in message and f"the set is kept in {out / ARTIFACT_NAME}" in message
    assert len(SyntheticSet.load(out / ARTIFACT_NAME)) == 2 and not (out / "result.json").exists()


# --- export -------------------------------------------------------------------------------------------------------------


def _dp_set(breast) -> SyntheticSet:
    from medistill.methods import distill

    return distill("dp-dm", breast, 1, {"iterations": 1, "epsilon": 8.0, "batch_real": 8})


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.metrics.update(test_acc_mean="high", test_acc_std=0.1, test_auc_mean=0.5, test_auc_std=0.1), "test_acc_mean"),
        (lambda s: s.metrics.update(test_acc_mean=0.5, test_acc_std=[1], test_auc_mean=0.5, test_auc_std=0.1), "test_acc_std"),
        (lambda s: s.metrics.update(eval_protocol="convnet"), "eval_protocol"),
        (lambda s: s.source.update(source="breastmnist.npz"), "source.source"),
    ],
)
def test_export_checks_every_card_field_before_writing_a_byte(breast, tmp_path, edit, needle) -> None:
    from medistill.bundle import export_bundle

    synthetic = copy.deepcopy(_noise_set(breast))
    edit(synthetic)
    path = synthetic.save(tmp_path / "set")
    with pytest.raises(DataError, match=needle):
        export_bundle(path, tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no bundle, half or whole, and no temporary folder


def test_a_private_sets_malformed_record_leaves_no_half_bundle_and_an_earlier_bundle_intact(breast, tmp_path) -> None:
    from medistill.bundle import export_bundle, load_bundle

    private = _dp_set(breast)
    earlier = export_bundle(private, tmp_path / "bundle")
    before = _files(earlier)
    for key, value in (("mechanism", None), ("sampling", 5)):
        broken = copy.deepcopy(private)
        if value is None:
            broken.extra["privacy"].pop(key)
        else:
            broken.extra["privacy"][key] = value
        with pytest.raises(DataError, match=f"privacy record has no valid '{key}'"):
            export_bundle(broken.save(tmp_path / f"broken-{key}"), tmp_path / "bundle")
        with pytest.raises(DataError, match=key):
            export_bundle(broken.save(tmp_path / f"broken-{key}"), tmp_path / "new")
    assert _files(earlier) == before and load_bundle(earlier)
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_replaces_an_earlier_bundle_whole_and_refuses_other_folders(breast, places, tmp_path) -> None:
    from medistill.bundle import export_bundle, load_bundle

    bundle = export_bundle(_noise_set(breast), tmp_path / "bundle")
    again = export_bundle(places / "set", bundle)  # an earlier bundle is replaced by a new one
    assert load_bundle(again)[0].method == "dc" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (bundle / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_bundle(places / "set", bundle)
    with pytest.raises(ConfigError, match="a synthetic set's folder"):
        export_bundle(places / "set", places / "set")
    assert (bundle / "notes.txt").read_text() == "kept"


# --- every command that writes, through the entry point -------------------------------------------------------------


def test_distill_refuses_its_place_before_loading_any_data(places, tmp_path, monkeypatch, capsys) -> None:
    missing = tmp_path / "missing.npz"  # a data error would come second: the place is refused first
    (tmp_path / "link").symlink_to(places / "bundle")
    cases = {
        places / "bundle": "a shared bundle",
        tmp_path / "link": "a shared bundle",
        places / "set": "already exists",
        places / "set" / "run": "a synthetic set's folder",
        places / "file" / "run": "file, not a folder",
    }
    for out, needle in cases.items():
        line = _one_line(*_main(["distill", missing, "-m", "random", "--out", out], monkeypatch, capsys), needle)
        assert "missing.npz" not in line


def test_distill_refuses_an_unwritable_folder_before_the_work(tmp_path, monkeypatch, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _unwritable(locked):
        pytest.skip("cannot make a folder unwritable here")
    try:
        code, err = _main(["distill", tmp_path / "missing.npz", "-m", "random", "--out", locked / "run"], monkeypatch, capsys)
    finally:
        _writable_again(locked)
    _one_line(code, err, "cannot write to --out")


def test_every_writing_command_refuses_a_bundle(places, tmp_path, monkeypatch, capsys) -> None:
    bundle, before = places / "bundle", _files(places / "bundle")
    (tmp_path / "link").symlink_to(bundle)
    link = tmp_path / "link"
    commands = [
        ["evaluate", places / "set", "--out", link / "scores.json"],
        ["audit", places / "set", "--report", link, "--no-mia", "--feature-epochs", "0"],
        ["audit", places / "set", "--report", bundle / "audit", "--no-mia", "--feature-epochs", "0"],
        ["train", bundle, "--out", bundle / "model.pt", "--epochs", "1"],
        ["train", bundle, "--out", tmp_path / "x" / ".." / "link" / "model.pt", "--epochs", "1"],
        ["simulate", "--datasets", "breastmnist,pneumoniamnist", "--out", link / "sim.npz"],
        ["privacy-audit", "breastmnist", "-m", "dm", "--out", link],
        ["dp-sgd", "breastmnist", "--epsilon", "1", "--out", link],
        ["experts", "breastmnist", "--out", link / "experts"],
        ["study", _study_config(tmp_path), "--out", link],
        ["demo", "--out", link],
        ["report", link],
        ["export", places / "set", "--out", bundle / "inner"],
    ]
    for argv in commands:
        _one_line(*_main(argv, monkeypatch, capsys), "bundle")
    assert _files(bundle) == before


def test_audit_and_train_never_write_into_a_sets_folder(places, monkeypatch, capsys) -> None:
    before = _files(places / "set")
    _one_line(*_main(["audit", places / "set", "--report", places / "set", "--no-mia"], monkeypatch, capsys), "set's folder")
    _one_line(*_main(["train", places / "bundle", "--out", places / "set" / "model.pt"], monkeypatch, capsys), "set's folder")
    _one_line(*_main(["privacy-audit", "breastmnist", "-m", "dm", "--out", places / "set"], monkeypatch, capsys), "set's folder")
    assert _files(places / "set") == before


def test_a_study_folder_must_be_new_empty_or_a_study_folder(tmp_path, monkeypatch, capsys) -> None:
    from medistill.study.store import check_study_folder

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("mine")
    _one_line(*_main(["study", _study_config(tmp_path), "--out", tmp_path / "home"], monkeypatch, capsys), "not an empty folder")
    assert check_study_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "study.json").write_text("{}")
    (tmp_path / "old" / "report.md").write_text("")
    assert check_study_folder(tmp_path / "old") == tmp_path / "old"


def test_the_study_and_simulate_refuse_a_simulation_leaving_its_folder(tmp_path, monkeypatch, capsys) -> None:
    config = tmp_path / "s.yaml"
    config.write_text('datasets: [x]\nmethods: [random]\nsimulations:\n  "../../x": {datasets: [breastmnist, pneumoniamnist]}\n')
    _one_line(*_main(["study", config, "--out", tmp_path / "deep" / "study"], monkeypatch, capsys), "simulation name")
    (tmp_path / "file").write_text("mine")
    _one_line(
        *_main(["simulate", "--datasets", "missing1.npz,missing2.npz", "--out", tmp_path / "file" / "sim.npz"], monkeypatch, capsys),
        "file, not a folder",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s.yaml"]
