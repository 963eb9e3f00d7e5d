"""The near-copy screen under its transformation family (audit/screen.py) on real BreastMNIST images of every split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medistill.audit import AuditConfig, audit
from medistill.audit.neighbours import NCC_SMOOTHED_THRESHOLD, NCC_THRESHOLD, CopyThresholds
from medistill.audit.screen import ScreenFamily, Search, initialised_from_real, real_pixels, refusal, screen_set
from medistill.bundle import export_bundle
from medistill.errors import ConfigError
from medistill.methods import distill, new_set

SOURCES = {"train": 5, "val": 3, "test": 7}  # one real image per split


def hit(found):
    """The match that reaches its threshold, else the raw one (whose score is then below it)."""
    return found.hits(NCC_THRESHOLD, NCC_SMOOTHED_THRESHOLD) or found.raw


def _resized(image: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def family_members(x: torch.Tensor, others: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every kind of transformation the family promises, applied to one real image x (1, 1, 28, 28) in [0, 1]."""
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    shifted = torch.zeros_like(x)
    shifted[..., 2:, :-3] = x[..., :-2, 3:]
    placed = torch.zeros_like(x)
    placed[..., 4:21, 9:26] = _resized(x, 17)  # scale 0.61 anywhere inside
    tiles = torch.zeros_like(x)
    for (top, left), image in zip([(0, 0), (0, 14), (14, 0), (14, 14)], [others[0:1], x, others[1:2], others[2:3]]):
        tiles[..., top : top + 14, left : left + 14] = _resized(image, 14)
    members = {f"pose {k}": torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)}
    members |= {f"flipped, pose {k}": torch.rot90(x.flip(-1), k, dims=(-2, -1)) for k in range(4)}
    return members | {
        "copy": x,
        "shifted (2, -3) px": shifted,
        "rolled 3 px": torch.roll(x, 3, dims=-2),
        "affine -0.4 x + 0.9": -0.4 * x + 0.9,
        "inverted": 1 - x,
        "mixed 0.9 / 0.1 with noise": 0.9 * x + 0.1 * noise,
        "zoom: crop 0.75 at (3, 2)": _resized(x[..., 3:24, 2:23], 28),
        "zoom: crop 0.93 at (0, 2), flipped": _resized(x[..., 0:26, 2:28], 28).flip(-2),
        "scaled x0.61 inside": placed,
        "one of 4 tiles at x0.5": tiles,
    }


@pytest.fixture(scope="module")
def reals(breast):
    pixels, where = real_pixels(breast)
    return pixels, {key: i for i, key in enumerate(where)}


def test_representative_transforms_from_every_split_are_caught_and_kept_by_the_prefilter(reals) -> None:
    pixels, index = reals
    chosen = ("shifted (2, -3) px", "zoom: crop 0.75 at (3, 2)", "one of 4 tiles at x0.5")
    images, sources = [], []
    for split, i in SOURCES.items():
        source = index[(split, i)]
        members = family_members(pixels[source : source + 1], pixels[[0, 600, 700]])
        images += [members[name] for name in chosen]
        sources += [source] * len(chosen)
    search = Search(torch.cat(images), pixels, native_side=28)
    assert all(found.hits(NCC_THRESHOLD, NCC_SMOOTHED_THRESHOLD) for found in search.run())
    kept = torch.zeros(len(sources), dtype=torch.bool)
    for rows in search.prefilter():
        kept |= (rows // search.real_views == torch.tensor(sources)[:, None]).any(1)
    assert kept.all()


@pytest.fixture(scope="module")
def attacked(reals):
    """Every family member of one image from each split, screened together against every real image."""
    pixels, index = reals
    names, images, sources = [], [], []
    for split, i in SOURCES.items():
        source = index[(split, i)]
        members = family_members(pixels[source : source + 1], pixels[[0, 600, 700]])
        names += [f"{split}: {name}" for name in members]
        images += list(members.values())
        sources += [source] * len(members)
    search = Search(torch.cat(images), pixels, native_side=28)
    return names, sources, search, [hit(found) for found in search.run()]


@pytest.fixture(scope="module")
def oracle(attacked):
    """The exact search given the true source as the only candidate: what the screen must at least find."""
    _, sources, search, _ = attacked
    return search.run(candidates=torch.tensor(sources)[:, None])


@pytest.mark.slow
def test_every_transformation_of_the_family_is_caught_in_every_split(attacked, oracle) -> None:
    names, sources, _, matches = attacked
    missed = [f"{name}: {m.score:.3f}" for name, m in zip(names, matches) if m.score < NCC_THRESHOLD and not m.smoothed]
    assert not missed
    # the real image named is the one transformed, or one that matches even better (BreastMNIST holds near-duplicates)
    wrong = [name for name, source, m, o in zip(names, sources, matches, oracle) if m.real != source and m.score < hit(o).score]
    assert not wrong
    assert sum(m.real == source for source, m in zip(sources, matches)) >= 0.9 * len(sources)


@pytest.mark.slow
def test_the_match_says_how_the_real_image_was_transformed(attacked) -> None:
    names, _, _, matches = attacked
    by_name = dict(zip(names, matches))
    assert by_name["test: inverted"].sign == -1 and "inverted" in by_name["test: inverted"].describe()
    assert by_name["val: flipped, pose 0"].dihedral == "flip"
    assert by_name["train: shifted (2, -3) px"].offset == (2, -3) and by_name["train: shifted (2, -3) px"].kind == "whole"
    assert by_name["train: zoom: crop 0.75 at (3, 2)"].kind == "zoom"
    scaled = by_name["test: scaled x0.61 inside"]
    assert scaled.kind == "scaled" and abs(scaled.scale - 17 / 28) < 0.05 and scaled.offset == (4, 9)


@pytest.mark.slow
def test_the_prefilter_keeps_the_true_source(attacked) -> None:
    _, sources, search, _ = attacked
    kept = torch.zeros(len(sources), dtype=torch.bool)
    for rows in search.prefilter():
        kept |= (rows // search.real_views == torch.tensor(sources)[:, None]).any(1)
    assert kept.all()


@pytest.mark.slow
def test_the_prefilter_never_scores_below_the_true_source_alone(attacked, oracle) -> None:
    _, _, search, _ = attacked
    found = search.run()
    assert all(f.raw.score >= o.raw.score - 1e-6 for f, o in zip(found, oracle))
    assert all(f.smoothed.score >= o.smoothed.score - 1e-6 for f, o in zip(found, oracle))


def test_noise_and_unrelated_images_stay_below_the_threshold(reals) -> None:
    pixels, _ = reals
    noise = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    found = Search(noise, pixels, native_side=28).run()
    assert max(f.raw.score for f in found) < 0.7 and max(f.smoothed.score for f in found if f.smoothed) < 0.8


def test_one_channel_of_an_rgb_image_holding_a_real_image_is_caught(breast) -> None:
    rgb_real = breast.denormalize(breast.test.images[:40]).expand(-1, 3, -1, -1)
    synthetic = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    synthetic[0, 1] = rgb_real[12, 0]
    synthetic[1, 2] = 1 - rgb_real[30, 0]
    matches = [found.raw for found in Search(synthetic, rgb_real, native_side=28).run()]
    assert [m.real for m in matches] == [12, 30] and min(m.score for m in matches) > 0.999
    assert [m.synthetic_channel for m in matches] == ["channel 1", "channel 2"] and matches[0].real_channel == "grey"


def test_a_real_image_at_source_size_inside_a_larger_synthetic_image_is_caught(breast) -> None:
    real = breast.denormalize(breast.val.images[:30])
    big = torch.rand(1, 1, 56, 56, generator=torch.Generator().manual_seed(2))
    big[..., 20:48, 5:33] = real[17]
    upsampled = _resized(real, 56)  # the source as loaded at the set's size
    match = Search(big, upsampled, native_side=28).run()[0].raw
    assert match.real == 17 and match.score > 0.98 and match.kind == "scaled"


def test_a_set_of_noise_passes_and_the_screen_says_what_it_searched(breast) -> None:
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    screen = screen_set(new_set(breast, images, torch.tensor([0, 0, 1, 1]), method="dc", ipc=2, seed=0), breast)
    assert screen["passed"] and screen["near_copies"] == 0 and screen["highest_ncc"] < 0.8
    assert screen["real_images_searched"] == 780 and screen["splits_searched"] == {"train": 546, "val": 78, "test": 156}
    assert screen["rule"]["ncc_at_least"] == NCC_THRESHOLD and screen["rule"]["ncc_smoothed_at_least"] == NCC_SMOOTHED_THRESHOLD
    assert screen["rule"]["family"]["shift_px"] == 3


@pytest.mark.slow
def test_a_noise_initialised_distilled_set_passes(breast) -> None:
    synthetic = distill("dm", breast, 1, {"iterations": 1, "init": "noise", "batch_real": 8})
    screen = screen_set(synthetic, breast)
    assert screen["passed"] and screen["matches"] == [] and screen["highest_ncc"] < NCC_THRESHOLD
    assert screen["highest_ncc_smoothed"] < NCC_SMOOTHED_THRESHOLD and not screen["initialised_from_real"]


def test_a_real_initialised_set_that_barely_moved_is_refused_naming_its_start(breast, tmp_path) -> None:
    synthetic = distill("dm", breast, 1, {"iterations": 1, "lr_img": 1e-12, "init": "real", "batch_real": 8})
    assert initialised_from_real(synthetic)
    with pytest.raises(ConfigError, match="2 of 2 images are near-copies") as refused:
        export_bundle(synthetic, tmp_path / "bundle")
    message = str(refused.value)
    assert "train image" in message and "initialised from real images (init: real)" in message
    assert "stayed too close to its initial images" in message and "\n" not in message
    assert not (tmp_path / "bundle").exists()


def test_a_flipped_test_image_is_refused_naming_split_and_transform(breast) -> None:
    images = breast.test.images[[3, 9]].flip(-1)
    synthetic = new_set(breast, images, torch.tensor([0, 1]), method="dc", ipc=1, seed=0)
    screen = screen_set(synthetic, breast)
    assert not screen["passed"] and [(m["split"], m["index"]) for m in screen["matches"]] == [("test", 3), ("test", 9)]
    message = refusal(screen)
    assert "image 0 ~ test image 3 (flip, same frame; |NCC| 1.000)" in message and "initialised" not in message


def test_values_outside_the_pixel_range_do_not_hide_a_copy(breast) -> None:
    # a real image stretched far beyond [0, 1]: clamped it would be a black-and-white mask; as stored it is the image
    pixels = breast.denormalize(breast.val.images[[5]])
    stretched = (pixels - 0.5) * 40 + 0.5
    images = (stretched - breast.mean[0]) / breast.std[0]
    synthetic = new_set(breast, torch.cat([images, torch.randn(1, 1, 28, 28)]), torch.tensor([0, 1]), method="dm", ipc=1, seed=0)
    screen = screen_set(synthetic, breast)
    assert screen["near_copies"] == 1 and screen["matches"][0]["split"] == "val"


def test_the_audit_reports_the_transform_aware_match_beside_the_old_keys(breast) -> None:
    images = torch.cat([breast.val.images[[2]].flip(-2), torch.randn(1, 1, 28, 28)])
    synthetic = new_set(breast, images, torch.tensor([0, 1]), method="dc", ipc=1, seed=0)
    report = audit(synthetic, breast, AuditConfig(feature_epochs=0, reference_images=0, mia=False))
    assert report["neighbours"]["near_copies"] == 0  # the old rule (training split, no transforms) sees nothing
    assert report["near_copy_screen"]["near_copies"] == 1 and report["passed"] is False
    assert "under the screen's transforms" in report["verdict"]


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        CopyThresholds(ncc=1.5)
    with pytest.raises(ConfigError):
        CopyThresholds(ncc_smoothed=0)
    with pytest.raises(ConfigError):
        ScreenFamily(shift=0.6)
    with pytest.raises(ConfigError):
        ScreenFamily(candidates=0)
    with pytest.raises(ConfigError):
        Search(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 16, 16))
