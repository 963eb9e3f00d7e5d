"""`full`: the whole training set (the upper reference point)."""

from __future__ import annotations

from dataclasses import dataclass

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.methods.base import MethodSpec, RunContext, new_set, register_method


@dataclass
class FullConfig:
    """No settings."""


def run_full(dataset: Dataset, ipc: int, config: FullConfig, context: RunContext) -> SyntheticSet:
    return new_set(dataset, dataset.train.images, dataset.train.labels, method="full", ipc=None, seed=context.seed)


SPEC = register_method(
    MethodSpec(
        name="full",
        run=run_full,
        config_class=FullConfig,
        summary="the whole real training set (upper reference)",
        uses_ipc=False,
        synthetic=False,
    )
)
