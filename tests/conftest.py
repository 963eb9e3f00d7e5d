"""Shared fixtures: the real data in ../shared/data, small thread counts for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MEDISTILL_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MEDMNIST_ROOT = Path(os.environ.get("MEDISTILL_DATA", SHARED_DATA / "medmnist"))
PNEUMONIA_NPZ = SHARED_DATA / "unofficial" / "pneumoniamnist_balanced.npz"


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    if not (MEDMNIST_ROOT / "breastmnist.npz").exists():
        pytest.fail(f"breastmnist.npz not found in {MEDMNIST_ROOT}; set MEDISTILL_DATA to the shared MedMNIST folder")
    return MEDMNIST_ROOT


@pytest.fixture(scope="session")
def breast(medmnist_root: Path):
    """The official BreastMNIST, loaded once per session (CPU)."""
    from medistill.data import load_dataset

    return load_dataset("breastmnist", root=medmnist_root, progress=False)


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    if not PNEUMONIA_NPZ.exists():
        pytest.fail(f"{PNEUMONIA_NPZ} not found")
    return PNEUMONIA_NPZ


@pytest.fixture(scope="session")
def pneumonia(pneumonia_npz: Path):
    """The unofficial class-balanced PneumoniaMNIST subset, through the own-npz path."""
    from medistill.data import load_dataset

    return load_dataset(pneumonia_npz)


@pytest.fixture
def kill_at(monkeypatch):
    """`kill_at(iteration)`: pixel-loop runs raise KeyboardInterrupt at `iteration` until the returned state's "kill" is False."""
    from medistill.methods import pixel_methods

    original = pixel_methods.IterationRandom.for_iteration.__func__

    def arm(iteration: int) -> dict:
        state = {"kill": True}

        def killed(cls, seed, i, device):
            if i == iteration and state["kill"]:
                raise KeyboardInterrupt
            return original(cls, seed, i, device)

        monkeypatch.setattr(pixel_methods.IterationRandom, "for_iteration", classmethod(killed))
        return state

    return arm


# --- helpers shared by several test modules, as fixtures (a test module never imports another) ---------------------

def _tiny_dataset(task: str | None = None, classes: int = 3, per_class: int = 8, size: int = 16):
    """A small dataset whose classes differ in brightness, from random uint8 arrays (ordinal unless `task` says)."""
    import numpy as np

    from medistill.data.dataset import MULTI_LABEL, ORDINAL, DataSource, build_dataset

    task = ORDINAL if task is None else task
    rng = np.random.default_rng(0)

    def split(n: int):
        labels = np.repeat(np.arange(classes), n)
        images = (rng.integers(0, 120, size=(len(labels), size, size)) + labels[:, None, None] * 60).astype(np.uint8)
        if task == MULTI_LABEL:
            labels = np.stack([labels % 2, labels // 2], 1)
        return images, labels

    names = ["a", "b"] if task == MULTI_LABEL else [f"c{i}" for i in range(classes)]
    arrays = {"train": split(per_class), "val": split(2), "test": split(4)}
    return build_dataset(name="tiny", task=task, label_names=names, arrays=arrays, source=DataSource(kind="npz", name="tiny", path="-"))


@pytest.fixture
def tiny_dataset():
    """`tiny_dataset(task=ORDINAL, classes=3, per_class=8, size=16)`: a small grayscale `Dataset` built in memory."""
    return _tiny_dataset


def _read_tensorboard(directory):
    """Scalars as {tag: [(step, value)]} and images as {tag: [(step, width, height)]} from a log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in tags["images"]}
    return scalars, images


@pytest.fixture
def read_tensorboard():
    """`read_tensorboard(folder) -> (scalars, images)`: what a run logged for TensorBoard."""
    return _read_tensorboard


def _without_seconds(points: list[dict] | None) -> list[dict] | None:
    """Evaluation points without the seconds of distillation they were made at: a timing, not a result.

    tests/result_digest.py keeps its own copy, so that the script runs alone on older commits."""
    return None if points is None else [{k: v for k, v in p.items() if k != "seconds"} for p in points]


@pytest.fixture
def without_seconds():
    """`without_seconds(eval_points)`: the points with their "seconds" dropped, for comparing two runs."""
    return _without_seconds


@pytest.fixture
def run_main(monkeypatch, capsys):
    """`run_main(argv) -> (exit code, stderr)`: the real `medistill` entry point, error handling included, in process."""
    import sys

    from medistill.cli import main

    def run(argv: list[str | Path]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["medistill", *map(str, argv)])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code, capsys.readouterr().err

    return run


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    from medistill.cli import EXIT_USER_ERROR

    assert code == EXIT_USER_ERROR == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medistill: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def assert_one_line_error():
    """`assert_one_line_error(code, stderr, *needles)`: exit code 2 and one `medistill: error:` line holding each needle."""
    return _assert_one_line_error
