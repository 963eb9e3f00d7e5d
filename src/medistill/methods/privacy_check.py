"""Whether a set's privacy record holds: checked against the method that made it and the settings it records."""

from __future__ import annotations

from typing import Any

from medistill.artifact import SyntheticSet
from medistill.dp.accounting import verify_record
from medistill.dp.randomness import DESCRIPTION as SECRET_DESCRIPTION
from medistill.errors import ConfigError
from medistill.methods.base import get_method


def verified_privacy(synthetic: SyntheticSet) -> dict[str, Any] | None:
    """The set's privacy record, verified against its method and settings, or None for a set of a non-private method.

    A ConfigError refuses a record on a non-private method's set, a private set without one, and a record
    that its own mechanism and settings do not reproduce (`accounting.verify_record`)."""
    spec = get_method(synthetic.method)
    record = synthetic.extra.get("privacy")
    if spec.private_releases is None:
        if record is not None:
            raise ConfigError(
                f"the set carries a privacy record, but '{spec.name}' is not a "
                "differentially private method; only dp-dm and dp-dc sets carry a guarantee"
            )
        return None
    if record is None:
        raise ConfigError(f"this '{spec.name}' set has no privacy record, so its guarantee cannot be checked")
    if not isinstance(record, dict):
        raise ConfigError("the set's privacy record is not a mapping")
    if not str(record.get("randomness", "")).startswith(SECRET_DESCRIPTION):
        raise ConfigError(
            "this set was made by a version whose private draws followed its published seed, "
            "so anyone with the seed can remove the noise; make it again with this version"
        )
    try:
        releases = spec.private_releases(synthetic.hyperparameters)
    except (KeyError, TypeError, ValueError, ArithmeticError):
        raise ConfigError(f"the set's settings do not say how many releases its '{spec.name}' run made") from None
    return verify_record(record, synthetic.hyperparameters, releases)


__all__ = ["verified_privacy"]
