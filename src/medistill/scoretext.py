"""Scores as text: a mean with its spread, or a plain "n=1" where one value has no spread to show."""

from __future__ import annotations


def mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """ "0.849 ± 0.009" over n > 1 values; "0.849 (n=1)" for one value, whose spread is unknown rather than zero."""
    if n <= 1:
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def record_score(record: dict, metric: str) -> str:
    """`mean_std` of a result record's test metric ("acc" or "auc") over its evaluation networks."""
    return mean_std(record[f"test_{metric}_mean"], record[f"test_{metric}_std"], len(record.get(f"test_{metric}") or []))
