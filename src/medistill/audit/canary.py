"""An empirical privacy audit in one run: how much ε does a released set demonstrably spend?

The audit follows "Privacy Auditing with One (1) Training Run" (Steinke, Nasr and Jagielski, 2023):

1. Draw m canaries: out-of-distribution images (a random low-resolution pattern per channel,
   upsampled bilinearly and pushed to high contrast), one label each, round-robin over the classes.
   Their designs come from a public generator seeded by the run's seed: the audit is the attacker's
   experiment, and it may be published.
2. Put each canary into the training split independently with probability 1/2. These inclusion bits
   come from the operating system's entropy (`secrets`), never from the seed: the method cannot
   guess them.
3. Run the method once on a few real training images per class (`real_subset`: the guarantee holds
   for every training set, and a small one gives each canary more weight) plus the included canaries.
4. Score every canary from the released set alone, by each attack in `SCORES` (the released images
   regressed on the canaries, in pixels and in random ConvNets' features), guess the k best-scored
   canaries "in" and the k worst-scored "out", and count the correct guesses.
5. Turn each count into the largest ε that an (ε, δ)-DP method could produce it with, at the chosen
   confidence (`epsilon_lower_bound`); a Bonferroni correction over every (score, k) tried makes the
   best of them a valid lower bound.

A bound above the claimed ε of a private method means its guarantee does not hold (or its
implementation leaks); a bound below it is consistent with the claim, not a proof of it. For a
method without a guarantee the bound is what the audit can show, nothing more.
"""

from __future__ import annotations

import json
import math
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import Tensor

from medistill import __version__
from medistill.artifact import SyntheticSet
from medistill.atomic import atomic_write
from medistill.data.dataset import MULTI_LABEL, Dataset, Split
from medistill.errors import ConfigError, DataError
from medistill.methods.base import RunContext, distill, get_method
from medistill.registry import Registry

CANARY_AUDIT_JSON = "canary_audit.json"
DEFAULT_GUESS_COUNTS = (8, 16, 32, 64)  # fixed before any data is seen; capped at m/2
DEFAULT_DELTA = 1e-5  # δ of the bound when the released set records no guarantee
CANARY_CONTRAST = 4.0  # slope of the sigmoid that pushes a standardised pattern towards 0 and 1
SCORE_NETWORKS = 32  # random ConvNets whose embeddings the score regresses
SCORE_SEED = 0x5C0E  # their initialisations (public, fixed)
SCORE_DESCRIPTIONS = {
    "pixel": "largest least-squares coefficient of the canary when a released image of its class is regressed on that "
    "class's canaries plus a constant (flattened, centred)",
    "embedding": f"least-squares weight of the canary when the mean embedding of its class's released images is regressed on "
    f"the embeddings of that class's canaries plus a constant, under {SCORE_NETWORKS} random ConvNets stacked",
}
EPSILON_SEARCH_LIMIT = 60.0  # above this, e^ε/(1+e^ε) is 1 in float64
EPSILON_TOLERANCE = 1e-7


@dataclass(frozen=True)
class CanaryAuditConfig:
    """How the audit is run: the canaries, the guesses and the confidence of the bound."""

    canaries: int = 64
    real_per_class: int = 5  # real training images kept per class beside the canaries (0: all of them)
    canary_resolution: int = 7
    confidence: float = 0.95
    guess_counts: tuple[int, ...] = DEFAULT_GUESS_COUNTS

    def check(self, image_size: int | None = None) -> None:
        """Refuse settings the audit cannot use (one-line `ConfigError`)."""
        if self.canaries < 2:
            raise ConfigError(f"the audit needs at least 2 canaries, got {self.canaries}")
        if self.real_per_class < 0:
            raise ConfigError(f"real images per class must be 0 (all) or more, got {self.real_per_class}")
        if self.canary_resolution < 1 or (image_size is not None and self.canary_resolution > image_size):
            limit = f" and at most the image size {image_size}" if image_size is not None else ""
            raise ConfigError(f"canary resolution must be at least 1{limit}, got {self.canary_resolution}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")
        if not self.guess_counts or any(k < 1 for k in self.guess_counts):
            raise ConfigError(f"guess counts must be whole numbers >= 1, got {list(self.guess_counts)}")


def draw_canaries(
    count: int, num_classes: int, channels: int, image_size: int, *, seed: int, resolution: int = 7
) -> tuple[Tensor, Tensor]:
    """`count` canaries in pixel space [0, 1], (count, C, S, S) float32, and their labels (round-robin over the classes).

    Each is a Gaussian pattern at `resolution` x `resolution` per channel, upsampled bilinearly to S x S,
    standardised and passed through a steep sigmoid: smooth-edged, high-contrast blobs unlike any
    medical image. The same seed gives the same canaries on every machine (a CPU generator).
    """
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(count, channels, resolution, resolution, generator=generator, dtype=torch.float32)
    field = F.interpolate(patterns, size=(image_size, image_size), mode="bilinear", align_corners=False)
    flat = field.flatten(1)
    standardised = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(1e-6)
    pixels = torch.sigmoid(CANARY_CONTRAST * standardised).view_as(field)
    labels = torch.arange(count) % num_classes
    return pixels.contiguous(), labels


def draw_inclusion(count: int) -> Tensor:
    """One fair coin per canary from the operating system's entropy (never a seed): True = in the training split."""
    coins = secrets.SystemRandom()
    return torch.tensor([coins.getrandbits(1) == 1 for _ in range(count)], dtype=torch.bool)


def require_single_label(dataset: Dataset) -> None:
    """The audit's canaries each have one class: refuse a multi-label dataset in one line."""
    if dataset.is_multilabel:
        raise ConfigError(f"the canary audit needs single-label classes; '{dataset.name}' is multi-label")


def real_subset(dataset: Dataset, per_class: int) -> Dataset:
    """The dataset with the first `per_class` training images of each class (all when 0).

    A differential-privacy guarantee holds for every training set, so the audit may choose a small one:
    the fewer real images beside the canaries, the more each canary weighs in the released set, and the
    more an attack can show."""
    if per_class == 0:
        return dataset
    keep = torch.cat([torch.nonzero(dataset.train.labels == c).flatten()[:per_class] for c in range(dataset.num_classes)])
    keep = keep.sort().values
    return replace(dataset, train=Split(dataset.train.images[keep], dataset.train.labels[keep]))


def with_canaries(dataset: Dataset, pixels: Tensor, labels: Tensor, included: Tensor) -> Dataset:
    """The dataset whose training split also holds the included canaries, normalised as its own images."""
    require_single_label(dataset)
    if pixels.shape[1:] != dataset.train.images.shape[1:]:
        raise ConfigError(
            f"canaries shaped {tuple(pixels.shape[1:])} do not fit the images of {dataset.name} "
            f"{tuple(dataset.train.images.shape[1:])}"
        )
    device = dataset.device
    mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
    chosen = included.to(torch.bool).cpu()
    normalized = ((pixels[chosen].float() - mean) / std).to(device=device, dtype=dataset.train.images.dtype)
    images = torch.cat([dataset.train.images, normalized])
    train_labels = torch.cat([dataset.train.labels, labels[chosen].to(device=device, dtype=dataset.train.labels.dtype)])
    # Its own identity (a random, data-independent one): nothing cached for the source file (an MTT expert buffer)
    # may be reused for it, and nothing recorded about it depends on which canaries are in.
    source = replace(dataset.source, md5=secrets.token_hex(16))
    return replace(dataset, train=Split(images, train_labels), source=source)


def pixel_scores(synthetic_images: Tensor, synthetic_labels: Tensor, canary_images: Tensor, canary_labels: Tensor) -> Tensor:
    """Membership scores from the released images themselves: higher = more likely in the training split.

    Each released image of a class (flattened, centred) is regressed by least squares (float64) on all
    canaries of that class (flattened, centred) plus a constant; a canary's score is its largest
    coefficient over the released images of its class. It sees a set that mixes canaries in pixel space.
    """

    def centred(images: Tensor) -> Tensor:
        flat = images.detach().cpu().to(torch.float64).flatten(1)
        return flat - flat.mean(dim=1, keepdim=True)

    synthetic_labels, canary_labels = synthetic_labels.detach().cpu(), canary_labels.detach().cpu()
    scores = torch.zeros(canary_labels.shape[0], dtype=torch.float64)
    for label in torch.unique(canary_labels).tolist():
        members = torch.nonzero(canary_labels == label).flatten()
        targets = synthetic_images.detach().cpu()[synthetic_labels == label]
        if len(targets) == 0:
            continue
        design = centred(canary_images[members]).T  # (pixels, canaries of the class)
        design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=torch.float64)], dim=1)
        coefficients = torch.linalg.lstsq(design, centred(targets).T).solution  # (canaries + 1, released images)
        scores[members] = coefficients[:-1].max(dim=1).values
    return scores


def embedding_scores(
    synthetic_images: Tensor,
    synthetic_labels: Tensor,
    canary_images: Tensor,
    canary_labels: Tensor,
    *,
    networks: int = SCORE_NETWORKS,
    seed: int = SCORE_SEED,
) -> Tensor:
    """Membership scores from the released images' features: higher = more likely in the training split.

    Under each of `networks` randomly initialised
    ConvNets (the features DM matches directly and DC through its gradients), the mean embedding of a
    class's released images is regressed by least squares (float64) on the embeddings of that class's
    canaries plus a constant, the equations of all networks stacked; a canary's score is its
    coefficient. A canary in the training split pulls the released images towards its own features and
    gets a positive weight; one that was not is only correlated with them by chance. A class without
    released images gives its canaries the neutral score 0. The networks come from a fixed public seed.
    """
    from medistill.models import create_model, embedding

    synthetic_images, synthetic_labels = synthetic_images.detach().cpu().float(), synthetic_labels.detach().cpu()
    canary_images, canary_labels = canary_images.detach().cpu().float(), canary_labels.detach().cpu()
    channels, size = int(canary_images.shape[1]), int(canary_images.shape[-1])
    classes = sorted(set(canary_labels.tolist()))
    designs: dict[int, list[Tensor]] = {c: [] for c in classes}
    targets: dict[int, list[Tensor]] = {c: [] for c in classes}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for index in range(networks):
            torch.manual_seed(seed + index)
            network = create_model("convnet", channels, max(classes) + 1, size).eval()
            canary_features = embedding(network)(canary_images).double()
            synthetic_features = embedding(network)(synthetic_images).double() if len(synthetic_images) else None
            for c in classes:
                if synthetic_features is not None and bool((synthetic_labels == c).any()):
                    designs[c].append(canary_features[canary_labels == c].T)
                    targets[c].append(synthetic_features[synthetic_labels == c].mean(0))
    scores = torch.zeros(canary_labels.shape[0], dtype=torch.float64)
    for c in classes:
        if not designs[c]:
            continue
        design = torch.cat(designs[c])
        design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=torch.float64)], dim=1)
        coefficients = torch.linalg.lstsq(design, torch.cat(targets[c]).unsqueeze(1)).solution
        scores[canary_labels == c] = coefficients[:-1, 0]
    return scores


Score = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# The attacks, fixed before any data is seen; the bound is corrected for trying each of them (Bonferroni).
SCORES: Registry[Score] = Registry("canary score", {"pixel": pixel_scores, "embedding": embedding_scores})


def canary_scores(
    synthetic_images: Tensor, synthetic_labels: Tensor, canary_images: Tensor, canary_labels: Tensor
) -> dict[str, Tensor]:
    """Every registered score of every canary (images in the released set's normalised space)."""
    return {name: SCORES.get(name)(synthetic_images, synthetic_labels, canary_images, canary_labels) for name in SCORES.names()}


def guess_counts_for(canaries: int, guess_counts: Sequence[int] = DEFAULT_GUESS_COUNTS) -> list[int]:
    """The numbers k of "in" (and of "out") guesses for m canaries: the fixed list capped at m/2, without repeats."""
    return sorted({min(int(k), canaries // 2) for k in guess_counts if min(int(k), canaries // 2) >= 1})


def count_correct_guesses(scores: Tensor, included: Tensor, k: int) -> int:
    """Correct guesses when the k highest scores are guessed "in" and the k lowest "out" (ties by canary index)."""
    if 2 * k > scores.shape[0]:
        raise ConfigError(f"{2 * k} guesses need at least as many canaries, got {scores.shape[0]}")
    order = torch.argsort(scores.detach().cpu(), descending=True, stable=True)
    included = included.detach().cpu().to(torch.bool)
    return int(included[order[:k]].sum()) + int((~included[order[len(order) - k :]]).sum())


def p_value(epsilon: float, delta: float, canaries: int, guesses: int, correct: int) -> float:
    """The p-value of `correct` right out of `guesses` guesses on `canaries` canaries under the null "(ε, δ)-DP".

    Steinke, Nasr and Jagielski (2023), Theorem 5.2: with q = e^ε / (1 + e^ε),
    p = P[Bin(r, q) >= v] + 2·m·δ·max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i, clipped at 1.
    """
    if correct <= 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))
    alpha = 0.0
    if delta > 0:
        below = binom.pmf(range(correct - 1, -1, -1), guesses, q)  # P[Bin = v-1], P[Bin = v-2], ..., P[Bin = 0]
        window = 0.0
        for i, mass in enumerate(below, start=1):
            window += float(mass)
            alpha = max(alpha, window / i)
    return min(1.0, tail + 2.0 * canaries * delta * alpha)


def epsilon_lower_bound(guesses: int, correct: int, *, canaries: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε whose null "(ε, δ)-DP" is rejected at level 1 - `confidence` by `correct` of `guesses` right (0 if none).

    Found by bisection on the p-value of `p_value`.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if delta < 0 or guesses < 0 or not 0 <= correct <= guesses:
        raise ConfigError(f"need δ >= 0 and 0 <= correct <= guesses, got δ={delta}, {correct} of {guesses}")
    level = 1.0 - confidence
    if guesses == 0 or p_value(0.0, delta, canaries, guesses, correct) > level:
        return 0.0
    low, high = 0.0, EPSILON_SEARCH_LIMIT
    if p_value(high, delta, canaries, guesses, correct) <= level:
        return high
    while high - low > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(middle, delta, canaries, guesses, correct) <= level else (low, middle)
    return low


def audit_guesses(
    scores: dict[str, Tensor],
    included: Tensor,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] = DEFAULT_GUESS_COUNTS,
) -> dict[str, Any]:
    """Guesses and bounds for every (score, k), each at the Bonferroni level over all of them, and the best bound,
    valid at `confidence`."""
    canaries = int(included.shape[0])
    ks = guess_counts_for(canaries, guess_counts)
    if not ks:
        raise ConfigError(f"{canaries} canaries are too few to guess with; use at least 2")
    per_test_confidence = 1.0 - (1.0 - confidence) / (len(ks) * len(scores))
    rows: list[dict[str, Any]] = []
    for name, values in scores.items():
        for k in ks:
            correct = count_correct_guesses(values, included, k)
            bound = epsilon_lower_bound(2 * k, correct, canaries=canaries, delta=delta, confidence=per_test_confidence)
            rows.append({"score": name, "k": k, "guesses": 2 * k, "correct": correct, "epsilon_lower_bound": bound})
    best = max(rows, key=lambda row: (row["epsilon_lower_bound"], row["correct"] / row["guesses"]))
    return {
        "rows": rows,
        "best": best,
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "confidence": confidence,
        "confidence_per_test": per_test_confidence,
        "delta": delta,
    }


def run_canary_audit(
    dataset: Dataset,
    method: str,
    ipc: int,
    settings: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    config: CanaryAuditConfig = CanaryAuditConfig(),
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run `method` once on `dataset` with canaries and return the audit report (JSON-serialisable, no image in it)."""
    start = time.perf_counter()
    spec = get_method(method)
    config.check(dataset.image_size)
    pixels, labels = draw_canaries(
        config.canaries, dataset.num_classes, dataset.channels, dataset.image_size, seed=seed, resolution=config.canary_resolution
    )
    included = draw_inclusion(config.canaries)
    audited = with_canaries(real_subset(dataset, config.real_per_class), pixels, labels, included)
    log(f"canary audit: {int(included.sum())} of {config.canaries} canaries in the training split; running {spec.name}")
    settings = dict(settings or {})
    with tempfile.TemporaryDirectory(prefix="medistill-canary-") as scratch:
        if "buffer_root" in spec.setting_names and settings.get("buffer_root") is None:
            settings["buffer_root"] = scratch  # MTT's experts are trained on the audited split and thrown away with it
        synthetic = distill(spec.name, audited, ipc, settings, context=RunContext(seed=seed, progress=progress, log=log))
    scores = score_released_set(synthetic, pixels, labels)
    privacy = synthetic.extra.get("privacy") if isinstance(synthetic.extra.get("privacy"), dict) else None
    delta = float(privacy["delta"]) if privacy and privacy.get("delta") is not None else DEFAULT_DELTA
    claimed = float(privacy["epsilon"]) if privacy and privacy.get("epsilon") is not None else None
    guesses = audit_guesses(scores, included, delta=delta, confidence=config.confidence, guess_counts=config.guess_counts)
    bound = guesses["epsilon_lower_bound"]
    return {
        "dataset": dataset.name,
        "method": spec.name,
        "ipc": ipc if spec.uses_ipc else None,
        "seed": seed,
        "settings": _plain(synthetic.hyperparameters),
        "canaries": config.canaries,
        "canaries_included": int(included.sum()),
        "real_images": len(audited.train) - int(included.sum()),
        "canary_resolution": config.canary_resolution,
        "canary_design": f"Gaussian {config.canary_resolution}x{config.canary_resolution} pattern per channel, bilinear to "
        f"{dataset.image_size}x{dataset.image_size}, standardised, sigmoid(x * {CANARY_CONTRAST:g}); "
        f"labels round-robin; designs from torch.Generator seeded with {seed}",
        "scores": SCORE_DESCRIPTIONS,
        "guesses": guesses["rows"],
        "best_k": guesses["best"]["k"],
        "best_score": guesses["best"]["score"],
        "epsilon_lower_bound": bound,
        "confidence": config.confidence,
        "confidence_per_test": guesses["confidence_per_test"],
        "delta": delta,
        "claimed_epsilon": claimed,
        "contradicts_claim": claimed is not None and bound > claimed,
        "inclusion": [int(bit) for bit in included.tolist()],
        "inclusion_source": "secrets.SystemRandom (operating-system entropy), independent of the seed",
        "medistill_version": __version__,
        "wall_seconds": time.perf_counter() - start,
    }


def score_released_set(synthetic: SyntheticSet, canary_pixels: Tensor, canary_labels: Tensor) -> dict[str, Tensor]:
    """`canary_scores` of a released set, the canaries mapped into its normalisation."""
    if synthetic.task == MULTI_LABEL or synthetic.labels.ndim != 1:
        raise DataError("the released set has multi-label labels; the canary score needs one class per image")
    if synthetic.images.shape[1:] != canary_pixels.shape[1:]:
        raise DataError(
            f"the released images are {tuple(synthetic.images.shape[1:])}, the canaries {tuple(canary_pixels.shape[1:])}"
        )
    mean = torch.tensor(synthetic.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(synthetic.std, dtype=torch.float32).view(1, -1, 1, 1)
    return canary_scores(synthetic.images, synthetic.labels, (canary_pixels.float() - mean) / std, canary_labels)


def write_canary_report(report: dict[str, Any], out: Path) -> Path:
    """Write the report as `out/canary_audit.json` (atomically; the folder is created)."""
    return atomic_write(Path(out) / CANARY_AUDIT_JSON, json.dumps(report, indent=2) + "\n")


def canary_summary(report: dict[str, Any]) -> str:
    """One line: the bound, its confidence, the best guesses and whether it is consistent with the claimed ε."""
    best = next(row for row in report["guesses"] if row["k"] == report["best_k"] and row["score"] == report["best_score"])
    ipc = "full set" if report["ipc"] is None else f"ipc {report['ipc']}"
    claimed = report["claimed_epsilon"]
    verdict = (
        "claimed ε: none (no privacy guarantee recorded)"
        if claimed is None
        else f"claimed ε = {claimed:.3g} — "
        f"{'CONTRADICTED: the guarantee does not hold' if report['contradicts_claim'] else 'consistent'}"
    )
    return (
        f"{report['dataset']} {report['method']} {ipc}: empirical ε ≥ {report['epsilon_lower_bound']:.2f} at "
        f"{report['confidence'] * 100:.4g}% confidence ({report['canaries']} canaries, "
        f"best: {best['score']} score, k = {best['k']}: "
        f"{best['correct']} of {best['guesses']} guesses right); {verdict}"
    )


def _plain(value: Any) -> Any:
    """Settings as JSON types (tuples as lists, anything else unusual as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


__all__ = [
    "CANARY_AUDIT_JSON",
    "DEFAULT_DELTA",
    "DEFAULT_GUESS_COUNTS",
    "SCORES",
    "CanaryAuditConfig",
    "audit_guesses",
    "canary_scores",
    "canary_summary",
    "count_correct_guesses",
    "draw_canaries",
    "draw_inclusion",
    "embedding_scores",
    "epsilon_lower_bound",
    "guess_counts_for",
    "p_value",
    "pixel_scores",
    "real_subset",
    "require_single_label",
    "run_canary_audit",
    "score_released_set",
    "with_canaries",
    "write_canary_report",
]
