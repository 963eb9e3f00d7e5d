"""(ε, δ) accounting for the differentially private methods, done by Opacus's accountants.

A private run is a composition of Gaussian mechanisms, each one a (noise multiplier σ, sampling
rate q, steps) entry of the accountant's history: the per-iteration matches on Poisson-subsampled
real images, and, unless the class counts are public, one full-data release of the noisy class
counts. ε is always the accountant's `get_epsilon(δ)` on that history; calibration finds, by
bisection over the same call, the smallest σ (to a relative tolerance) whose ε stays within the
target. The state of a run's accounting is its history, which is plain data derived from (σ, q)
and the step count, so a resumed run accounts exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, TypeGuard

from medistill.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")
PUBLIC_COUNTS = "public: the guarantee assumes the per-class training counts are public and does not protect them"
SIGMA_TOLERANCE = 1e-3  # relative: calibrated σ is within 0.1% of the smallest σ that meets the target
SIGMA_CEILING = 1e4


class BudgetExceeded(ConfigError):
    """A step would spend more privacy than the run's budget allows."""


History = list[tuple[float, float, int]]


def count_release(count_noise_multiplier: float | None) -> History:
    """The one full-data release of the noisy class counts, or none when the counts are public (None)."""
    return [] if count_noise_multiplier is None else [(count_noise_multiplier, 1.0, 1)]


def release_history(sigma: float, sample_rate: float, steps: int, count_noise_multiplier: float | None) -> History:
    """The accountant's history of a private run: the count release (`count_release`), then `steps` subsampled
    releases at σ. What a run charges and what export recomputes a record from."""
    return [*count_release(count_noise_multiplier), (sigma, sample_rate, steps)]


def accountant_version() -> str:
    """The accounting library and its version, as recorded with every private set."""
    import opacus

    return f"opacus {opacus.__version__}"


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε of a composition of subsampled Gaussian mechanisms [(σ, q, steps), ...] at δ, by the chosen Opacus accountant."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant '{accountant}'; choose one of {', '.join(ACCOUNTANTS)}")
    entries = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    account = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    account.history = entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best RDP order is the largest one it tries
        return float(account.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, fixed: History, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (within SIGMA_TOLERANCE) such that `fixed` + [(σ, q, steps)] stays within `target_epsilon`."""

    def eps(sigma: float) -> float:
        return epsilon_of([*fixed, (sigma, sample_rate, steps)], delta, accountant)

    floor = epsilon_of(fixed, delta, accountant)
    if floor >= target_epsilon:
        raise ConfigError(
            f"the class-count release alone spends ε = {floor:.3g} of the budget {target_epsilon:g}; "
            "raise --epsilon, raise count_noise_multiplier or pass --public-class-counts"
        )
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > SIGMA_CEILING:
            raise ConfigError(
                f"no noise multiplier up to {SIGMA_CEILING:g} reaches ε = {target_epsilon:g} in {steps} steps "
                f"at sampling rate {sample_rate:g}; allow a larger ε or fewer iterations"
            )
    while high - low > SIGMA_TOLERANCE * high:
        middle = (low + high) / 2
        low, high = (low, middle) if eps(middle) <= target_epsilon else (middle, high)
    return high


@dataclass
class PrivacySettings:
    """What a private run is asked for: a budget (ε, δ) or a noise multiplier, the clip norm, the sampling rate."""

    epsilon: float | None = None  # target ε; with noise_multiplier unset, σ is calibrated to it
    delta: float = 1e-5
    noise_multiplier: float | None = None  # σ given; the run reports the ε it reaches (and stays within epsilon if set)
    clip_norm: float = 1.0  # C: every per-example contribution is clipped to this L2 norm
    sample_rate: float = 0.1  # q: each real training image joins an iteration's batch with this probability (Poisson)
    public_class_counts: bool = False  # True: the per-class counts are public; False: released once with Gaussian noise
    count_noise_multiplier: float = 30.0  # σ of the one-off class-count release (L2 sensitivity 1), when counts are private
    accountant: str = "rdp"  # "rdp" or "prv" (Opacus)

    def check(self) -> None:
        if self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError("a private method needs --epsilon (to calibrate the noise) or --noise-multiplier")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"epsilon must be positive, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be non-negative, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be positive, got {self.clip_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not self.count_noise_multiplier > 0:
            raise ConfigError(f"count_noise_multiplier must be positive, got {self.count_noise_multiplier}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant '{self.accountant}'; choose one of {', '.join(ACCOUNTANTS)}")


class PrivacyLedger:
    """One run's accounting: σ (given or calibrated), the fixed releases, and the steps spent so far.

    `charge()` is called before every subsampled release and refuses (BudgetExceeded) one that
    would take ε past the budget; `spent` is set from the loop's iteration on resume.
    """

    def __init__(self, settings: PrivacySettings, planned_steps: int, mechanism: str) -> None:
        settings.check()
        if planned_steps < 1:
            raise ConfigError(f"a private run needs at least one step, got {planned_steps}")
        self.settings, self.planned_steps, self.mechanism = settings, planned_steps, mechanism
        self.count_sigma = None if settings.public_class_counts else settings.count_noise_multiplier
        if settings.noise_multiplier is not None:
            self.sigma = float(settings.noise_multiplier)
        else:
            assert settings.epsilon is not None  # check(): without a noise multiplier there is a budget
            if math.isinf(settings.epsilon):
                self.sigma = 0.0  # no noise: clipping and sampling only, no guarantee (epsilon is infinite)
            else:
                self.sigma = calibrate_noise(
                    settings.epsilon,
                    settings.delta,
                    count_release(self.count_sigma),
                    settings.sample_rate,
                    planned_steps,
                    settings.accountant,
                )
        self.budget = settings.epsilon if settings.epsilon is not None else math.inf
        self.spent = 0
        planned = self.epsilon_after(planned_steps)
        if planned > self.budget:
            raise BudgetExceeded(
                f"{planned_steps} steps at noise multiplier {self.sigma:g} and sampling rate {settings.sample_rate:g} reach "
                f"ε = {planned:.4g} > the budget {self.budget:g} (δ = {settings.delta:g}); at most {self.steps_within_budget()} "
                "steps fit: lower the iterations or raise the noise multiplier"
            )

    def history(self, steps: int | None = None) -> History:
        steps = self.spent if steps is None else steps
        return release_history(self.sigma, self.settings.sample_rate, steps, self.count_sigma)

    def epsilon_after(self, steps: int) -> float:
        return epsilon_of(self.history(steps), self.settings.delta, self.settings.accountant)

    def steps_within_budget(self) -> int:
        """The most steps whose ε stays within the budget (bisection over the accountant)."""
        low, high = 0, self.planned_steps
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.epsilon_after(middle) <= self.budget else (low, middle - 1)
        return low

    def charge(self, steps: int = 1) -> None:
        """Spend `steps` releases, refusing any past the planned steps (ε grows with steps, and the plan was checked)."""
        after = self.spent + steps
        if after > self.planned_steps:
            raise BudgetExceeded(
                f"stopping before step {after}: it would exceed the privacy budget ε = {self.budget:g} "
                f"(δ = {self.settings.delta:g}, {self.planned_steps} steps planned)"
            )
        self.spent = after

    def record(self) -> dict[str, Any]:
        """The guarantee as plain data: what the artifact, result.json, the dataset card and the audit report."""
        s = self.settings
        return {
            "guarantee": "(epsilon, delta)-differential privacy with respect to the training images (add/remove one image)",
            "epsilon": self.epsilon_after(self.spent),
            "delta": s.delta,
            "epsilon_budget": s.epsilon,
            "mechanism": self.mechanism,
            "clip_norm": s.clip_norm,
            "noise_multiplier": self.sigma,
            "noise_calibrated": s.noise_multiplier is None,
            "sample_rate": s.sample_rate,
            "sampling": "Poisson",
            "steps": self.spent,
            "class_counts": (
                PUBLIC_COUNTS
                if s.public_class_counts
                else f"released once with Gaussian noise (σ = {s.count_noise_multiplier:g})"
            ),
            "history": [list(entry) for entry in self.history()],
            "accountant": s.accountant,
            "accountant_library": accountant_version(),
        }


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def verify_record(record: Any, settings: dict[str, Any], planned_steps: int) -> dict[str, Any]:
    """A set's privacy record checked against its own settings and recomputed by the accountant, or a ConfigError.

    The record must name a known accountant, agree with the settings the set was made with (δ, C, q, the
    count release), account exactly `planned_steps` subsampled releases at its σ (plus the one count
    release when the counts were private), and state the ε that the accountant computes from that history.
    """

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"the set's privacy record {why}; it is not the record of this set's run")

    if not isinstance(record, dict):
        raise refuse("is not a mapping")
    fields = {
        "epsilon": _number,
        "delta": lambda v: _number(v) and 0 < v < 1,
        "noise_multiplier": lambda v: _number(v) and 0 <= v < math.inf,
        "sample_rate": lambda v: _number(v) and 0 < v <= 1,
        "clip_norm": lambda v: _number(v) and 0 < v < math.inf,
        "steps": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "accountant": lambda v: v in ACCOUNTANTS,
        "history": lambda v: isinstance(v, list),
    }
    for name, valid in fields.items():
        if not valid(record.get(name)):
            raise refuse(f"has no valid '{name}' (found {str(record.get(name))[:40]!r})")
    for name in ("delta", "sample_rate", "clip_norm", "accountant"):
        if settings.get(name) != record[name]:
            raise refuse(f"says {name} = {record[name]!r} but the set was made with {settings.get(name)!r}")
    if record["steps"] != planned_steps:
        raise refuse(f"accounts {record['steps']} releases but the set's settings make {planned_steps}")
    public_counts = settings.get("public_class_counts") is True
    count_sigma: Any = settings.get("count_noise_multiplier")  # unchecked input: checked just below
    if not public_counts and not (_number(count_sigma) and 0 < count_sigma < math.inf):
        raise refuse(f"comes with private class counts but no valid count noise multiplier ({str(count_sigma)[:40]!r})")
    history = release_history(
        float(record["noise_multiplier"]),
        float(record["sample_rate"]),
        planned_steps,
        None if public_counts else float(count_sigma),
    )
    if [list(entry) for entry in history] != record["history"]:
        raise refuse(f"has the history {str(record['history'])[:80]}, not {[list(e) for e in history]} of its own mechanism")
    if settings.get("noise_multiplier") is not None and settings["noise_multiplier"] != record["noise_multiplier"]:
        raise refuse(f"says σ = {record['noise_multiplier']} but the set was made with σ = {settings['noise_multiplier']}")
    try:
        epsilon = epsilon_of(history, record["delta"], record["accountant"])
    except (ArithmeticError, ValueError) as exc:
        raise refuse(f"has a mechanism the accountant cannot evaluate ({type(exc).__name__})") from None
    if not (epsilon == record["epsilon"] or math.isclose(epsilon, record["epsilon"], rel_tol=1e-6)):
        raise refuse(
            f"states ε = {record['epsilon']:.6g}, but the {record['accountant']} accountant gives ε = {epsilon:.6g} for it"
        )
    budget = settings.get("epsilon")
    if _number(budget) and epsilon > budget * (1 + 1e-9):
        raise refuse(f"reaches ε = {epsilon:.6g}, past the run's budget {budget:g}")
    return {**record, "epsilon": epsilon, "class_counts": PUBLIC_COUNTS if public_counts else record.get("class_counts")}


def is_guarantee(record: dict[str, Any] | None) -> bool:
    """Whether a privacy record states a differential-privacy guarantee: a finite ε (σ = 0 gives ε = ∞, no guarantee)."""
    return record is not None and isinstance(record.get("epsilon"), (int, float)) and math.isfinite(record["epsilon"])


def privacy_markdown(record: dict[str, Any] | None) -> list[str]:
    """Markdown lines stating a set's differential-privacy guarantee (or its absence).

    Only a record `methods.privacy_check.verified_privacy` checked reaches a card or an audit report; this states what it
    covers."""
    if record is None:
        return [
            "## Differential privacy",
            "",
            "No formal guarantee: this set was not made by a differentially private method.",
            "",
        ]
    if not is_guarantee(record):
        return [
            "## Differential privacy",
            "",
            f"**No formal guarantee**: this set was made by a private method's pipeline without noise (noise multiplier "
            f"σ = {record.get('noise_multiplier')}, ε = ∞): clipping and sampling alone bound nothing.",
            "",
        ]
    from medistill.markdown import cell

    counts = cell(record["class_counts"])
    return [
        "## Differential privacy",
        "",
        f"**(ε = {record['epsilon']:.4g}, δ = {record['delta']:g})-differentially private** with respect to the training images "
        "(adding or removing one image). The guarantee covers the released images and, when they were noised, the released "
        "class counts; the method, its settings, the seed and the class names are public choices. "
        f"Mechanism: {cell(record['mechanism'])}; clip norm C = {record['clip_norm']:g}, "
        f"noise multiplier σ = {record['noise_multiplier']:.4g}, "
        f"{cell(record['sampling'])} sampling rate q = {record['sample_rate']:g}, {record['steps']} steps; "
        f"class counts {counts}; "
        f"accountant {cell(record['accountant'])} ({cell(record.get('accountant_library'))}), "
        "ε recomputed from this record by the accountant. "
        f"Randomness: {cell(record.get('randomness', 'not recorded'))}.",
        "",
        "Each release made from the same training data spends its own budget: two sets (or a set and a model) released "
        "from these images together guarantee at most the composition of their (ε, δ), not the larger ε alone.",
        "",
    ]


__all__ = [
    "ACCOUNTANTS",
    "PUBLIC_COUNTS",
    "BudgetExceeded",
    "PrivacyLedger",
    "PrivacySettings",
    "accountant_version",
    "calibrate_noise",
    "epsilon_of",
    "is_guarantee",
    "privacy_markdown",
    "release_history",
    "verify_record",
]
