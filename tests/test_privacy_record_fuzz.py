"""Property tests: whatever a set's privacy record or settings hold, verification returns a record that the accountant
reproduces or refuses in one line (ConfigError); it never raises anything else and never accepts an altered record."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medistill.dp.accounting import PrivacyLedger, epsilon_of
from medistill.methods.privacy_check import verified_privacy
from medistill.dp.randomness import DESCRIPTION
from medistill.errors import ConfigError
from medistill.methods.dp_dm import MECHANISM, DPDMConfig

EXAMPLES = settings(max_examples=25, deadline=None)  # a fixed budget: well under a minute in all
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def valid_set(public_counts: bool = False) -> SimpleNamespace:
    """A dp-dm set's method, settings and privacy record as a 4-iteration run records them."""
    config = DPDMConfig(iterations=4, noise_multiplier=1.0, sample_rate=0.5, public_class_counts=public_counts)
    ledger = PrivacyLedger(config, config.iterations, MECHANISM)
    ledger.spent = config.iterations
    record = {**ledger.record(), "randomness": DESCRIPTION + "; the seed governs the public draws only"}
    return SimpleNamespace(method="dp-dm", hyperparameters=dataclasses.asdict(config), extra={"privacy": record})


def check(synthetic: SimpleNamespace) -> None:
    try:
        record = verified_privacy(synthetic)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert record is not None
    history = [tuple(entry) for entry in record["history"]]
    assert record["epsilon"] == epsilon_of(history, record["delta"], record["accountant"])


def test_the_valid_record_verifies() -> None:
    for public in (False, True):
        record = verified_privacy(valid_set(public))  # type: ignore[arg-type]
        assert record is not None and math.isfinite(record["epsilon"])


@pytest.mark.slow
@EXAMPLES
@given(field=st.sampled_from(sorted(valid_set().extra["privacy"])), value=JSON)
def test_any_one_field_replaced(field, value) -> None:
    synthetic = valid_set()
    synthetic.extra["privacy"][field] = value
    check(synthetic)


@pytest.mark.slow
@EXAMPLES
@given(record=JSON)
def test_any_record(record) -> None:
    synthetic = valid_set()
    synthetic.extra["privacy"] = record
    check(synthetic)


@pytest.mark.slow
@EXAMPLES
@given(field=st.sampled_from(sorted(valid_set().hyperparameters)), value=JSON)
def test_any_one_setting_replaced(field, value) -> None:
    synthetic = valid_set()
    synthetic.hyperparameters[field] = value
    check(synthetic)


@pytest.mark.slow
@EXAMPLES
@given(sigma=st.floats(allow_nan=True, allow_infinity=True), rate=st.floats(allow_nan=True), steps=st.integers(-5, 10**6))
def test_any_mechanism_numbers(sigma, rate, steps) -> None:
    synthetic = valid_set(public_counts=True)
    record = synthetic.extra["privacy"]
    record.update(noise_multiplier=sigma, sample_rate=rate, steps=steps, history=[[sigma, rate, steps]])
    synthetic.hyperparameters.update(noise_multiplier=None, sample_rate=rate, iterations=steps)
    check(synthetic)
