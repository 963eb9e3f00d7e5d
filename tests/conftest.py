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
