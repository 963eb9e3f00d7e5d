"""The one-run canary audit (`medistill privacy-audit`): the ε bound, the score's power, the canaries, and the command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medistill.cli import EXIT_USER_ERROR
from medistill.data.custom import write_npz_dataset
from medistill.data.dataset import BINARY, MULTI_LABEL, DataSource, build_dataset
from medistill.audit.canary import (CANARY_AUDIT_JSON, audit_guesses, pixel_scores, count_correct_guesses, draw_canaries,
                                      draw_inclusion, epsilon_lower_bound, guess_counts_for, with_canaries)

EXE = Path(sys.executable).parent / "medistill"


def _seeded_inclusion(count: int, seed: int) -> torch.Tensor:
    """Inclusion bits for tests only (the audit itself takes them from the OS entropy)."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed)) < 0.5


def _assert_one_line_exit_2(code: int, err: str, needle: str) -> None:
    assert code == EXIT_USER_ERROR == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medistill: error: "), err
    assert needle in lines[0], lines[0]


# --- the bound ---------------------------------------------------------------------------------------------------------

def test_all_guesses_right_gives_the_epsilon_where_the_binomial_tail_is_the_level() -> None:
    # P[Bin(100, q) = 100] = q^100 = 0.05  ->  q = 0.05^(1/100), ε = log(q / (1 - q))
    q = 0.05 ** (1 / 100)
    expected = math.log(q / (1 - q))
    assert 3.4 < expected < 3.5
    assert epsilon_lower_bound(100, 100, canaries=100, delta=0.0, confidence=0.95) == pytest.approx(expected, abs=1e-5)


def test_chance_level_guessing_gives_zero_and_the_bound_grows_with_correct_guesses() -> None:
    assert epsilon_lower_bound(100, 50, canaries=100, delta=0.0) == 0.0
    assert epsilon_lower_bound(100, 55, canaries=100, delta=0.0) == 0.0
    assert epsilon_lower_bound(100, 0, canaries=100, delta=0.0) == 0.0
    bounds = [epsilon_lower_bound(100, v, canaries=100, delta=0.0) for v in range(50, 101)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[-2] > bounds[-10] > 0


def test_delta_lowers_the_bound_and_confidence_raises_the_bar() -> None:
    pure = epsilon_lower_bound(100, 95, canaries=1000, delta=0.0)
    assert 0 < epsilon_lower_bound(100, 95, canaries=1000, delta=1e-4) < pure
    assert epsilon_lower_bound(100, 95, canaries=1000, delta=1e-3) < epsilon_lower_bound(100, 95, canaries=1000, delta=1e-4)
    assert epsilon_lower_bound(100, 95, canaries=1000, delta=0.0, confidence=0.99) < pure


def test_guess_counts_are_capped_at_half_the_canaries() -> None:
    assert guess_counts_for(256) == [8, 16, 32, 64]
    assert guess_counts_for(32) == [8, 16]
    assert guess_counts_for(10) == [5]
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = torch.tensor([True, True, False, True, False, False])
    assert count_correct_guesses(scores, included, 2) == 4  # in: 0, 1 (right); out: 4, 5 (right)
    assert count_correct_guesses(scores, included, 3) == 4  # in: 0, 1, 2 (2 right); out: 3, 4, 5 (2 right)


# --- the score ---------------------------------------------------------------------------------------------------------

def _bound_of(synthetic: torch.Tensor, synthetic_labels: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor,
              included: torch.Tensor) -> dict:
    return audit_guesses({"pixel": pixel_scores(synthetic, synthetic_labels, pixels, labels)}, included, delta=1e-5)


def test_a_set_built_from_the_included_canaries_is_caught() -> None:
    pixels, labels = draw_canaries(128, 2, 1, 28, seed=3)
    noise = torch.Generator().manual_seed(4)
    for seed in range(3):
        included = _seeded_inclusion(128, seed)
        synthetic = torch.stack([pixels[included & (labels == c)].mean(dim=0) + 0.01 * torch.randn(1, 28, 28, generator=noise)
                                 for c in range(2)])
        result = _bound_of(synthetic, torch.arange(2), pixels, labels, included)
        assert result["epsilon_lower_bound"] > 2.0, result
        best = result["best"]
        assert best["correct"] >= 0.95 * best["guesses"]


def test_a_set_independent_of_the_canaries_shows_nothing() -> None:
    pixels, labels = draw_canaries(128, 2, 1, 28, seed=3)
    noise = torch.Generator().manual_seed(5)
    for seed in range(3):
        included = _seeded_inclusion(128, seed)
        synthetic = torch.rand(6, 1, 28, 28, generator=noise)  # 3 per class, drawn without looking at the inclusion
        result = _bound_of(synthetic, torch.tensor([0, 1, 0, 1, 0, 1]), pixels, labels, included)
        assert result["epsilon_lower_bound"] < 0.5, result


# --- the canaries ------------------------------------------------------------------------------------------------------

def test_canaries_follow_the_seed_are_high_contrast_and_labelled_round_robin() -> None:
    pixels, labels = draw_canaries(9, 3, 3, 16, seed=7, resolution=7)
    again, _ = draw_canaries(9, 3, 3, 16, seed=7, resolution=7)
    other, _ = draw_canaries(9, 3, 3, 16, seed=8, resolution=7)
    assert pixels.shape == (9, 3, 16, 16) and torch.equal(pixels, again) and not torch.equal(pixels, other)
    assert labels.tolist() == [0, 1, 2] * 3
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert float(((pixels < 0.1) | (pixels > 0.9)).float().mean()) > 0.5


def test_inclusion_comes_from_the_os_not_from_the_seed() -> None:
    torch.manual_seed(0)
    first = draw_inclusion(256)
    torch.manual_seed(0)
    second = draw_inclusion(256)
    assert first.dtype == torch.bool and first.shape == (256,)
    assert not torch.equal(first, second)  # equal with probability 2^-256
    assert 64 < int(first.sum()) < 192


def test_included_canaries_are_normalised_as_the_dataset_images() -> None:
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8), np.arange(n) % 2) for s, n in
              (("train", 8), ("val", 2), ("test", 2))}
    data = build_dataset(name="tiny", task=BINARY, label_names=["a", "b"], arrays=arrays, source=DataSource("npz", "tiny", "-"))
    pixels, labels = draw_canaries(6, 2, 1, 16, seed=0)
    included = torch.tensor([True, False, True, True, False, False])
    audited = with_canaries(data, pixels, labels, included)
    assert len(audited.train) == 8 + 3 and len(audited.test) == 2
    assert audited.train.labels[8:].tolist() == [0, 0, 1]
    assert torch.allclose(audited.denormalize(audited.train.images[8:]), pixels[included], atol=1e-5)
    assert torch.equal(audited.train.images[:8], data.train.images)


# --- the command -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_privacy_audit_of_dp_dm_from_the_executable(tmp_path: Path, medmnist_root: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_DATA": str(medmnist_root)}
    out = tmp_path / "audit"
    result = subprocess.run([str(EXE), "privacy-audit", "breastmnist", "-m", "dp-dm", "--ipc", "1", "--iterations", "3",
                             "--epsilon", "1", "--canaries", "32", "--out", str(out), "--device", "cpu", "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / CANARY_AUDIT_JSON).read_text())
    assert sorted(p.name for p in out.iterdir()) == [CANARY_AUDIT_JSON]  # no set, no image
    assert report["claimed_epsilon"] is not None and report["epsilon_lower_bound"] <= report["claimed_epsilon"]
    assert report["contradicts_claim"] is False
    assert 0 <= report["canaries_included"] <= 32 and report["canaries"] == 32
    assert report["canaries_included"] == sum(report["inclusion"]) and len(report["inclusion"]) == 32
    assert [(row["score"], row["k"]) for row in report["guesses"]] == [("embedding", 8), ("embedding", 16), ("pixel", 8), ("pixel", 16)]
    summary = [line for line in result.stdout.splitlines() if "empirical ε" in line]
    assert len(summary) == 1 and "breastmnist dp-dm ipc 1" in summary[0] and "consistent" in summary[0], result.stdout


def test_a_multi_label_dataset_is_one_line_exit_2(tmp_path: Path, run_main) -> None:
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, size=(4, 16, 16), dtype=np.uint8), rng.integers(0, 2, size=(4, 3)).astype(np.uint8))
              for s in ("train", "val", "test")}
    path = write_npz_dataset(tmp_path / "tags.npz", arrays, task=MULTI_LABEL, label_names=["a", "b", "c"])
    code, err = run_main(["privacy-audit", path, "-m", "dm", "--ipc", "1", "--out", tmp_path / "o", "--no-progress"])
    _assert_one_line_exit_2(code, err, "multi-label")
    assert not (tmp_path / "o").exists()


def test_an_unknown_method_or_an_existing_report_is_one_line_exit_2(tmp_path: Path, run_main) -> None:
    code, err = run_main(["privacy-audit", "breastmnist", "-m", "nosuch", "--out", tmp_path / "o"])
    _assert_one_line_exit_2(code, err, "unknown method 'nosuch'")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / CANARY_AUDIT_JSON).write_text("{}")
    code, err = run_main(["privacy-audit", "breastmnist", "-m", "dm", "--out", tmp_path / "o"])
    _assert_one_line_exit_2(code, err, "already exists")
    for marker, needle in (("dataset_card.json", "a shared bundle"), ("synthetic.safetensors", "a synthetic set's folder")):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        code, err = run_main(["privacy-audit", "breastmnist", "-m", "dm", "--out", folder])
        _assert_one_line_exit_2(code, err, needle)
        assert [p.name for p in folder.iterdir()] == [marker]  # nothing written into it


def test_the_embedding_score_sees_a_set_that_matches_the_members_mean_features() -> None:
    """A released class whose images are its member canaries has their mean embedding exactly: every guess is right."""
    from medistill.audit.canary import embedding_scores

    pixels, labels = draw_canaries(64, 2, 1, 28, seed=3)
    included = _seeded_inclusion(64, 0)
    scores = embedding_scores(pixels[included], labels[included], pixels, labels, networks=4)
    assert count_correct_guesses(scores, included, 16) == 32
    assert audit_guesses({"embedding": scores}, included, delta=1e-5)["epsilon_lower_bound"] > 1.0
