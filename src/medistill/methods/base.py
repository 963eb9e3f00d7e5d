"""The method registry: every way of producing a training set (baselines and distillation) by name.

A method is a config dataclass with the reference defaults plus one function
`run(dataset, ipc, config, context) -> SyntheticSet`. The CLI, the study runner and the
benchmarks go through `distill()` and never special-case a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medistill.artifact import SyntheticSet
from medistill.configfile import check_settings
from medistill.data.dataset import Dataset, memory_bound
from medistill.errors import ConfigError
from medistill.registry import Registry
from medistill.runtime import check_seed
from medistill.train.protocol import TrainProtocol

DSA_EVAL_EPOCHS = 1000
PLAIN_EVAL_EPOCHS = 300


@dataclass
class RunContext:
    """Per-run settings shared by every method."""

    seed: int = 0
    progress: bool = False
    checkpoint_dir: Path | None = None
    resume: bool = False
    log: Callable[[str], None] = field(default=lambda message: None)

    def __post_init__(self) -> None:
        self.seed = check_seed(self.seed)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and how its output is evaluated by default."""

    name: str
    run: Callable[[Dataset, int, Any, RunContext], SyntheticSet]
    config_class: type
    summary: str
    eval_augment: str | None = None  # DSA strategy used when evaluating its output, None for plain training
    uses_ipc: bool = True
    synthetic: bool = True  # False when the output is real images (random, full, herding, kcenter): never share those
    supports_multilabel: bool = True
    demo_rank: int | None = None  # lower = preferred by `medistill demo`; None = never used there
    demo_settings: dict[str, Any] = field(default_factory=dict)  # settings sized for a laptop CPU
    # Settings under the caller's for an IPC, for a method whose reference has no single default (MTT)
    ipc_defaults: Callable[[int], dict[str, Any]] | None = None
    # A differentially private method: the subsampled releases a run with these recorded settings makes (what its
    # privacy record must account for); None for every other method, whose sets never carry a privacy record.
    private_releases: Callable[[dict[str, Any]], int] | None = None

    @property
    def setting_names(self) -> frozenset[str]:
        """The settings this method has: its config's fields."""
        return frozenset(f.name for f in dataclasses.fields(self.config_class))

    def networks(self, settings: dict[str, Any]) -> list[str]:
        """The architecture the method's own passes train (its `model` setting, given or default);
        none for a method without one."""
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        return [str(settings.get("model", fields["model"].default))] if "model" in fields else []

    def default_protocol(self, model: str = "convnet") -> TrainProtocol:
        """The reference evaluation protocol: 1000 epochs with DSA, else 300 without."""
        epochs = DSA_EVAL_EPOCHS if self.eval_augment else PLAIN_EVAL_EPOCHS
        return TrainProtocol(epochs=epochs, augment=self.eval_augment, model=model)


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (names are unique)."""
    return METHODS.add(spec.name, spec)


get_method = METHODS.get
list_methods = METHODS.names


def make_config(spec: MethodSpec, overrides: dict[str, Any] | None = None) -> Any:
    """The method's config with its defaults, updated by `overrides` (unknown keys are refused)."""
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    known = spec.setting_names
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"method '{spec.name}' has no setting(s) {', '.join(unknown)}; its settings: {', '.join(sorted(known)) or 'none'}"
        )
    overrides = check_settings(spec.config_class, overrides, f"method '{spec.name}'")
    try:
        return spec.config_class(**overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad settings for method '{spec.name}': {exc}") from None


def resolve_config(spec: MethodSpec, ipc: int, config: dict[str, Any] | Any | None) -> Any:
    """A config instance as it is; else the method's config from its IPC defaults (if any) updated by `config`."""
    if isinstance(config, spec.config_class):
        return config
    given = {k.replace("-", "_"): v for k, v in (config or {}).items()}
    return make_config(spec, {**(spec.ipc_defaults(ipc) if spec.ipc_defaults else {}), **given})


# What learning a set costs per image, beyond the dataset: its pixels as float32 four times over (the images, their
# gradient, the optimiser's momentum, one more copy), and, for one class's images at a time, the activations a
# network pass keeps for its backward pass (about four 128-channel float32 maps per pixel, as the ConvNet's).
SET_COPIES = 4
ACTIVATION_BYTES_PER_PIXEL = 128 * 4 * 4


def check_ipc(dataset: Dataset, ipc: int, method: str, *, needs_real_images: bool = True) -> None:
    """Refuse an IPC below 1, above the images a class has when the method draws real images, or (a set the
    method learns, or any multi-label set) one whose images would need more than the memory bound."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"IPC must be a whole number, at least 1, got {ipc!r}")
    real_subset = method in list_methods() and not get_method(method).synthetic
    if dataset.is_multilabel or not real_subset:
        pixels = dataset.image_size**2
        per_ipc = dataset.num_classes * pixels * dataset.channels * 4 * SET_COPIES + pixels * ACTIVATION_BYTES_PER_PIXEL
        needed, bound = ipc * per_ipc, memory_bound()
        if needed > bound:
            raise ConfigError(
                f"IPC {ipc} is too large for {dataset.name}: learning {ipc * dataset.num_classes} images of "
                f"{dataset.image_size}x{dataset.image_size}x{dataset.channels} needs about {needed / 2**30:.1f} GiB "
                f"(the images with gradients and optimiser state, and a network's activations on one class's images), "
                f"more than the bound of {bound / 2**30:.1f} GiB; the largest IPC within it is {bound // per_ipc}"
            )
    if dataset.is_multilabel or not needs_real_images:
        return
    for name, count in zip(dataset.label_names, dataset.class_counts()):
        if count < ipc:
            raise ConfigError(
                f"IPC {ipc} is larger than class '{name}' of {dataset.name}, which has {count} training image(s); "
                f"method '{method}' needs {ipc} real images per class"
            )


# Settings that only say how this machine does the work (where it keeps logs and caches, how many
# MTT experts it trains at once, how long it may spend on them): they do not change the set, a run
# may be resumed with them changed, and a local path has no business in result.json or a bundle's card.
MACHINE_SETTINGS = ("tensorboard", "buffer_root", "experts_parallel", "max_expert_minutes")


def distill(
    method: str,
    dataset: Dataset,
    ipc: int,
    config: dict[str, Any] | Any | None = None,
    *,
    context: RunContext | None = None,
) -> SyntheticSet:
    """Run a registered method on a dataset and return its training set (with provenance filled in)."""
    spec = get_method(method)
    if dataset.is_multilabel and not spec.supports_multilabel:
        raise ConfigError(f"method '{spec.name}' does not support the multi-label dataset '{dataset.name}'")
    config = resolve_config(spec, ipc, config)
    context = context or RunContext()
    result = spec.run(dataset, ipc, config, context)
    result.hyperparameters = {**recorded_settings(config), **result.hyperparameters}
    return result


def recorded_settings(config: Any) -> dict[str, Any]:
    """A method's settings as recorded with its result and checkpoints: all but `MACHINE_SETTINGS`."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in MACHINE_SETTINGS}


def new_set(dataset: Dataset, images: Any, labels: Any, *, method: str, ipc: int | None, seed: int, **extra: Any) -> SyntheticSet:
    """A `SyntheticSet` that carries the dataset's normalisation and provenance."""
    return SyntheticSet(
        images=images.detach().cpu(),
        labels=labels.detach().cpu(),
        mean=dataset.mean,
        std=dataset.std,
        task=dataset.task,
        label_names=list(dataset.label_names),
        source=dataset.describe(),
        method=method,
        ipc=ipc,
        seed=seed,
        **extra,
    )


__all__ = [
    "MethodSpec",
    "RunContext",
    "check_ipc",
    "distill",
    "get_method",
    "list_methods",
    "make_config",
    "new_set",
    "register_method",
    "resolve_config",
]
