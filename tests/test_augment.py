"""Tests for the differentiable Siamese augmentation."""

from __future__ import annotations

import pytest
import torch

from medistill.augment import DEFAULT_STRATEGY, VALID_OPS, DiffAugment, DSAParams
from medistill.errors import ConfigError


def _batch(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_shape_and_dtype_preserved(c: int, size: int) -> None:
    x = _batch(4, c, size)
    aug = DiffAugment(DEFAULT_STRATEGY)
    for out in (aug(x), aug(x, siamese_seed=3), aug(x, generator=torch.Generator().manual_seed(1))):
        assert out.shape == x.shape
        assert out.dtype == x.dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", VALID_OPS)
def test_gradients_flow_to_input(op: str) -> None:
    x = _batch(3, 3, 28).requires_grad_(True)
    DiffAugment(op)(x, siamese_seed=5).square().sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", [DEFAULT_STRATEGY, *VALID_OPS])
def test_same_seed_same_transform_across_batch_sizes(strategy: str) -> None:
    aug = DiffAugment(strategy)
    pair = _batch(2, 3, 32)
    for seed in range(6):
        out_pair = aug(pair, siamese_seed=seed)
        out_single = aug(pair[:1], siamese_seed=seed)
        torch.testing.assert_close(out_pair[:1], out_single)
        torch.testing.assert_close(out_pair[1:], aug(pair[1:], siamese_seed=seed))


def test_siamese_pair_matches_direct_calls() -> None:
    aug = DiffAugment()
    real, syn = _batch(5, 1, 28, seed=1), _batch(2, 1, 28, seed=2)
    out_real, out_syn = aug.siamese_pair(real, syn, seed=11)
    torch.testing.assert_close(out_real, aug(real, siamese_seed=11))
    torch.testing.assert_close(out_syn, aug(syn, siamese_seed=11))


def test_siamese_draw_is_shared_across_the_batch() -> None:
    x = _batch(1, 3, 32).expand(4, -1, -1, -1)
    out = DiffAugment()(x, siamese_seed=2)
    for i in range(1, 4):
        torch.testing.assert_close(out[i], out[0])


def test_different_seeds_generally_differ() -> None:
    x = _batch(2, 3, 32)
    aug = DiffAugment()
    outs = [aug(x, siamese_seed=s) for s in range(5)]
    distinct = sum(not torch.allclose(outs[0], o) for o in outs[1:])
    assert distinct >= 3


def test_without_seed_samples_differ_and_generator_is_reproducible() -> None:
    x = _batch(1, 3, 32).expand(8, -1, -1, -1)
    aug = DiffAugment("color")
    out = aug(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out, aug(x, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("strategy", ["none", "", "None"])
def test_none_is_identity(strategy: str) -> None:
    x = _batch(2, 3, 28)
    assert torch.equal(DiffAugment(strategy)(x, siamese_seed=1), x)


def test_flip_gives_input_or_mirror() -> None:
    x = _batch(3, 3, 28)
    aug = DiffAugment("flip")
    seen = set()
    for seed in range(12):
        out = aug(x, siamese_seed=seed)
        flipped = torch.equal(out, x.flip(-1))
        assert flipped or torch.equal(out, x)
        seen.add(flipped)
    assert seen == {True, False}


def test_unknown_op_raises_config_error_listing_valid_ops() -> None:
    with pytest.raises(ConfigError) as info:
        DiffAugment("color_blur")
    assert "blur" in str(info.value)
    for op in VALID_OPS:
        assert op in str(info.value)


def test_cutout_zeroes_a_square_region() -> None:
    x = torch.rand(2, 1, 32, 32) + 1.0  # strictly positive, so zeros come only from the mask
    out = DiffAugment("cutout")(x, siamese_seed=4)
    zeros = out == 0
    assert torch.equal(zeros[0], zeros[1])
    assert zeros.sum() >= 2 * 9 * 9  # a 16-px square centred in the image keeps >= 9 px each way
    assert torch.equal(out[~zeros], x[~zeros])


@pytest.mark.parametrize("op", ["crop", "scale", "rotate"])
def test_resampling_ops_stay_within_input_range(op: str) -> None:
    x = torch.rand(4, 3, 28, 28) + 0.5
    aug = DiffAugment(op)
    for seed in range(3):
        out = aug(x, siamese_seed=seed)
        assert out.min() >= -1e-5  # zero padding may enter from outside the image
        assert out.max() <= x.max() + 1e-5


def test_crop_is_a_zero_padded_integer_shift() -> None:
    x = _batch(2, 1, 32)
    out = DiffAugment("crop")(x, siamese_seed=0)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = [padded[..., 4 + dy : 36 + dy, 4 + dx : 36 + dx] for dy in range(-4, 5) for dx in range(-4, 5)]
    assert any(torch.allclose(out, s, atol=1e-5) for s in shifts)


def test_saturation_on_grayscale_is_noop() -> None:
    x = _batch(2, 1, 28)
    out = DiffAugment("color", DSAParams(brightness=0.0))(x, siamese_seed=0)
    # brightness is off and saturation leaves 1-channel pixels alone, so only contrast remains
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    factor = ((out - mean) * (x - mean)).sum() / (x - mean).square().sum()
    assert 0.5 <= factor <= 1.5
    torch.testing.assert_close(out, (x - mean) * factor + mean)


# The parameter draws must come from the generator in one fixed order (the family pick, then the
# family's own draws in the order below: brightness, saturation, contrast for colour): runs and
# checkpoints are reproducible only while that stream stays the same. These re-draw the stream by hand.


@pytest.mark.parametrize("seed", range(6))
def test_per_sample_draw_order_is_pick_then_family(seed: int) -> None:
    x = _batch(6, 3, 28, seed=3)
    out = DiffAugment("color_flip")(x, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    if int(torch.randint(2, (1,), generator=g)) == 0:  # colour
        brightness, saturation, contrast = (torch.rand(6, generator=g) for _ in range(3))
        ref = x + (brightness - 0.5).view(-1, 1, 1, 1)
        mean = ref.mean(dim=1, keepdim=True)
        ref = (ref - mean) * (saturation * 2.0).view(-1, 1, 1, 1) + mean
        mean = ref.mean(dim=(1, 2, 3), keepdim=True)
        ref = (ref - mean) * (contrast + 0.5).view(-1, 1, 1, 1) + mean
    else:
        flip = torch.rand(6, generator=g) < 0.5
        ref = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("seed", range(4))
def test_siamese_crop_draws_rows_then_columns(seed: int) -> None:
    real, syn = _batch(3, 1, 32, seed=1), _batch(2, 1, 32, seed=2)
    out_real, out_syn = DiffAugment("crop").siamese_pair(real, syn, seed)
    g = torch.Generator().manual_seed(seed)
    torch.randint(1, (1,), generator=g)  # the op pick
    dy, dx = int(torch.randint(-4, 5, (1,), generator=g)), int(torch.randint(-4, 5, (1,), generator=g))
    for x, out in ((real, out_real), (syn, out_syn)):
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        torch.testing.assert_close(out, padded[..., 4 + dy : 36 + dy, 4 + dx : 36 + dx], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_siamese_cutout_draws_top_then_left(seed: int) -> None:
    real, syn = _batch(3, 1, 28, seed=1), _batch(2, 1, 28, seed=2)
    out_real, out_syn = DiffAugment("cutout").siamese_pair(real, syn, seed)
    g = torch.Generator().manual_seed(seed)
    torch.randint(1, (1,), generator=g)  # the op pick
    top = int(torch.randint(0, 29, (1,), generator=g)) - 7  # a 14-px square (even: one more centre), centred on the draw
    left = int(torch.randint(0, 29, (1,), generator=g)) - 7
    keep = torch.ones(28, 28)
    keep[max(top, 0) : max(top + 14, 0), max(left, 0) : max(left + 14, 0)] = 0
    assert torch.equal(out_real, real * keep)
    assert torch.equal(out_syn, syn * keep)
