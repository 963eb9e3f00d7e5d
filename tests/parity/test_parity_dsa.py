"""DSA (Zhao & Bilen 2021), single mode: one family per call, colour being one of them; Siamese draws shared."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from medistill import augment
from medistill.augment import DEFAULT_STRATEGY, DiffAugment

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in FAMILIES:
        op = augment._OPS[name]
        monkeypatch.setitem(augment._OPS, name, lambda x, draw, p, name=name, op=op: calls.append(name) or op(x, draw, p))
    monkeypatch.setattr(augment, "_color", augment._OPS["color"], raising=False)
    return calls


@pytest.mark.parametrize("siamese", [False, True])
def test_each_call_applies_one_family_each_about_one_in_six(monkeypatch: pytest.MonkeyPatch, siamese: bool) -> None:
    calls = _recording(monkeypatch)
    aug = DiffAugment(DEFAULT_STRATEGY)
    x = torch.rand(2, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    n = 2400
    for i in range(n):
        before = len(calls)
        aug(x, siamese_seed=i) if siamese else aug(x, generator=generator)
        assert len(calls) == before + 1, f"call {i} applied {calls[before:]}"
    counts = Counter(calls)
    for name in FAMILIES:  # binomial sd ~0.0076 at n=2400: 0.035 is > 4 sd
        assert abs(counts[name] / n - 1 / 6) < 0.035, counts


def test_colour_is_not_applied_on_top_of_a_geometric_family() -> None:
    x = torch.rand(3, 1, 8, 8)
    aug = DiffAugment("color_flip")
    outcomes = [aug(x, siamese_seed=s) for s in range(30)]
    plain = [torch.equal(out, x) or torch.equal(out, x.flip(3)) for out in outcomes]
    assert 5 <= sum(plain) <= 25  # the flip family alone, about half the time


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_one_draw_for_the_batch_and_the_same_for_real_and_synthetic(family: str) -> None:
    image = torch.rand(1, 3, 16, 16)
    real, syn = image.expand(5, -1, -1, -1), image.expand(2, -1, -1, -1)
    aug = DiffAugment(DEFAULT_STRATEGY)
    for seed in range(8):
        out_real, out_syn = aug.siamese_pair(real, syn, seed)
        for out in (*out_real, *out_syn):
            torch.testing.assert_close(out, out_real[0])
    single = DiffAugment(family)
    for seed in range(4):
        out_real, out_syn = single.siamese_pair(real, syn, seed)
        torch.testing.assert_close(out_syn[0], out_real[0])


@pytest.mark.parametrize("family", ["color", "scale", "rotate"])
def test_without_a_seed_every_sample_gets_its_own_draw(family: str) -> None:
    x = torch.rand(1, 3, 16, 16).expand(6, -1, -1, -1)
    out = DiffAugment(family)(x, generator=torch.Generator().manual_seed(1))
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 6))
