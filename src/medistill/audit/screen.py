"""The near-copy screen under a stated transformation family: is a real image, of any split, hidden in a synthetic one?

A synthetic image counts as a near-copy of a real image when, after undoing a transformation of the
family below, the two are almost perfectly correlated: the highest absolute normalised
cross-correlation (|NCC|, Pearson's r of the pixel values) over the family reaches `CopyThresholds.ncc`,
or, over whole-frame comparisons (flips, rotations, shifts, zooms) with both sides blurred by a
Gaussian of 1.5 px (at N = 28), reaches `CopyThresholds.ncc_smoothed`. |NCC| ignores any affine
change of intensity a*x + b with a != 0, inversion (1 - x) included; the blur sees through noise mixed
into a copy (a 0.9 / 0.1 mix with uniform noise keeps r near 0.99 blurred where it drops to 0.9 raw
on the low-contrast Pneumonia images). The thresholds are chosen from `benchmarks/near_copy_screen.py`.

The family, at the working side N (the source's native side, at most `ScreenFamily.max_side`):

- the 8 flips and right-angle rotations (the dihedral group of the square), composed with any of:
- shifts of up to s = round(0.1 N) pixels in each direction (3 px at N = 28), borders filled anyhow;
- any affine intensity change a*x + b (a != 0), inversion included; noise mixed in up to 10%;
- crop-and-resize (zoom): a crop of 0.7-1 of the real image's side, anywhere in it, resized to the image;
- a real image scaled by 0.5-1 (of the source's native side) and placed anywhere inside the synthetic
  image: tiles of several real images, real-size windows of a larger synthetic image;
- any one channel of the synthetic image, or the mean of its channels, against any channel of a real
  image or its grey (mean) image.

How: every image is standardised (zero mean, unit variance per channel variant); the synthetic images
are screened as stored, not clamped to [0, 1]. A real image at a scale is a template (its central crop
where a shift may carry its border outside the synthetic image), slid over the synthetic image with
`unfold` and a batched matrix product; the local mean and variance of each window come from the same
unfolded windows (box statistics), so each position gives the exact Pearson r. For a zoom every crop
of the real image (every side from 0.7 N, every position) is magnified to the synthetic image's side,
as the family defines it, and compared with the whole synthetic image. Scales and crops are searched
at every whole pixel size.

Doing that for every real image is too slow, so a prefilter ranks the real images first: |NCC| of
images box-averaged by `prefilter_factor` (7x7 at N = 28), whitened with the real images' covariance
(so what all images share counts less than what tells them apart), over the 8 dihedral variants; the
whole frame at every shift (its central 5x5, clear of the filled border), against every zoomed crop
of the real images (every crop side, every other pixel), and the windows of the synthetic image
rescaled by 2^(b/4) (b = 0..4: the embedded scales 1 down to 0.5) at half-cell phases. For every
synthetic image and every scale band the `candidates` (K) best real images per real-size cell of the
synthetic image (a 2x2 tiling at x0.5 has 4 cells) go to the exact search above.
`benchmarks/near_copy_screen.py` measures that the prefilter keeps the true source of every attack.

Outside the family (not promised): rotations by other angles, elastic or perspective deformations,
blurs, scales below 0.5 or zooms beyond 1/0.7, a real image behind more than about 10% noise, a part of
a real image smaller than the scaled template, a real image upscaled inside a larger image, and a real
image whose local contrast is below `min_contrast` of the synthetic image's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medistill.artifact import SyntheticSet, renormalize
from medistill.audit.neighbours import DEFAULT_BATCH_ELEMENTS, CopyThresholds, find_neighbours
from medistill.data.dataset import SPLITS, Dataset
from medistill.errors import ConfigError

# The 8 views of a square tried on the synthetic image: torch.rot90 k times, then the same after a left-right flip.
DIHEDRAL = ("identity", "rot90", "rot180", "rot270", "flip", "flip+rot90", "flip+rot180", "flip+rot270")
ZOOM_PHASE = 2  # the prefilter's zoom crops lie every ZOOM_PHASE pixels of the magnified real image
BANDS = 5  # embedded-scale bands: the synthetic image rescaled by 2^(b/4), b = 0..4 (scales 1 down to 0.5)
DEFAULT_BUDGET = 1 << 23  # floats per intermediate block (32 MB in float32)


@dataclass(frozen=True)
class ScreenFamily:
    """The transformation family searched, and the prefilter's size (see the module docstring)."""

    shift: float = 0.1  # shifts up to round(shift * N) pixels
    embed_min_scale: float = 0.5  # a real image scaled by [embed_min_scale, 1] placed inside the synthetic image
    zoom_min_crop: float = 0.7  # crop-and-resize of crops of [zoom_min_crop, 1) of the real side
    candidates: int = 32  # K: real images kept by the prefilter per synthetic image, scale band and real-size cell
    prefilter_factor: int = 4  # the prefilter compares images downsampled by this factor
    max_side: int = 32  # the search runs at the source's native side, downsampled to at most this
    min_contrast: float = 1e-3  # windows whose std is below this (in units of the image's std) are not compared
    whiten: float = 0.1  # prefilter features are whitened with the real images' covariance, regularised by this
    smoothing: float = 1.5  # Gaussian sigma in pixels at N = 28 (scaled with N) for the blurred whole-frame search

    def __post_init__(self) -> None:
        if not 0 <= self.shift < 0.5:
            raise ConfigError(f"the shift fraction must be in [0, 0.5), got {self.shift}")
        if not 0 < self.embed_min_scale <= 1 or not 0 < self.zoom_min_crop <= 1:
            raise ConfigError("the smallest embedding scale and zoom crop must be in (0, 1]")
        if self.candidates < 1 or self.prefilter_factor < 1 or self.max_side < 8:
            raise ConfigError("candidates and the prefilter factor must be >= 1, and the largest side >= 8")
        if not self.min_contrast > 0:
            raise ConfigError(f"the smallest contrast must be > 0, got {self.min_contrast}")

    def describe(self, native: int) -> dict[str, Any]:
        """The family as applied to a source of this working side, JSON-serialisable."""
        return {
            "measure": "max |NCC| (Pearson r) over the family; also over whole-frame comparisons with both sides blurred",
            "blur_sigma_px": self.smoothing * native / 28,
            "working_side": native,
            "dihedral": list(DIHEDRAL),
            "shift_px": shift_pixels(native, self.shift),
            "embedded_scale": [self.embed_min_scale, 1.0],
            "zoom_crop": [self.zoom_min_crop, 1.0],
            "intensity": "a*x + b, a != 0 (inversion included)",
            "channels": "each synthetic channel and their mean against each real channel and the grey image",
            "splits": "train, val and test",
            "prefilter": {
                "candidates_per_band_and_cell": self.candidates,
                "downsampling": self.prefilter_factor,
                "bands": BANDS,
                "whitening": self.whiten,
            },
        }


def shift_pixels(native: int, fraction: float) -> int:
    return max(1, round(fraction * native)) if fraction > 0 else 0


@dataclass
class Match:
    """The best match of one synthetic image: |NCC|, its sign, the real image and the transformation."""

    score: float
    sign: int
    real: int  # index into the real images searched
    real_channel: str
    synthetic_channel: str
    dihedral: str  # applied to the real image to give the synthetic one
    kind: str  # "whole" (same frame, maybe shifted), "scaled" (embedded at a scale), "zoom" (crop-and-resize)
    scale: float  # the real image's scale in the synthetic (zoom: the crop fraction)
    offset: tuple[int, int]  # whole: shift (dy, dx); scaled: top-left in the synthetic; zoom: the crop's top-left
    smoothed: bool = False  # found with both sides blurred (the whole-frame search's second pass)

    def describe(self) -> str:
        """E.g. 'flipped (flip+rot90), scaled x0.50 at (14, 0), inverted'."""
        parts = [] if self.dihedral == "identity" else [self.dihedral]
        if self.kind == "whole":
            parts.append(f"shifted by {self.offset} px" if self.offset != (0, 0) else "same frame")
        elif self.kind == "scaled":
            parts.append(f"scaled x{self.scale:.2f} at {self.offset}")
        else:
            parts.append(f"crop of {self.scale:.2f} at {self.offset} resized")
        if self.sign < 0:
            parts.append("inverted")
        if self.smoothed:
            parts.append("seen through noise")
        if (self.synthetic_channel, self.real_channel) != ("grey", "grey"):
            parts.append(f"synthetic {self.synthetic_channel} vs real {self.real_channel}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ncc": self.score * self.sign,
            "real_channel": self.real_channel,
            "synthetic_channel": self.synthetic_channel,
            "dihedral": self.dihedral,
            "kind": self.kind,
            "scale": self.scale,
            "offset": list(self.offset),
            "smoothed": self.smoothed,
            "transform": self.describe(),
        }


@dataclass
class Found:
    """What the screen found for one synthetic image: the best match on raw pixels over the whole family, and the best
    whole-frame match (flips, shifts, zooms) with both sides blurred, which sees through mixed-in noise (None when the
    family's smoothing is 0). Each has its own threshold (`CopyThresholds.ncc`, `ncc_smoothed`)."""

    raw: Match
    smoothed: Match | None = None

    def hits(self, raw_threshold: float, smoothed_threshold: float) -> Match | None:
        """The match that reaches its threshold (raw first), else None."""
        if self.raw.score >= raw_threshold:
            return self.raw
        if self.smoothed is not None and self.smoothed.score >= smoothed_threshold:
            return self.smoothed
        return None


@dataclass(frozen=True)
class _Band:
    """One group of searches: the view searched (whole image at N, or the synthetic image at its side),
    the real template sides tried on it, whether zooms are searched, and how the prefilter sees it."""

    name: str
    view: str  # "whole": the synthetic image resized to N; "image": at its working side
    sides: tuple[int, ...]  # real template sides (before cropping the shift margin)
    zoom: bool
    rho: float  # the prefilter rescales the view by this before cutting N-sized windows
    smallest: int  # the band's own smallest template side (`sides` reaches two further into the next band)


class Search:
    """The screen of one set of synthetic images against one set of real images (see the module docstring)."""

    def __init__(
        self,
        synthetic: torch.Tensor,
        real: torch.Tensor,
        *,
        native_side: int | None = None,
        family: ScreenFamily | None = None,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        """`synthetic` (n,C,H,W) and `real` (M,C,H,W) in pixel units (the synthetic ones need not be clamped);
        `native_side`: the side of the source file's images (default H)."""
        if (
            synthetic.ndim != 4
            or real.ndim != 4
            or synthetic.shape[1:] != real.shape[1:]
            or synthetic.shape[-1] != synthetic.shape[-2]
        ):
            raise ConfigError(
                f"images to screen must share a square (C,H,W) shape, got {tuple(synthetic.shape)} and {tuple(real.shape)}"
            )
        if len(synthetic) == 0 or len(real) == 0:
            raise ConfigError("nothing to screen: an image set is empty")
        self.family = family or ScreenFamily()
        self.budget = max(1, budget)
        height = int(synthetic.shape[-1])
        reference = min(native_side or height, height)
        ratio = min(1.0, self.family.max_side / reference)
        self.native = max(1, round(reference * ratio))  # N
        self.side = max(1, round(height * ratio))  # the synthetic image's working side
        self.shift = shift_pixels(self.native, self.family.shift)
        self.factor = max(1, min(self.family.prefilter_factor, self.native // 3))  # tiny images: a finer prefilter
        self.low = max(1, round(self.native / self.factor))
        self.sigma = self.family.smoothing * self.native / 28
        self.channels = int(synthetic.shape[1])

        work = synthetic.detach().float().cpu()
        work = torch.nan_to_num(work, nan=0.0, posinf=0.0, neginf=0.0)
        if self.side != height:
            work = _resize(work, self.side)
        self.synthetic_names, views = _channel_views(work, always=True)
        self.views = _standardise(views)  # (n, Vs, S, S)
        real_work = real.detach().float().cpu()
        if self.native != height:
            real_work = _resize(real_work, self.native)
        self.real_names, rows = _channel_views(real_work, always=False)
        self.real_views = len(self.real_names)
        self.rows = _standardise(rows).flatten(0, 1)  # (M * Vr, N, N): row r is image r // Vr, channel r % Vr
        self.real_count = len(real)
        self.bands = self._bands()

    # --- geometry --------------------------------------------------------------------------------

    def _bands(self) -> list[_Band]:
        n, s = self.native, self.side
        low = math.ceil(self.family.embed_min_scale * n - 1e-9)
        sides = [t for t in range(max(low, 3), n + 1) if t <= s]
        by_band: dict[int, list[int]] = {}
        for t in sides:
            by_band.setdefault(min(BANDS - 1, max(0, round(4 * math.log2(n / t)))), []).append(t)

        def widened(band_sides: list[int]) -> tuple[int, ...]:  # two sides more each way: bands overlap at their edges
            return tuple(t for t in sides if min(band_sides) - 2 <= t <= max(band_sides) + 2)

        bands = []
        if s == n:
            own = by_band.pop(0, [n])
            bands.append(_Band("whole", "image", widened(own), True, 1.0, min(own)))
        else:
            bands.append(_Band("whole", "whole", (n,), True, 1.0, n))
        for b, own in sorted(by_band.items()):
            band_sides = tuple(t for t in widened(own) if s != n or t < n)  # the same frame is the whole band's
            bands.append(_Band(f"scale {2 ** (-b / 4):.2f}", "image", band_sides, False, 2 ** (b / 4), min(own)))
        return bands

    def _view(self, band: _Band, images: slice) -> torch.Tensor:
        """(n, 8 * Vs, V, V): the band's view of the synthetic images, every channel variant in the 8 dihedral poses."""
        views = self.views[images]
        if band.view == "whole" and self.side != self.native:
            views = _standardise(_resize(views, self.native))
        return _dihedral(views)

    def _zoom_sides(self) -> list[int]:
        """Crop sides searched for a zoom: every whole pixel from zoom_min_crop * N up to N - 1."""
        return list(range(max(3, math.ceil(self.family.zoom_min_crop * self.native - 1e-9)), self.native))

    def margin(self, view_side: int, template_side: int) -> int:
        """Pixels cropped from each border of a real template so that a shift of up to `shift` keeps it inside the view."""
        return max(0, min(self.shift - (view_side - template_side) // 2, (template_side - 3) // 2))

    # --- the search --------------------------------------------------------------------------------

    def run(self, candidates: torch.Tensor | None = None) -> list[Found]:
        """The best matches of every synthetic image. `candidates` (n, k) real image indices replace the prefilter
        (every band searches them); by default the prefilter picks `band_candidates` per band (all when that is >= M)."""
        n = len(self.views)
        raw: list[Match | None] = [None] * n
        smoothed: list[Match | None] = [None] * n
        for band_index, band in enumerate(self.bands):
            if candidates is not None:
                chosen = _expand_rows(candidates, self.real_views)
            elif self.band_candidates(band) >= self.real_count:
                chosen = torch.arange(len(self.rows)).expand(n, -1)
            else:
                chosen = self.prefilter()[band_index]
            for kept, found in zip((raw, smoothed), self._exact(band, chosen)):
                for i, match in enumerate(found):
                    current = kept[i]
                    if current is None or match.score > current.score:
                        kept[i] = match
        return [Found(r, s) for r, s in zip(raw, smoothed) if r is not None]

    def band_candidates(self, band: _Band) -> int:
        """K times the number of real images of the band's smallest scale that fit side by side in the view: a tiling of
        several real images has each of them among the candidates."""
        view = self.native if band.view == "whole" else self.side
        return self.family.candidates * max(1, view // band.smallest) ** 2

    def prefilter(self) -> list[torch.Tensor]:
        """Per band, (n, K * Vr) real rows: the K real images whose downsampled variants best match each synthetic image."""
        if not hasattr(self, "_prefiltered"):
            self._prefiltered = self._prefilter()
        return self._prefiltered

    def _low(self, images: torch.Tensor) -> torch.Tensor:
        """(..., S, S) images whose side is a multiple of the prefilter factor -> box-averaged (..., S/f, S/f)."""
        f = self.factor
        shape = images.shape
        pooled = F.avg_pool2d(images.reshape(-1, 1, shape[-2], shape[-1]), f) if f > 1 else images.reshape(-1, 1, *shape[-2:])
        return pooled.reshape(*shape[:-2], *pooled.shape[-2:])

    def _central(self, low: torch.Tensor) -> torch.Tensor:
        """(..., l, l) -> (..., c*c): the downsampled image without the ring a shift of up to `shift` pixels can fill."""
        ring = min(math.ceil(self.shift / self.factor), (self.low - 1) // 2)
        return low[..., ring : self.low - ring, ring : self.low - ring].flatten(-2)

    def _whitening(self, features: torch.Tensor) -> torch.Tensor:
        """(d, d): a regularised whitening of normalised feature rows of real images."""
        covariance = features.T @ features / len(features)
        values, vectors = torch.linalg.eigh(covariance.double())
        values = values.clamp_min(0) + self.family.whiten * float(values.clamp_min(0).mean())
        return (vectors @ torch.diag(values.rsqrt()) @ vectors.T).float()

    def _prefilter(self) -> list[torch.Tensor]:
        n = len(self.views)
        ks = [min(self.band_candidates(band), self.real_count) for band in self.bands]
        sample = self._low(_resize(self.rows[:: max(1, len(self.rows) // 4096)], self.low * self.factor))
        whites: dict[str, torch.Tensor | None] = {"plain": None, "central": None}
        if self.family.whiten > 0:
            whites = {
                "plain": self._whitening(_normalise(sample.flatten(-2))),
                "central": self._whitening(_normalise(self._central(sample))),
            }
        whites["zoom"] = whites["plain"]
        # per band, (queries (n, R, d), kind of real features) pairs whose best |NCC| ranks the real images
        comparisons = [[(_white(q, whites[kind]), kind) for q, kind in self._prefilter_queries(band)] for band in self.bands]
        best = [torch.full((n, k), -1.0) for k in ks]
        where = [torch.zeros((n, k), dtype=torch.long) for k in ks]
        widest = max(q.shape[1] for pairs in comparisons for q, _ in pairs)
        zooms = 128  # about the zoom crops per real image
        chunk = max(1, self.budget // max(1, widest * self.real_views * (1 + zooms)))
        kinds = {kind for pairs in comparisons for _, kind in pairs}
        for start in range(0, self.real_count, chunk):
            stop = min(self.real_count, start + chunk)
            rows = self.rows[start * self.real_views : stop * self.real_views]
            low = self._low(_resize(rows, self.low * self.factor))  # (m * Vr, l, l)
            features = {"plain": _white(_normalise(low.flatten(-2)), whites["plain"]).unsqueeze(1)}  # (m * Vr, 1, d)
            if "central" in kinds:
                features["central"] = _white(_normalise(self._central(low)), whites["central"]).unsqueeze(1)
            if "zoom" in kinds:
                features["zoom"] = _white(self._zoom_features(rows), whites["zoom"])  # (m * Vr, Z, d)
            for b, pairs in enumerate(comparisons):
                scores = torch.stack([self._band_scores(q, features[kind]) for q, kind in pairs]).amax(0)
                merged = torch.cat([best[b], _per_image(scores, self.real_views)], 1)
                ids = torch.cat([where[b], torch.arange(start, stop).expand(n, -1)], 1)
                best[b], pick = merged.topk(ks[b], dim=1)
                where[b] = ids.gather(1, pick)
        return [_expand_rows(w, self.real_views) for w in where]

    def _prefilter_queries(self, band: _Band) -> list[tuple[torch.Tensor, str]]:
        """The band's synthetic views as prefilter rows: (n, R, d) with the kind of real features they are compared with."""
        f = self.factor
        views = self._view(band, slice(None))  # (n, Q, V, V)
        n, q, side = views.shape[0], views.shape[1], views.shape[-1]
        d = self.low * self.low
        if band.name == "whole":
            big = _resize(views, self.low * f)
            step = 1
            offsets = [step * i for i in range(-(self.shift // step), self.shift // step + 1)]
            shifted = [self._central(self._low(_shifted(big, dy, dx))) for dy in offsets for dx in offsets]
            central = _normalise(torch.stack(shifted, 2).reshape(n, q * len(shifted), -1))
            whole = _normalise(self._low(big).reshape(n, q, d))
            return [(central, "central"), (whole, "plain"), (whole, "zoom")]
        size = round(side * band.rho * self.low * f / self.native)
        big = _resize(views.flatten(0, 1).unsqueeze(1), size)  # (n*Q, 1, size, size): embedded reals at l*f
        windows = []
        for dy in range(0, f, max(1, f // 2)):
            for dx in range(0, f, max(1, f // 2)):
                part = big[..., dy:, dx:]
                usable = (part.shape[-1] // f) * f, (part.shape[-2] // f) * f
                if min(usable) < self.low * f:
                    continue
                low = self._low(part[..., : usable[1], : usable[0]])
                windows.append(F.unfold(low, self.low).transpose(1, 2).reshape(n, -1, d))
        return [(_normalise(torch.cat(windows, 1)), "plain")]

    def _zoom_features(self, rows: torch.Tensor) -> torch.Tensor:
        """(m, Z, d): crops of the real rows at the prefilter's zoom sides and every other position, downsampled,
        normalised. The real image is magnified so that a crop becomes l*f pixels, then box-averaged at 2x2 phases."""
        f, side = self.factor, self.low * self.factor
        out = []
        for size in self._zoom_sides():
            magnified = _resize(rows, round(side * self.native / size))
            for dy in range(0, f, ZOOM_PHASE):
                for dx in range(0, f, ZOOM_PHASE):
                    part = magnified[..., dy:, dx:]
                    usable = (min(part.shape[-2:]) // f) * f
                    if usable < side:
                        continue
                    low = self._low(part[..., :usable, :usable]).unsqueeze(1)  # (m, 1, u, u)
                    out.append(F.unfold(low, self.low).transpose(1, 2))  # (m, P, d)
        return _normalise(torch.cat(out, 1))

    def _band_scores(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(n, rows): the highest |NCC| of each synthetic image's prefilter views with each real row's features."""
        n, r, d = queries.shape
        m, z, _ = features.shape
        flat = features.reshape(m * z, d).T.contiguous()
        out = torch.empty(n, m)
        step = max(1, self.budget // max(1, r * m * z))
        for i in range(0, n, step):
            block = queries[i : i + step]
            scores = (block.reshape(-1, d) @ flat).abs_().view(len(block), r, m, z)
            out[i : i + step] = scores.amax(dim=(1, 3))
        return out

    def _exact(self, band: _Band, rows: torch.Tensor) -> tuple[list[Match], list[Match]]:
        """The best exact match of every synthetic image among the given real rows (n, k), in this band: on raw pixels,
        and in the whole-frame band also with both sides blurred (empty elsewhere): noise mixed into a copy mostly lies
        above the blur's cut-off."""
        n, k = rows.shape
        trackers = {sigma: _Best(torch.full((n,), -1.0), [()] * n) for sigma in (0.0, self.sigma)}
        first_view = self._view(band, slice(0, 1))
        q, view_side = first_view.shape[1], first_view.shape[-1]
        unfolded = q * max(t * t * (view_side - t + 1) ** 2 for t in band.sides)  # the synthetic windows, per image
        zooms = self._zoom_sides() if band.zoom else []
        windows = max(((self.native - s + 1) ** 2 * (s * s + q) for s in zooms), default=0)
        per_candidate = q * view_side**2 + self.native**2 + windows + 27 * view_side**2
        k_step = max(1, min(k, (self.budget - unfolded) // per_candidate))
        step = max(1, self.budget // (unfolded + k_step * per_candidate))
        sigmas = [0.0, self.sigma] if band.zoom and self.sigma > 0 else [0.0]
        for i in range(0, n, step):
            images = slice(i, min(n, i + step))
            views = self._view(band, images)  # (b, Q, V, V)
            located: dict[int, torch.Tensor] = {}
            for sigma in sigmas:
                blurred = _smooth(views, sigma)
                for j in range(0, k, k_step):
                    candidates = self.rows[rows[images, j : j + k_step]]  # (b, kc, N, N)
                    best = trackers[sigma]
                    best.first, best.k0, best.sigma = i, j, sigma
                    # blurred: the same frame only (shifts; the scaled copies are caught raw, noise or not)
                    for side in band.sides if sigma == 0 else [t for t in band.sides if t == view_side]:
                        self._slide_real(blurred, candidates, side, sigma, best)
                    if zooms:  # the blurred pass looks where the raw pass found each candidate's crop
                        located[j] = self._zoom(blurred, candidates, zooms, sigma, best, located.get(j) if sigma else None)
        raw, blurred_best = trackers[0.0], trackers[self.sigma]
        matches = [self._match(m, float(raw.score[m]), raw.info[m], band, rows) for m in range(n)]
        if len(sigmas) == 1:
            return matches, []
        return matches, [self._match(m, float(blurred_best.score[m]), blurred_best.info[m], band, rows) for m in range(n)]

    def _slide_real(self, views: torch.Tensor, candidates: torch.Tensor, side: int, sigma: float, best: _Best) -> None:
        """Real templates at `side` (their central crop within the shift margin) slid over the synthetic views."""
        b, q, v = views.shape[0], views.shape[1], views.shape[-1]
        kc = candidates.shape[1]
        margin = self.margin(v, side)
        template = _smooth(_resize(candidates.flatten(0, 1).unsqueeze(1), side), sigma)
        template = template[:, 0, margin : side - margin, margin : side - margin]
        t = template.shape[-1]
        template = _normalise(template.reshape(b, kc, t * t))
        windows = F.unfold(views.reshape(b * q, 1, v, v), t)  # (b*Q, t*t, L)
        spread = _window_spread(windows, self.family.min_contrast)  # (b*Q, L)
        positions = windows.shape[-1]
        windows = windows.view(b, q, t * t, positions).transpose(1, 2).reshape(b, t * t, q * positions)
        ncc = torch.bmm(template, windows) / spread.view(b, 1, q * positions)  # (b, kc, Q*L)
        best.keep(ncc, ("slide", side, margin, positions))

    def _zoom(
        self,
        views: torch.Tensor,
        candidates: torch.Tensor,
        sides: list[int],
        sigma: float,
        best: _Best,
        where: torch.Tensor | None,
    ) -> torch.Tensor:
        """Crop-and-resize. First where (unless given): the synthetic view downscaled to every other crop side, slid
        over the real candidates; then, around the best crop of each candidate (side and corner +-1), the crops
        magnified to the view's side as the family defines them (then blurred by `sigma`), against the whole view in
        each pose (`views` blurred alike). Returns where, (b, kc, 3): crop side, top, left."""
        b, q, v = views.shape[0], views.shape[1], views.shape[-1]
        kc, n = candidates.shape[1], self.native
        if where is None:
            flat = candidates.reshape(b * kc, 1, n, n)
            top = torch.full((b, kc), -1.0)
            where = torch.zeros((b, kc, 3), dtype=torch.long)
            for side in sides[::2]:
                template = _normalise(_resize(views, side).reshape(b, q, side * side))
                windows = F.unfold(flat, side)  # (b*kc, s*s, L)
                spread = _window_spread(windows, self.family.min_contrast)
                positions = windows.shape[-1]
                windows = windows.view(b, kc, side * side, positions).transpose(1, 2).reshape(b, side * side, kc * positions)
                ncc = (torch.bmm(template, windows) / spread.view(b, 1, kc * positions)).abs().nan_to_num(0.0)
                value, position = ncc.amax(1).view(b, kc, positions).max(-1)
                better = value > top
                top = torch.where(better, value, top)
                width = n - side + 1
                found = torch.stack([torch.full_like(position, side), position // width, position % width], -1)
                where = torch.where(better[..., None], found, where)
        steps = torch.tensor([(a, c, d) for a in (-1, 0, 1) for c in (-1, 0, 1) for d in (-1, 0, 1)])
        tried = (where[:, :, None, :] + steps).reshape(-1, 3)  # (b*kc*27, 3)
        image = torch.arange(b).repeat_interleave(kc * len(steps))
        candidate = torch.arange(kc).repeat_interleave(len(steps)).repeat(b)
        tried[:, 0] = tried[:, 0].clamp(min(sides), max(sides))
        tried[:, 1:] = torch.minimum(tried[:, 1:].clamp_min(0), (n - tried[:, 0])[:, None])
        magnified = torch.empty(len(tried), v * v)
        for side in sorted(set(tried[:, 0].tolist())):
            pick = torch.nonzero(tried[:, 0] == side).flatten()
            span = torch.arange(side)
            down = (tried[pick, 1][:, None] + span)[:, :, None]
            across = (tried[pick, 2][:, None] + span)[:, None, :]
            crops = candidates[image[pick][:, None, None], candidate[pick][:, None, None], down, across]  # (E, s, s)
            magnified[pick] = _smooth(_resize(crops, v), sigma).reshape(len(pick), v * v)
        target = _normalise(views.reshape(b, q, v * v))
        ncc = torch.bmm(_normalise(magnified).view(b, -1, v * v), target.transpose(1, 2)).clamp(-1.0, 1.0).nan_to_num(0.0)
        view = ncc.abs().argmax(-1).flatten()  # (b * kc * 27,): each entry's best view
        signed = ncc.flatten(0, 1).gather(1, view[:, None])[:, 0]
        per_image = signed.abs().view(b, -1).argmax(-1)  # the best entry of each image of the block
        for i, entry in enumerate((per_image + torch.arange(b) * (len(tried) // b)).tolist()):
            side, crop_top, crop_left = (int(t) for t in tried[entry])
            info = ("zoom", side, int(candidate[entry]), crop_top, crop_left, int(view[entry]), 1 if signed[entry] >= 0 else -1)
            best.offer(i, float(signed[entry].abs()), info)
        return where

    def _match(self, image: int, score: float, info: tuple[Any, ...], band: _Band, rows: torch.Tensor) -> Match:
        if not info:
            return Match(0.0, 1, 0, self.real_names[0], self.synthetic_names[0], "identity", "whole", 1.0, (0, 0))
        k0, sigma, kind, side = info[:4]
        if kind == "slide":  # ncc (b, kc, Q*L): rows are candidates, columns view * L + position
            margin, positions, index, columns, sign = info[4:]
            candidate, rest = divmod(index, columns)
            view, position = divmod(rest, positions)
            y, x = divmod(position, math.isqrt(positions))
        else:  # a magnified crop: its candidate, corner in the real image, the view it matched
            candidate, y, x, view, sign = info[4:]
            margin = 0
        row = int(rows[image, k0 + candidate])
        pose, channel = view % 8, view // 8
        dihedral = DIHEDRAL[(4 - pose) % 4] if pose < 4 else DIHEDRAL[pose]  # the inverse pose: real -> synthetic
        if kind == "zoom":
            what = "zoom"
        elif band.name == "whole" and side == self.native:
            what = "whole"
        else:
            what = "scaled"
        offset = (y, x) if kind == "zoom" else (y - margin, x - margin)
        return Match(
            score=float(score),
            sign=sign,
            real=row // self.real_views,
            real_channel=self.real_names[row % self.real_views],
            synthetic_channel=self.synthetic_names[channel],
            dihedral=dihedral,
            kind=what,
            scale=round(side / self.native, 3),
            offset=(int(offset[0]), int(offset[1])),
            smoothed=sigma > 0,
        )


# --- tensor helpers ------------------------------------------------------------------------------------


@dataclass
class _Best:
    """The best |NCC| of every synthetic image so far and where it was found; `first`, `k0` and `sigma` say which block
    of images, which candidates and which pass (raw, or both sides blurred) the next results come from."""

    score: torch.Tensor
    info: list[tuple[Any, ...]]
    first: int = 0
    k0: int = 0
    sigma: float = 0.0

    def keep(self, ncc: torch.Tensor, geometry: tuple[Any, ...]) -> None:
        """Per image of the block (ncc's first axis), its best |NCC| with where it lies in `ncc` (decoded by `_match`)."""
        ncc = ncc.clamp_(-1.0, 1.0).nan_to_num_(0.0)
        flat = ncc.flatten(1)
        value, where = flat.abs().max(dim=1)
        for offset in range(len(value)):
            index = int(where[offset])
            sign = 1 if float(flat[offset, index]) >= 0 else -1
            self.offer(offset, float(value[offset]), (*geometry, index, ncc.shape[2], sign))

    def offer(self, offset: int, score: float, info: tuple[Any, ...]) -> None:
        """Image `first + offset` found `score` where `info` says; kept when above its best so far."""
        image = self.first + offset
        if score > float(self.score[image]):
            self.score[image] = score
            self.info[image] = (self.k0, self.sigma, *info)


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear, antialiased resize of (..., H, W) to side x side (a no-op when already that size)."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    shape = images.shape
    flat = images.reshape(-1, 1, shape[-2], shape[-1])
    out = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*shape[:-2], side, side)


def _smooth(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (..., H, W) with `sigma` pixels (reflected borders), as two matrix products; unchanged for
    sigma <= 0."""
    if sigma <= 0:
        return images
    down = _blur_matrix(images.shape[-2], sigma).to(images.dtype)
    across = _blur_matrix(images.shape[-1], sigma).to(images.dtype)
    return down @ images @ across.T


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) M with M @ x = x blurred along its first axis by a Gaussian of `sigma` (taps to 2.5 sigma),
    the border reflected (as `F.pad(mode="reflect")`)."""
    radius = min(math.ceil(2.5 * sigma), size - 1)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for offset, weight in zip(range(-radius, radius + 1), kernel.tolist()):
            j = i + offset
            j = -j if j < 0 else (2 * (size - 1) - j if j >= size else j)  # reflect without repeating the edge
            matrix[i, j] += weight
    return matrix.float()


def _channel_views(images: torch.Tensor, *, always: bool) -> tuple[list[str], torch.Tensor]:
    """(N, V, H, W): each channel and the channels' mean; one grey view for a single channel (or, unless
    `always`, channels that are all equal: a grey image stored as RGB)."""
    c = images.shape[1]
    if c == 1 or (not always and bool((images == images[:, :1]).all())):
        return ["grey"], images[:, :1]
    names = [f"channel {i}" for i in range(c)] + ["channel mean"]
    return names, torch.cat([images, images.mean(1, keepdim=True)], 1)


def _standardise(images: torch.Tensor) -> torch.Tensor:
    """Each (H, W) image to zero mean and unit standard deviation (flat images stay 0)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    centred = images - mean
    std = centred.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return torch.where(std > 0, centred / std.clamp_min(1e-30), torch.zeros_like(centred))


def _shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(..., H, W) moved by (dy, dx) pixels, the border filled by repeating the edge."""
    if dy == 0 and dx == 0:
        return images
    shape = images.shape
    pad = max(abs(dy), abs(dx))
    flat = F.pad(images.reshape(-1, 1, shape[-2], shape[-1]), (pad, pad, pad, pad), mode="replicate")
    top, left = pad - dy, pad - dx
    return flat[..., top : top + shape[-2], left : left + shape[-1]].reshape(shape)


def _white(vectors: torch.Tensor, white: torch.Tensor | None) -> torch.Tensor:
    """Normalised feature rows mapped through a whitening matrix and normalised to unit length again."""
    if white is None:
        return vectors
    mapped = vectors @ white
    norm = mapped.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, mapped / norm.clamp_min(1e-30), mapped)


def _normalise(vectors: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-norm rows over the last dimension; rows without variation become 0 (they match nothing)."""
    centred = vectors - vectors.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    scale = math.sqrt(vectors.shape[-1])
    return torch.where(norm > 1e-6 * scale, centred / norm.clamp_min(1e-30), torch.zeros_like(centred))


def _window_spread(windows: torch.Tensor, min_contrast: float) -> torch.Tensor:
    """sqrt(sum (x - mean)^2) of every unfolded window (B, P, L) -> (B, L); windows under the contrast floor get inf."""
    count = windows.shape[1]
    total = windows.sum(1)
    energy = windows.square().sum(1) - total.square() / count
    spread = energy.clamp_min(0).sqrt()
    return torch.where(spread > min_contrast * math.sqrt(count), spread, torch.full_like(spread, math.inf))


def _dihedral(images: torch.Tensor) -> torch.Tensor:
    """(n, V, H, W) -> (n, V * 8, H, W): for each view its 8 poses (DIHEDRAL order)."""
    flipped = images.flip(-1)
    poses = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)] + [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    return torch.stack(poses, 2).flatten(1, 2)


def _expand_rows(images: torch.Tensor, views: int) -> torch.Tensor:
    """Real image indices (n, k) -> their rows (n, k * views)."""
    return (images.unsqueeze(-1) * views + torch.arange(views)).flatten(1)


def _per_image(scores: torch.Tensor, views: int) -> torch.Tensor:
    """(n, m * Vr) row scores -> (n, m): the best channel of each real image."""
    return scores.view(scores.shape[0], -1, views).amax(-1)


# --- a set against its source -----------------------------------------------------------------------------

REAL_START_METHODS = ("mtt",)  # methods that always start from real training images (methods/mtt.py: real_init)
SHOWN_MATCHES = 3  # matches named in a refusal


def initialised_from_real(synthetic: SyntheticSet) -> bool:
    """Whether the set records that it started from real training images (`init: real`, or a method that always does)."""
    return synthetic.hyperparameters.get("init") == "real" or synthetic.method in REAL_START_METHODS


def real_pixels(dataset: Dataset) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Every real image of every split in [0, 1] pixels, and (split, index) of each."""
    images, where = [], []
    for name in SPLITS:
        split = dataset.split(name)
        images.append(dataset.denormalize(split.images))
        where += [(name, i) for i in range(len(split))]
    return torch.cat(images), where


def screen_set(
    synthetic: SyntheticSet,
    dataset: Dataset,
    thresholds: CopyThresholds | None = None,
    family: ScreenFamily | None = None,
    *,
    batch_elements: int = DEFAULT_BATCH_ELEMENTS,
) -> dict[str, Any]:
    """The near-copy screen of a set against every real image of every split of its source; `passed` when no synthetic
    image is within SSIM >= `ssim`, RMS distance <= `l2_rms` (as they are), |NCC| >= `ncc` over the family (screened as
    stored, without clamping to [0, 1]) or, blurred, |NCC| >= `ncc_smoothed` over whole-frame flips, shifts and zooms.
    JSON-serialisable; `matches` names the real image (split, index) of each near-copy and how it was transformed."""
    thresholds = thresholds or CopyThresholds()
    family = family or ScreenFamily()
    normalised = renormalize(synthetic, dataset).to(dataset.device)
    mean = torch.tensor(dataset.mean, device=normalised.device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=normalised.device).view(1, -1, 1, 1)
    real, where = real_pixels(dataset)
    neighbours = find_neighbours(dataset.denormalize(normalised), real, batch_elements=batch_elements)
    search = Search(normalised * std + mean, real, native_side=dataset.source.size, family=family)
    found = search.run()
    raw = torch.tensor([f.raw.score for f in found], dtype=torch.float64)
    smoothed = torch.tensor([f.smoothed.score if f.smoothed else 0.0 for f in found], dtype=torch.float64)
    by_ssim = (neighbours.ssim >= thresholds.ssim).cpu()
    by_l2 = (neighbours.l2_rms <= thresholds.l2_rms).cpu()
    by_ncc = raw >= thresholds.ncc
    by_smoothed = smoothed >= thresholds.ncc_smoothed
    rules = (("ncc", by_ncc), ("ncc_smoothed", by_smoothed), ("ssim", by_ssim), ("rms_distance", by_l2))
    flagged = torch.nonzero(by_ssim | by_l2 | by_ncc | by_smoothed).flatten().tolist()
    rows = []
    for i in flagged:
        hits = [name for name, hit in rules if bool(hit[i])]
        match = found[i].raw if hits[0] == "ncc" else found[i].smoothed
        if hits[0] in ("ncc", "ncc_smoothed") and match is not None:
            real_index, how = match.real, match.to_dict()
        else:
            real_index, how = int(neighbours.ssim_index[i] if hits[0] == "ssim" else neighbours.l2_index[i]), {}
        split, index = where[real_index]
        row = {"image": i, "rules": hits, "split": split, "index": index}
        row |= {"ssim": float(neighbours.ssim[i]), "rms_distance": float(neighbours.l2_rms[i]), **how}
        rows.append(row)
    top = int(torch.argmax(raw))
    top_smoothed = int(torch.argmax(smoothed))
    nearest_smoothed = found[top_smoothed].smoothed
    return {
        "passed": not flagged,
        "near_copies": len(flagged),
        "images": len(synthetic),
        "real_images_searched": len(real),
        "splits_searched": {name: len(dataset.split(name)) for name in SPLITS},
        "source": {"name": dataset.name, "md5": dataset.source.md5},
        "rule": {
            "ssim_at_least": thresholds.ssim,
            "rms_distance_at_most": thresholds.l2_rms,
            "ncc_at_least": thresholds.ncc,
            "ncc_smoothed_at_least": thresholds.ncc_smoothed,
            "family": family.describe(search.native),
        },
        "highest_ssim": float(neighbours.ssim.max()),
        "lowest_rms_distance": float(neighbours.l2_rms.min()),
        "highest_ncc": float(raw[top]),
        "highest_ncc_smoothed": float(smoothed[top_smoothed]),
        "nearest": {"split": where[found[top].raw.real][0], **found[top].raw.to_dict()},
        "nearest_smoothed": None
        if nearest_smoothed is None
        else {"split": where[nearest_smoothed.real][0], **nearest_smoothed.to_dict()},
        "initialised_from_real": initialised_from_real(synthetic),
        "matches": rows,
    }


def refusal(screen: dict[str, Any]) -> str:
    """One line saying why export refuses a set the screen flagged: which real images (split, index), how they were
    transformed, and for a set that started from real images that it stayed too close to them."""
    shown = []
    for row in screen["matches"][:SHOWN_MATCHES]:
        if row["rules"][0] in ("ncc", "ncc_smoothed"):
            how = f"{row['transform']}; |NCC| {abs(row['ncc']):.3f}"
        else:
            how = f"SSIM {row['ssim']:.3f}, RMS distance {row['rms_distance']:.4f}"
        shown.append(f"image {row['image']} ~ {row['split']} image {row['index']} ({how})")
    more = len(screen["matches"]) - len(shown)
    text = (
        f"refusing to export: {screen['near_copies']} of {screen['images']} images are near-copies of real images of "
        f"{screen['source']['name']}: {'; '.join(shown)}{f'; and {more} more' if more > 0 else ''}"
    )
    if screen.get("initialised_from_real"):
        text += (
            "; the set was initialised from real images (init: real) and stayed too close to its initial images: "
            "distil it further or from noise (init: noise)"
        )
    return text + "; run `medistill audit` on the set to see them"


__all__ = [
    "DIHEDRAL",
    "Found",
    "Match",
    "ScreenFamily",
    "Search",
    "initialised_from_real",
    "real_pixels",
    "refusal",
    "screen_set",
    "shift_pixels",
]
