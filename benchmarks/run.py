"""Where the time goes: evaluation throughput (stacked vs sequential), full-set epochs, one study cell, DC/MTT.

    python -m benchmarks.run [--out bench.json] [--device auto|cpu|cuda] [--quick] [--sections a,b]

The JSON goes to --out (default results/bench.json) with a provenance block (benchmarks/record.py), and
every section is written as soon as it finishes, so a cut-off run keeps what it measured. Sections:

- ``throughput``: ConvNet-3 on 28x28, 1 channel / 2 classes and 3 channels / 10 classes, IPC 1/10/50,
  network-epochs per second for K stacked networks (both backends) against sequential training.
  Sequential networks are independent runs, so their rate does not depend on K; it is measured once.
- ``full_set``: seconds per network-epoch on the whole training set (BreastMNIST, and a synthetic
  11-class set of 10k images, 2k with --quick): sequential fp32, channels_last, bf16 autocast (`TrainProtocol.bf16`), K=5 stacked.
- ``equivalence``: BreastMNIST random IPC 10, K networks stacked and sequential: time and ACC/AUC.
- ``cell``: one study cell's whole evaluation (K=5, 1000 epochs with DSA, IPC 10, 11 classes,
  an OrganAMNIST-sized test split), end to end through `evaluate`.
- ``methods``: seconds per iteration of DC and MTT where they are registered (difference of two runs,
  so setup such as MTT's expert buffer is not counted).
- ``peak``, ``stages``, ``precision``: the measured peak GFLOP/s of this device, every pipeline stage in
  fp32, bf16 and bf16 + torch.compile with achieved GFLOP/s, and bf16's accuracy against fp32 over
  seeds (see `benchmarks/stages.py`).

Images in the synthetic sets are random; only their shapes matter for speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.record import add_out_argument, write_result
from benchmarks.stages import bench_peak, bench_precision, bench_stages
from medistill.augment import DEFAULT_STRATEGY
from medistill.data import load_dataset
from medistill.data.medmnist import resolve_data_root
from medistill.data.dataset import BINARY, MULTI_CLASS, DataSource, Dataset, build_dataset
from medistill.methods import RunContext, distill, get_method, list_methods
from medistill.runtime import resolve_device
from medistill.train import TrainProtocol, evaluate, model_seeds, train_model, train_stacked
from medistill.train.stacked import BACKENDS

ORGANAMNIST_TEST = 17_778  # test images of the largest 11-class MedMNIST set


@dataclass
class Settings:
    """One benchmark run: where, how big, and what is already loaded."""

    device: torch.device
    quick: bool
    data_root: Path
    stages: frozenset[str] | None = None  # the `stages` section's stages to run (None: all)
    rounds: int | None = None  # the `stages` section's rounds (None: 1 quick, 3 otherwise)
    cases: frozenset[str] | None = None  # the `precision` section's cases to run (None: all)
    precision_dataset: str = "breastmnist"  # the `precision` section's dataset: a MedMNIST flag or an npz path
    _breast: Dataset | None = None

    def breast(self) -> Dataset:
        if self._breast is None:
            self._breast = load_dataset("breastmnist", root=self.data_root, device=self.device, progress=False)
        return self._breast

    def precision_data(self) -> Dataset:
        if self.precision_dataset == "breastmnist":
            return self.breast()
        return load_dataset(self.precision_dataset, root=self.data_root, device=self.device, progress=False)

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, wall seconds) of fn(), with the device's queue drained before and after."""
    result, seconds, _ = timed_cpu(fn, device)
    return result, seconds


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process) of fn(); CPU time is the fairer figure on a shared CPU."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def synthetic_dataset(channels: int, classes: int, n_train: int, n_test: int, device: torch.device, seed: int = 0) -> Dataset:
    """A real `Dataset` of random 28x28 uint8 images with class-balanced labels (labels cycle 0..classes-1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", classes), ("test", n_test)):
        shape = (n, 28, 28, channels) if channels > 1 else (n, 28, 28)
        arrays[split] = (rng.integers(0, 256, shape, dtype=np.uint8), (np.arange(n) % classes).reshape(n, 1))
    name = f"synthetic-{channels}ch-{classes}cls"
    return build_dataset(
        name=name, task=BINARY if classes == 2 else MULTI_CLASS, label_names=[f"class {i}" for i in range(classes)],
        arrays=arrays, source=DataSource(kind="npz", name=name, path="(random)"), device=device,
    )


def train_networks(mode: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, protocol: TrainProtocol, seeds: list[int]) -> None:
    """Train one network per seed, sequentially or stacked with the named backend."""
    if mode == "sequential":
        for seed in seeds:
            train_model(images, labels, dataset, protocol, seed=seed)
    else:
        train_stacked(images, labels, dataset, protocol, seeds=seeds, backend=mode)


def rate_row(mode: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, protocol: TrainProtocol,
             seeds: list[int], settings: Settings) -> dict[str, Any]:
    """Time one training run (after a 1-epoch warm-up) and report network-epochs per second (wall and CPU time)."""
    train_networks(mode, images, labels, dataset, replace(protocol, epochs=1), seeds)
    _, seconds, cpu_seconds = timed_cpu(lambda: train_networks(mode, images, labels, dataset, protocol, seeds), settings.device)
    network_epochs = len(seeds) * protocol.epochs
    return {"mode": mode, "models": len(seeds), "epochs": protocol.epochs, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "network_epochs_per_s": network_epochs / seconds, "network_epochs_per_cpu_s": network_epochs / cpu_seconds}


def bench_throughput(settings: Settings) -> list[dict[str, Any]]:
    """Network-epochs per second, stacked (each backend, each K) against sequential."""
    ipcs = settings.pick((1, 10), (1, 10, 50))
    ks = settings.pick((1, 5, 10), (1, 5, 10, 20))
    augments = settings.pick((None,), (None, DEFAULT_STRATEGY))
    epochs = settings.pick(2, 10)
    sequential_models = settings.pick(2, 3)
    rows = []
    for channels, classes in ((1, 2), (3, 10)):
        dataset = synthetic_dataset(channels, classes, max(ipcs) * classes, 2 * classes, settings.device)
        for ipc in ipcs:
            images, labels = dataset.train.images[: ipc * classes], dataset.train.labels[: ipc * classes]
            for augment in augments:
                protocol = TrainProtocol(epochs=epochs, augment=augment)
                cell = {"channels": channels, "classes": classes, "ipc": ipc, "augment": augment}
                base = rate_row("sequential", images, labels, dataset, protocol, model_seeds(0, sequential_models), settings)
                rows.append({**cell, **base, "speedup": 1.0, "cpu_speedup": 1.0})
                for backend in BACKENDS:
                    for k in ks:
                        row = rate_row(backend, images, labels, dataset, protocol, model_seeds(0, k), settings)
                        rows.append({**cell, **row, "speedup": row["network_epochs_per_s"] / base["network_epochs_per_s"],
                                     "cpu_speedup": row["network_epochs_per_cpu_s"] / base["network_epochs_per_cpu_s"]})
                        print(f"throughput {channels}ch ipc {ipc} aug {bool(augment)} {backend} K={k}: {row['network_epochs_per_s']:.2f} net-ep/s "
                              f"(sequential {base['network_epochs_per_s']:.2f}): x{rows[-1]['speedup']:.2f} wall, "
                              f"x{rows[-1]['cpu_speedup']:.2f} CPU time", flush=True)
    return rows


def bench_full_set(settings: Settings) -> list[dict[str, Any]]:
    """Seconds per network-epoch on a whole training set, in several numeric/layout variants."""
    epochs = settings.pick(1, 3)
    size = settings.pick(2_000, 10_000)
    sets = [("breastmnist", settings.breast(), ("fp32", "channels_last", "bf16", "stacked5")),
            (f"synthetic-11cls-{size}", synthetic_dataset(1, 11, size, 11, settings.device), settings.pick(("fp32",), ("fp32", "channels_last", "bf16", "stacked5")))]
    rows = []
    for name, dataset, variants in sets:
        for variant in variants:
            images, labels = dataset.train.images, dataset.train.labels
            if variant == "channels_last":
                images = images.contiguous(memory_format=torch.channels_last)
            protocol = TrainProtocol(epochs=epochs, bf16=variant == "bf16")
            seeds = model_seeds(0, 5 if variant == "stacked5" else 1)
            mode = next(iter(BACKENDS)) if variant == "stacked5" else "sequential"
            row = rate_row(mode, images, labels, dataset, protocol, seeds, settings)
            row = {"dataset": name, "train_images": len(images), "variant": variant, **row,
                   "seconds_per_network_epoch": 1.0 / row["network_epochs_per_s"]}
            rows.append(row)
            print(f"full set {name} {variant}: {row['seconds_per_network_epoch']:.3f} s per network-epoch", flush=True)
    return rows


def scores_summary(scores: Any) -> dict[str, Any]:
    return {"acc_mean": scores.acc_mean, "acc_std": scores.acc_std, "auc_mean": scores.auc_mean, "auc_std": scores.auc_std,
            "acc": scores.acc, "auc": scores.auc}


def bench_equivalence(settings: Settings) -> dict[str, Any]:
    """BreastMNIST random IPC 10: K networks stacked and sequential, same seeds: time and accuracy."""
    breast = settings.breast()
    subset = distill("random", breast, 10, context=RunContext(seed=0))
    num_models, epochs = settings.pick((5, 50), (10, 300))
    protocol = TrainProtocol(epochs=epochs)
    result: dict[str, Any] = {"dataset": "breastmnist", "method": "random", "ipc": 10, "num_models": num_models, "epochs": epochs}
    for stacked in (True, False):
        scores, seconds, cpu_seconds = timed_cpu(
            lambda: evaluate(subset.images, subset.labels, breast, protocol, num_models=num_models, seed=0, stacked=stacked), settings.device)
        result["stacked" if stacked else "sequential"] = {"seconds": seconds, "cpu_seconds": cpu_seconds, **scores_summary(scores)}
    stacked_run, sequential_run = result["stacked"], result["sequential"]
    result["speedup"] = sequential_run["seconds"] / stacked_run["seconds"]
    result["cpu_speedup"] = sequential_run["cpu_seconds"] / stacked_run["cpu_seconds"]
    result["acc_mean_difference"] = abs(stacked_run["acc_mean"] - sequential_run["acc_mean"])
    result["acc_means_within_one_std"] = result["acc_mean_difference"] <= max(stacked_run["acc_std"], sequential_run["acc_std"])
    print(f"equivalence K={num_models} {epochs} epochs: stacked {stacked_run['seconds']:.1f}s acc {stacked_run['acc_mean']:.4f}"
          f"±{stacked_run['acc_std']:.4f}; sequential {sequential_run['seconds']:.1f}s acc {sequential_run['acc_mean']:.4f}"
          f"±{sequential_run['acc_std']:.4f}; x{result['speedup']:.2f}", flush=True)
    return result


def bench_cell(settings: Settings) -> list[dict[str, Any]]:
    """One cell's evaluation end to end: K=5, DSA, IPC 10, 11 classes, scored on an OrganAMNIST-sized test split."""
    epochs = settings.pick(10, 1000)
    dataset = synthetic_dataset(1, 11, 110, settings.pick(500, ORGANAMNIST_TEST), settings.device)
    protocol = TrainProtocol(epochs=epochs, augment=DEFAULT_STRATEGY)
    rows = []
    for stacked in (None, True, False):
        _, seconds, cpu_seconds = timed_cpu(
            lambda: evaluate(dataset.train.images, dataset.train.labels, dataset, protocol, num_models=5, seed=0, stacked=stacked), settings.device)
        label = {None: "default", True: "stacked", False: "sequential"}[stacked]
        rows.append({"mode": label, "num_models": 5, "epochs": epochs, "augment": DEFAULT_STRATEGY, "ipc": 10, "classes": 11,
                     "test_images": len(dataset.test), "seconds": seconds, "cpu_seconds": cpu_seconds})
        print(f"cell ({label}): K=5 x {epochs} epochs with DSA, IPC 10, 11 classes: {seconds:.1f}s", flush=True)
    return rows


# Small, fast settings per method; only the keys a method's config really has are passed.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "dc": {"eval_every": 0},
    "mtt": {"eval_every": 0, "num_experts": 2, "buffer_epochs": 4, "max_start_epoch": 2, "expert_epochs": 2},
}


def bench_methods(settings: Settings) -> dict[str, Any]:
    """Seconds per distillation iteration of DC and MTT: (t(n2) - t(n1)) / (n2 - n1), after a warm-up run."""
    ipc = settings.pick(1, 10)
    first, second = settings.pick((1, 2), (2, 6))
    breast = settings.breast()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in METHOD_SETTINGS:
            if name not in list_methods():
                results[name] = {"skipped": "not registered"}
                continue
            known = get_method(name).setting_names
            base = {k: v for k, v in {**METHOD_SETTINGS[name], "buffer_root": cache}.items() if k in known}

            def run(iterations: int) -> float:
                return timed(lambda: distill(name, breast, ipc, {**base, "iterations": iterations}, context=RunContext(seed=0)), settings.device)[1]

            try:
                run(1)
                t1, t2 = run(first), run(second)
            except Exception as exc:  # a method under construction must not sink the other sections
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            results[name] = {"ipc": ipc, "settings": base, "iterations": [first, second], "seconds": [t1, t2],
                             "seconds_per_iteration": (t2 - t1) / (second - first)}
            print(f"method {name}: {results[name]['seconds_per_iteration']:.3f} s/iteration (IPC {ipc})", flush=True)
    return results


SECTIONS: dict[str, Callable[[Settings], Any]] = {
    "throughput": bench_throughput,
    "equivalence": bench_equivalence,
    "cell": bench_cell,
    "full_set": bench_full_set,
    "methods": bench_methods,
    "peak": bench_peak,
    "stages": bench_stages,
    "precision": bench_precision,
}


def hardware(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_out_argument(parser, "bench")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="a small grid that a laptop CPU finishes in minutes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    parser.add_argument("--data", type=Path, default=None, help="folder with breastmnist.npz (default: $MEDISTILL_DATA, else the medmnist cache)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stages", default=None, help="the stages section's stages to run, comma-separated (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="the stages section's interleaved rounds (default: 1 quick, 3 otherwise)")
    parser.add_argument("--cases", default=None, help="the precision section's cases to run, comma-separated (default: all)")
    parser.add_argument("--precision-dataset", default="breastmnist",
                        help="the precision section's dataset: a MedMNIST flag or an npz with MedMNIST array names (default: breastmnist)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    stages, cases = (frozenset(s.strip() for s in value.split(",") if s.strip()) if value else None for value in (args.stages, args.cases))
    settings = Settings(device=resolve_device(args.device), quick=args.quick, data_root=resolve_data_root(args.data), stages=stages,
                        rounds=args.rounds, cases=cases, precision_dataset=args.precision_dataset)
    report: dict[str, Any] = {"command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
                              "quick": args.quick, "hardware": hardware(settings.device), "sections": {}}
    for name in names:
        result, seconds = timed(lambda: SECTIONS[name](settings), settings.device)
        report["sections"][name] = {"seconds": seconds, "results": result}
        written = write_result("bench", report, path=args.out, command=report["command"])
        print(f"[{name} done in {seconds:.0f}s -> {written}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
