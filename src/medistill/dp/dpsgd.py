"""The baseline a hospital would otherwise use: share a classifier trained with DP-SGD (Opacus) instead of a private set.

Each network is trained on the real training split with Opacus's `PrivacyEngine` (Poisson
batches, per-example clipping to C, Gaussian noise σC on the summed gradient, σ calibrated by the
engine's accountant to (ε, δ) for the planned epochs; ε = ∞ trains with clipping and no noise) and
scored on the test split exactly like an evaluation network. The Poisson batches and the noise are
drawn from generators seeded by the run's secret (`medistill.dp.randomness`), never by `--seed`
(which seeds the network's initialisation only); with `torchcsprng` installed, Opacus's `secure_mode`
draws both from the operating system instead. The record says which. Images use the same fixed public
normalisation as the private distillation methods, and the network is the evaluation protocol's.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from medistill import __version__
from medistill.atomic import atomic_write
from medistill.data.dataset import Dataset
from medistill.dp.accounting import ACCOUNTANTS, accountant_version, epsilon_of
from medistill.dp.mechanism import public_view, require_per_example
from medistill.dp.randomness import SecretRandom
from medistill.errors import ConfigError
from medistill.models import create_model
from medistill.outputs import output_folder
from medistill.train import model_seeds, scores_on
from medistill.train.metrics import Scores

RESULT_NAME = "result.json"


@dataclass
class DPSGDSettings:
    """DP-SGD's training settings (public choices, not tuned on the private data)."""

    epsilon: float = 1.0  # math.inf: clipping only, no noise, no guarantee
    delta: float = 1e-5
    epochs: int = 20
    batch_size: int = 64  # expected Poisson batch: sample rate = batch_size / training images
    lr: float = 0.05
    momentum: float = 0.9
    clip_norm: float = 1.0
    model: str = "convnet"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ConfigError(f"epsilon must be positive, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not self.clip_norm > 0:
            raise ConfigError("epochs and batch size must be at least 1, lr and clip norm positive")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant '{self.accountant}'; choose one of {', '.join(ACCOUNTANTS)}")


def secure_mode_available() -> bool:
    """Whether Opacus can draw from the operating system's CSPRNG (it needs the `torchcsprng` package)."""
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        return False
    return True


SECURE_MODE = "Opacus secure_mode: torchcsprng's generator on the operating system's /dev/urandom"
SEEDED_GENERATORS = (
    "torch generators (Mersenne Twister) seeded with 63 bits each of a secret key of 256 bits of "
    "operating-system entropy drawn at run start (Opacus secure_mode needs torchcsprng, not installed)"
)


def private_generators(secret: SecretRandom, index: int) -> tuple[torch.Generator, torch.Generator]:
    """Generators for network `index`'s Poisson batches and noise, seeded from the secret."""
    sampling = torch.Generator().manual_seed(secret.seed("dpsgd-poisson-sample", index))
    noise = torch.Generator().manual_seed(secret.seed("dpsgd-gaussian-noise", index))
    return sampling, noise


def train_dpsgd(
    dataset: Dataset, settings: DPSGDSettings, seed: int, secret: SecretRandom, index: int = 0
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One network trained with DP-SGD on the (publicly normalised) training split; returns it and its guarantee.

    `seed` draws the network's initialisation (public); the batches and the noise come from `secret`."""
    from opacus import PrivacyEngine

    secure = secure_mode_available()
    sampling, noise = private_generators(secret, index)
    torch.manual_seed(seed)
    model = create_model(settings.model, dataset.channels, dataset.num_classes, dataset.image_size).to(dataset.device)
    require_per_example(model, settings.model)
    for module in model.modules():  # Opacus's backward hooks refuse in-place activations
        if getattr(module, "inplace", False):
            # torch's stubs allow only Tensor | Module for a module attribute; `inplace` is a bool (ReLU and the like)
            module.inplace = False  # type: ignore[assignment]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    n = len(dataset.train)
    # Opacus's Poisson loader takes the generator of the loader it wraps; without one it would use the global
    # generator, which the public seed set above.
    loader = DataLoader(
        TensorDataset(dataset.train.images, dataset.train.labels),
        batch_size=min(settings.batch_size, n),
        generator=None if secure else sampling,
    )
    generators = {} if secure else {"noise_generator": noise}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's note that secure_mode is off: the record says how the draws are made
        engine = PrivacyEngine(accountant=settings.accountant, secure_mode=secure)
        if math.isinf(settings.epsilon):
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=0.0,
                max_grad_norm=settings.clip_norm,
                **generators,
            )
        else:
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=settings.epsilon,
                target_delta=settings.delta,
                epochs=settings.epochs,
                max_grad_norm=settings.clip_norm,
                **generators,
            )
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus's hooks on the first layer
        for _ in range(settings.epochs):
            for x, y in loader:
                if len(x) == 0:  # an empty Poisson batch
                    continue
                optimizer.zero_grad(set_to_none=True)
                criterion(model(x), y).backward()
                optimizer.step()
    sigma, rate = float(optimizer.noise_multiplier), float(loader.sample_rate)
    steps = sum(count for _, _, count in engine.accountant.history)
    record = {
        "guarantee": "(epsilon, delta)-differential privacy of the trained model with respect to the training images",
        "epsilon": epsilon_of([(sigma, rate, steps)], settings.delta, settings.accountant),
        "delta": settings.delta,
        "epsilon_budget": settings.epsilon,
        "mechanism": "DP-SGD (Opacus): per-example gradient clipping, Gaussian noise on the batch sum",
        "clip_norm": settings.clip_norm,
        "noise_multiplier": sigma,
        "sample_rate": rate,
        "sampling": "Poisson",
        "steps": steps,
        "accountant": settings.accountant,
        "accountant_library": accountant_version(),
        "randomness": SECURE_MODE if secure else SEEDED_GENERATORS,
    }
    return model._module, record


def run_dpsgd(
    dataset: Dataset, settings: DPSGDSettings, *, num_models: int = 2, seed: int = 0, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train `num_models` DP-SGD networks (own seeds), score them on the test split and write result.json to `out_dir`."""
    if dataset.is_multilabel:
        raise ConfigError("the DP-SGD baseline supports single-label datasets only")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / RESULT_NAME).exists():
        raise ConfigError(f"{out} already holds a finished run ({RESULT_NAME}); choose another --out")
    if out is not None:
        out = output_folder(out, files=(RESULT_NAME,))
    start = time.perf_counter()
    public = public_view(dataset)
    scores, records = Scores(), []
    secret = SecretRandom.fresh()
    for index, model_seed in enumerate(model_seeds(seed, num_models)):
        network, record = train_dpsgd(public, settings, model_seed, secret, index)
        acc, auc = scores_on(network, public)
        scores.acc.append(acc)
        scores.auc.append(auc)
        records.append(record)
    result = {
        "dataset": dataset.name,
        "method": "dp-sgd",
        "ipc": None,
        "seed": seed,
        **scores.summary(),
        "wall_seconds": time.perf_counter() - start,
        "eval_models": num_models,
        "settings": asdict(settings),
        "privacy": records[0],
        "source": dataset.source.to_dict(),
        "device": str(dataset.device),
        "version": __version__,
    }
    if out is not None:
        atomic_write(out / RESULT_NAME, json.dumps(result, indent=2, default=str) + "\n")
    return result


__all__ = ["DPSGDSettings", "run_dpsgd", "train_dpsgd"]
