"""Bounded before allocation: only regular files inside the folder named are read, every npz member counts against
the byte limit, image sizes, IPCs and seeds are bounded (by the memory they need, with one line stating the bound),
and a checkpoint that does not fit its run is refused and left unused."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medistill.data import load_dataset, load_image_folder, load_npz_dataset
from medistill.data import medmnist as medmnist_module
from medistill.data.dataset import (
    MAX_IMAGE_SIZE,
    MEMORY_ENV,
    MIN_IMAGE_SIZE,
    DataSource,
    build_dataset,
    check_dataset_memory,
    check_image_size,
    memory_bound,
)
from medistill.data.download import md5sum
from medistill.data.files import is_folder, open_regular, regular_file
from medistill.data.medmnist import MAX_BYTES_ENV, MAX_NPZ_MEMBERS, read_npz
from medistill.data.source import load_recorded_source
from medistill.errors import ConfigError, DataError
from medistill.methods import RunContext
from medistill.methods.base import check_ipc
from medistill.methods.checkpoint import Checkpoint, Expected, read_state, state_problem
from medistill.runtime import MAX_SEED, check_seed, seed_everything

# --- helpers --------------------------------------------------------------------------------------


def finishes(fn, seconds: float = 20.0):
    """Run `fn` in a thread; fail (instead of hanging the suite) when it has not returned within `seconds`."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a FIFO was opened?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def image_folder(root: Path, per_class: int = 4, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def tiny_arrays(size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (8, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([0, 1] * 4, dtype=np.uint8).reshape(-1, 1)
    return arrays


# --- regular files only, inside the folder named -------------------------------------------------


def test_a_fifo_is_refused_without_being_opened(tmp_path) -> None:
    os.mkfifo(tmp_path / "x.png")
    for read in (regular_file, open_regular, md5sum):
        with pytest.raises(DataError, match=r"FIFO \(named pipe\), not a regular file"):
            finishes(lambda read=read: read(tmp_path / "x.png"))


def test_a_fifo_in_an_image_folder_or_as_an_npz_is_one_line(tmp_path) -> None:
    root = image_folder(tmp_path / "images")
    os.mkfifo(root / "a" / "x.png")
    with pytest.raises(DataError, match="FIFO"):
        finishes(lambda: load_image_folder(root))
    os.mkfifo(tmp_path / "own.npz")
    with pytest.raises(DataError, match="FIFO"):
        finishes(lambda: load_npz_dataset(tmp_path / "own.npz"))


def test_sockets_devices_and_folders_are_not_regular_files(tmp_path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.png"))
        with pytest.raises(DataError, match="socket"):
            regular_file(tmp_path / "s.png")
    with pytest.raises(DataError, match="character device"):
        regular_file("/dev/null")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(DataError, match="folder, not a regular file"):
        regular_file(tmp_path / "d.png")


def test_link_loops_and_dangling_links_are_one_line(tmp_path) -> None:
    (tmp_path / "x.png").symlink_to("y.png")
    (tmp_path / "y.png").symlink_to("x.png")
    with pytest.raises(DataError, match="symbolic-link loop"):
        regular_file(tmp_path / "x.png")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    with pytest.raises(DataError, match="link to a missing file"):
        regular_file(tmp_path / "gone.png")
    with pytest.raises(DataError, match="does not exist"):
        regular_file(tmp_path / "absent.png")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(DataError, match="symbolic-link loop"):
        is_folder(tmp_path / "loop")
    assert not is_folder(tmp_path / "absent")


def test_a_loop_named_like_an_image_in_a_folder_is_refused(tmp_path) -> None:
    root = image_folder(tmp_path / "images")
    (root / "a" / "x.png").symlink_to("y.png")
    (root / "a" / "y.png").symlink_to("x.png")
    with pytest.raises(DataError, match="symbolic-link loop"):
        load_image_folder(root)


@pytest.mark.parametrize("level", ["file", "class folder", "train/"])
def test_links_leading_outside_the_image_folder_are_refused_at_any_level(tmp_path, level) -> None:
    elsewhere = image_folder(tmp_path / "elsewhere")
    if level == "train/":
        root = tmp_path / "split"
        for split in ("val", "test"):
            image_folder(root / split, per_class=2)
        (root / "train").symlink_to(elsewhere)
    else:
        root = image_folder(tmp_path / "images")
        if level == "file":
            (root / "a" / "9.png").symlink_to(elsewhere / "a" / "0.png")
        else:
            (root / "c").symlink_to(elsewhere / "a")
    with pytest.raises(DataError, match="outside the image folder"):
        load_image_folder(root)


def test_links_that_stay_inside_the_folder_are_read(tmp_path) -> None:
    root = image_folder(tmp_path / "images")
    (root / "a" / "9.png").symlink_to(root / "b" / "0.png")
    data = load_image_folder(root)
    assert len(data.train) + len(data.val) + len(data.test) == 9


def test_an_image_folder_reached_through_a_link_is_read(tmp_path) -> None:
    image_folder(tmp_path / "images")
    (tmp_path / "alias").symlink_to(tmp_path / "images")
    assert load_image_folder(tmp_path / "alias").num_classes == 2


# --- every npz member counts ------------------------------------------------------------------------


def test_a_non_array_member_counts_against_the_limit(tmp_path, monkeypatch) -> None:
    path = tmp_path / "member.npz"
    np.savez(path, **tiny_arrays())
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("notes.bin", bytes(8 << 20))
    monkeypatch.setenv(MAX_BYTES_ENV, str(4 << 20))
    with pytest.raises(DataError, match=r"declares 0\.01 GiB in its members"):
        load_npz_dataset(path)
    monkeypatch.setenv(MAX_BYTES_ENV, str(16 << 20))
    data = load_npz_dataset(path)  # under the limit it loads; the member is counted, never inflated or returned
    assert data.num_classes == 2
    assert "notes.bin" not in read_npz(path, 16 << 20)


def test_bytes_actually_inflated_count_when_headers_understate_them(tmp_path, monkeypatch) -> None:
    path = tmp_path / "arrays.npz"
    np.savez(path, **tiny_arrays(size=64))
    monkeypatch.setattr(medmnist_module, "_declared", lambda archive, info: 0)  # headers that claim nothing
    with pytest.raises(DataError, match="inflates to more than the limit"):
        read_npz(path, 20_000)
    assert set(read_npz(path, 1 << 20)) == set(tiny_arrays())


def test_member_count_and_nested_or_object_dtypes_are_bounded(tmp_path) -> None:
    many = tmp_path / "many.npz"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(MAX_NPZ_MEMBERS + 1):
            archive.writestr(f"m{i}.bin", b"")
    with pytest.raises(DataError, match=f"at most {MAX_NPZ_MEMBERS}"):
        read_npz(many, 1 << 20)
    nested = tmp_path / "nested.npz"
    np.savez(nested, x=np.zeros(2, np.dtype([("a", [("b", "u1")])])))
    with pytest.raises(DataError, match="only arrays of numbers or strings"):
        read_npz(nested, 1 << 20)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="only arrays of numbers or strings"):
        read_npz(objects)


def test_the_reader_returns_what_numpy_reads(tmp_path, medmnist_root) -> None:
    official = medmnist_root / "breastmnist.npz"
    arrays = read_npz(official, 1 << 30)
    with np.load(official) as expected:
        assert sorted(arrays) == sorted(expected.files)
        for key in expected.files:
            assert arrays[key].dtype == expected[key].dtype and np.array_equal(arrays[key], expected[key])
    path = tmp_path / "kinds.npz"
    kinds = {"fortran": np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)), "text": np.array("{}"),
             "flags": np.array([True, False]), "empty": np.zeros((0, 3), np.float32)}
    np.savez(path, **kinds)
    for key, value in read_npz(path).items():
        assert value.dtype == kinds[key].dtype and np.array_equal(value, kinds[key])


def test_metadata_nesting_is_bounded(tmp_path) -> None:
    for text in ("[" * 5000 + "]" * 5000, json.dumps({"provenance": {"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}})):
        path = tmp_path / "meta.npz"
        np.savez(path, **tiny_arrays(), medistill_meta=np.array(text))
        with pytest.raises(DataError, match="nests deeper than 16 levels"):
            load_npz_dataset(path)


# --- image sizes and the memory a dataset needs -------------------------------------------------------


def test_image_sizes_are_bounded_with_the_bound_stated() -> None:
    for size in (MIN_IMAGE_SIZE, 28, 64, 128, 224, MAX_IMAGE_SIZE):
        check_image_size(size)
    for size in (MIN_IMAGE_SIZE - 1, MAX_IMAGE_SIZE + 1, 100_000, True, 2.5, "32"):
        with pytest.raises(ConfigError, match=f"outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px"):
            check_image_size(size)


def test_realistic_image_sizes_load(medmnist_root) -> None:
    for size in (28, 64, 224):
        assert load_dataset("breastmnist", image_size=size, progress=False).image_size == size


def test_a_dataset_beyond_the_memory_bound_is_refused_before_it_is_resized(monkeypatch) -> None:
    monkeypatch.setenv(MEMORY_ENV, str(10 << 20))
    with pytest.raises(DataError, match=r"need about .* GiB .* more than the bound of 0\.0 GiB \(\$MEDISTILL_MAX_MEMORY_BYTES\)"):
        check_dataset_memory("780 images", 780, 224, 1)
    check_dataset_memory("780 images", 780, 28, 1)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ConfigError, match="number of bytes"):
        memory_bound()
    monkeypatch.delenv(MEMORY_ENV)
    assert memory_bound() > 1 << 28  # this machine's memory


def test_normalising_in_place_gives_the_values_of_the_formula() -> None:
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    arrays = {split: (images, np.array([0, 1])) for split in ("train", "val", "test")}
    data = build_dataset(name="t", task="binary-class", label_names=["a", "b"], arrays=arrays, source=DataSource("npz", "t", "t"))
    pixels = torch.from_numpy(arrays["train"][0]).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    assert torch.equal(data.train.images, (pixels - mean) / std)


def test_a_set_of_2048_pixel_images_is_refused_before_its_source_is_loaded(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the source was loaded")

    monkeypatch.setattr("medistill.data.source.load_medmnist", never)
    record = {"source": {"kind": "medmnist", "name": "breastmnist", "size": 28}}
    with pytest.raises(ConfigError, match=r"the set's image size is 2048 px, outside 8..1024 px"):
        load_recorded_source(record, channels=1, image_size=2048)


def test_an_image_folder_of_large_images_needs_an_image_size(tmp_path) -> None:
    root = image_folder(tmp_path / "images", size=1100)
    with pytest.raises(ConfigError, match=r"its first image .* is 1100 px, outside 8..1024 px.*--image-size"):
        load_image_folder(root)
    assert load_image_folder(root, image_size=32).image_size == 32


# --- seeds and IPCs -----------------------------------------------------------------------------------


def test_seeds_are_bounded_to_32_bits() -> None:
    for seed in (0, 1, MAX_SEED, np.int64(7)):
        assert check_seed(seed) == int(seed)
    for seed in (MAX_SEED + 1, 2**63, -1, True, 1.5):
        with pytest.raises(ConfigError, match=r"outside 0..4294967295"):
            check_seed(seed)
    with pytest.raises(ConfigError, match=r"outside 0..4294967295"):
        RunContext(seed=2**32)
    with pytest.raises(ConfigError, match=r"outside 0..4294967295"):
        seed_everything(-1)


def test_ipc_is_bounded_by_the_memory_of_the_set_a_method_learns(monkeypatch, tiny_dataset) -> None:
    data = tiny_dataset()
    check_ipc(data, 2, "dm", needs_real_images=False)
    monkeypatch.setenv(MEMORY_ENV, str(1 << 20))
    with pytest.raises(ConfigError, match=r"IPC 100 is too large .* the largest IPC within it is \d+"):
        check_ipc(data, 100, "dm", needs_real_images=False)
    largest = data.class_counts()
    check_ipc(data, min(largest), "random")  # a real subset up to the class size is never refused by memory


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["distill", "breastmnist", "-m", "random", "--ipc", "0", "--out", "o"], "--ipc 0 is outside 1..1,000,000"),
        (["distill", "breastmnist", "-m", "random", "--ipc", str(10**11), "--out", "o"], "outside 1..1,000,000"),
        (["distill", "breastmnist", "-m", "random", "--image-size", "7", "--out", "o"], "--image-size is 7 px, outside 8..1024"),
        (["distill", "breastmnist", "-m", "random", "--seed", str(2**32), "--out", "o"], "outside 0..4294967295"),
        (["distill", "breastmnist", "-m", "random", "--seed", "-1", "--out", "o"], "--seed -1 is outside 0..4294967295"),
        (["evaluate", "set", "--seed", str(2**63)], "outside 0..4294967295"),
        (["predict", "breastmnist", "--ipc", "0"], "--ipc 0 is outside"),
    ],
)
def test_command_line_numbers_are_refused_as_they_are_read(args, message, tmp_path, monkeypatch, capsys) -> None:
    from medistill.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["medistill", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


# --- checkpoints that do not fit their run -------------------------------------------------------------


def run_state(images: torch.Tensor, optimizer: torch.optim.Optimizer, iteration: int = 2) -> dict:
    return {
        "iteration": iteration,
        "losses": [0.5] * iteration,
        "seconds": 1.0,
        "eval_history": [{"iteration": 1, "seconds": 0.5, "acc_mean": 0.5, "auc_mean": float("nan")}],
        "distiller": {"images": images.detach().clone(), "optimizers": {"optimizer": optimizer.state_dict()}, "syn_lr": 0.01},
    }


@pytest.fixture
def learnt():
    images = torch.zeros(4, 1, 8, 8, requires_grad=True)
    optimizer = torch.optim.SGD([images], lr=0.1, momentum=0.5)
    images.grad = torch.ones_like(images)
    optimizer.step()  # a momentum buffer now exists
    expected = Expected({"images": images.detach(), "optimizers": {"optimizer": optimizer.state_dict()}, "syn_lr": 0.01},
                        {"optimizer": optimizer}, iterations=10)
    return images, optimizer, expected


def test_a_fitting_state_passes(learnt) -> None:
    images, optimizer, expected = learnt
    assert state_problem(run_state(images, optimizer), expected) is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["distiller"].update(images=torch.zeros(5, 1, 8, 8)), "shape (5, 1, 8, 8)"),
        (lambda s: s["distiller"].update(images=torch.zeros(4, 1, 8, 8, dtype=torch.float64)), "torch.float64"),
        (lambda s: s["distiller"].update(images=torch.full((4, 1, 8, 8), float("nan"))), "NaN"),
        (lambda s: s.update(iteration=-1), "iteration -1"),
        (lambda s: s.update(iteration=11), "iteration 11"),
        (lambda s: s.update(iteration="2"), "iteration '2'"),
        (lambda s: s.update(losses=[0.5] * 3), "at most 2 finite"),
        (lambda s: s.update(seconds=float("inf")), "seconds"),
        (lambda s: s.update(eval_history=[{"iteration": 9}]), "evaluation history"),
        (lambda s: s["distiller"].update(syn_lr="fast"), "syn_lr must be a finite number"),
        (lambda s: s["distiller"].pop("syn_lr"), "must hold exactly"),
        (lambda s: s["distiller"]["optimizers"]["optimizer"]["state"][0].update(momentum_buffer=torch.ones(3)), "momentum"),
        (lambda s: s["distiller"]["optimizers"]["optimizer"]["state"].update({7: {}}), "parameters this run does not have"),
        (lambda s: s["distiller"]["optimizers"]["optimizer"]["param_groups"][0].update(lr=float("nan")), "setting lr"),
        (lambda s: s["distiller"]["optimizers"].update(other={}), "its optimisers are not"),
    ],
)
def test_a_state_that_does_not_fit_is_named(learnt, edit, message) -> None:
    images, optimizer, expected = learnt
    state = run_state(images, optimizer)
    edit(state)
    problem = state_problem(state, expected)
    assert problem is not None and message in problem, problem


def test_restore_refuses_a_checkpoint_that_does_not_fit_and_leaves_it(learnt, tmp_path) -> None:
    images, optimizer, expected = learnt
    checkpoint = Checkpoint(RunContext(checkpoint_dir=tmp_path, resume=True), {"method": "dm"})
    state = run_state(images, optimizer)
    checkpoint.save(state)
    assert checkpoint.restore(expected) is not None  # it fits after a round trip through the file
    state["iteration"] = -3
    checkpoint.save(state)
    before = (tmp_path / "state.safetensors").read_bytes()
    with pytest.raises(DataError, match=r"does not fit this run \(iteration -3 .*\); it was not used"):
        checkpoint.restore(expected)
    assert (tmp_path / "state.safetensors").read_bytes() == before
    assert read_state(tmp_path / "state.safetensors")["state"]["iteration"] == -3


def test_a_fifo_in_place_of_a_checkpoint_is_refused(tmp_path) -> None:
    os.mkfifo(tmp_path / "state.safetensors")
    with pytest.raises(DataError, match="FIFO"):
        finishes(lambda: read_state(tmp_path / "state.safetensors"))


def test_a_study_config_states_the_bounds_of_its_seeds_and_image_size(tmp_path) -> None:
    from medistill.study.spec import load_study

    for block, message in (("seeds: [4294967296]", "0..4294967295"), ("seeds: [-1]", "0..4294967295"),
                           ("data: {image_size: 5000}", "data.image_size is 5000 px, outside 8..1024 px")):
        (tmp_path / "s.yaml").write_text(f"datasets: [breastmnist]\nmethods: [random]\n{block}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_study(tmp_path / "s.yaml")
