"""The pipeline's stages, each timed in fp32 (the reference numerics) and in the faster variants, paired.

Sections of `python -m benchmarks.run`:

- ``peak``: this CPU's attainable peak per precision, measured, not taken from a data sheet: the best
  GFLOP/s of a large square matrix product (torch.mm, one call per size, best of several) in fp32 and
  in bf16, on the threads the benchmark runs with.
- ``stages``: per stage (DC IPC 1 and 10 per iteration, evaluation of 20 images x E epochs, one
  full-training-set epoch, K=5 evaluation, MTT IPC 1 per iteration, the expert buffer), seconds for
  each variant (fp32 with whole batches, as before cache-sized chunks: the baseline; fp32, bf16 and
  bf16 + torch.compile, all chunked on the CPU), the speed-up over the baseline in the same round, the
  achieved GFLOP/s (floating-point operations counted once per stage with torch's FlopCounterMode on
  the fp32 eager path, then divided by each variant's time) and that as a fraction of the measured peak
  of the variant's precision. Variants are interleaved round by round, so a change in machine load
  hits all of them alike; the median round is reported.
- ``precision``: accuracy of the bf16 path against fp32 over seeds: DM at IPC 10 and DC at IPC 1 on
  BreastMNIST, distilled and scored in each precision (the scoring networks trained in the same
  precision as the distillation), test ACC and AUC per seed, so a paired difference is read off.

BreastMNIST at 28 px: the ConvNet pads its first convolution by 3 at 28 px, so its geometry is the
one of 32-px input (32-16-8-4), the size the study's code used.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from medistill.methods import RunContext, distill, get_method
from medistill.microbatch import whole_batches
from medistill.pipeline import score_set
from medistill.train import TrainProtocol, evaluate, train_model

if TYPE_CHECKING:
    from benchmarks.run import Settings


@dataclass(frozen=True)
class Variant:
    """How the networks of a stage run: precision, compilation, and whether batches are cut into cache-sized chunks."""

    name: str
    bf16: bool
    compile: bool
    chunked: bool = True

    def context(self) -> AbstractContextManager[None]:
        """The block a run of this variant executes in (whole batches for the unchunked baseline)."""
        return nullcontext() if self.chunked else whole_batches()

    def settings(self, method: str | None = None) -> dict[str, Any]:
        """The switches as method settings (only those the method has when one is named)."""
        wanted = {"bf16": self.bf16, "compile": self.compile}
        if method is None:
            return wanted
        return {k: v for k, v in wanted.items() if k in get_method(method).setting_names}


# The first is the baseline every speed-up is over: fp32 with whole batches, the code before chunking.
VARIANTS = (Variant("fp32_whole_batch", False, False, chunked=False), Variant("fp32", False, False),
            Variant("bf16", True, False), Variant("bf16+compile", True, True))
BASELINE = VARIANTS[0].name


def gflops_of(fn: Callable[[], Any]) -> float:
    """Floating-point operations (GFLOP) of one call of fn, counted by torch (matrix products and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def seconds_of(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process while fn runs: on a shared machine, what the work costs on a core of its own
    (with one torch thread, CPU time is the time the work would take alone)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


# -- peak -------------------------------------------------------------------------------------------

def bench_peak(settings: Settings) -> dict[str, Any]:
    """Best GFLOP/s of two dense kernels, fp32 and bf16: torch.mm on square matrices, and a 3x3 convolution
    (stride 1, padding 1) of one wide map. Both count the operations of the plain algorithm. On the CPU
    torch.mm is the BLAS library's and the convolution oneDNN's; either can be the faster (on AMD CPUs the
    fp32 BLAS may not use the widest vector units), so the peak is the larger of the two."""
    sizes = settings.pick((1024, 2048), (1024, 2048, 3072))
    channels = settings.pick(256, 512)
    out: dict[str, Any] = {"method": "the larger of: best GFLOP/s of torch.mm(n x n, n x n) (2 n^3 operations) and of a 3x3 "
                                     f"convolution of (1, {channels}, 64, 64) to {channels} channels (direct-convolution operations); "
                                     "best of 3 calls per shape",
                           "sizes": list(sizes), "conv_channels": channels}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        calls = []
        for n in sizes:
            a = torch.randn(n, n, device=settings.device).to(dtype)
            b = torch.randn(n, n, device=settings.device).to(dtype)
            calls.append(("mm", 2 * n**3, lambda a=a, b=b: torch.mm(a, b)))
        x = torch.randn(1, channels, 64, 64, device=settings.device).to(dtype)
        w = torch.randn(channels, channels, 3, 3, device=settings.device).to(dtype)
        calls.append(("conv3x3", 2 * channels * channels * 9 * 64 * 64, lambda: torch.nn.functional.conv2d(x, w, padding=1)))
        best: dict[str, float] = {}
        for kernel, flop, fn in calls:
            fn()
            for _ in range(3):
                best[kernel] = max(best.get(kernel, 0.0), flop / seconds_of(fn) / 1e9)  # CPU seconds, see seconds_of
        out[name] = max(best.values())
        out[f"{name}_by_kernel"] = best
        print(f"peak {name}: {out[name]:.1f} GFLOP/s ({', '.join(f'{k} {v:.1f}' for k, v in best.items())})", flush=True)
    return out


# -- stages -----------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One stage: `run(variant)` returns its seconds (per the stage's unit), `count()` its GFLOP per unit."""

    name: str
    unit: str
    run: Callable[[Variant], float]
    count: Callable[[], float] | None
    variants: tuple[Variant, ...] = VARIANTS


def distill_seconds(method: str, ipc: int, config: dict[str, Any], iterations: int, settings: Settings) -> Callable[[Variant], float]:
    """Seconds per iteration of a method: (t(iterations) - t(1)) / (iterations - 1), so setup, warm-up and
    compilation (all in the first iteration) cancel out."""
    def run(variant: Variant) -> float:
        def once(n: int) -> float:
            with variant.context():
                return seconds_of(lambda: distill(method, settings.breast(), ipc, {**config, **variant.settings(method), "iterations": n},
                                                  context=RunContext(seed=0)))
        once(1)  # warm-up: builds what a method caches (MTT's expert buffer), fills torch's compile cache
        first = once(1)
        return (once(iterations) - first) / (iterations - 1)
    return run


def distill_gflops(method: str, ipc: int, config: dict[str, Any], settings: Settings) -> Callable[[], float]:
    """GFLOP of one iteration: a 2-iteration run minus a 1-iteration run (setup cancels out)."""
    def count() -> float:
        one = gflops_of(lambda: distill(method, settings.breast(), ipc, {**config, "iterations": 1}, context=RunContext(seed=0)))
        two = gflops_of(lambda: distill(method, settings.breast(), ipc, {**config, "iterations": 2}, context=RunContext(seed=0)))
        return two - one
    return count


def small_set(settings: Settings, ipc: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `ipc` training images of each class: a 20-image set on BreastMNIST."""
    data = settings.breast()
    labels = data.train.labels.view(-1)
    index = torch.cat([torch.nonzero(labels == c).view(-1)[:ipc] for c in range(data.num_classes)])
    return data.train.images[index], data.train.labels[index]


def training_seconds(images_of: Callable[[], tuple[torch.Tensor, torch.Tensor]], epochs: int, per_epoch: bool,
                     settings: Settings) -> Callable[[Variant], float]:
    """Seconds to train one network `epochs` epochs (per epoch when `per_epoch`), after a compile/warm-up run."""
    def run(variant: Variant) -> float:
        images, labels = images_of()
        protocol = TrainProtocol(epochs=epochs - 1, bf16=variant.bf16, compile=variant.compile)  # epochs + 1 are trained
        with variant.context():
            train_model(images, labels, settings.breast(), replace(protocol, epochs=1), seed=0)  # warm-up: compiles the batch shapes
            seconds = seconds_of(lambda: train_model(images, labels, settings.breast(), protocol, seed=0))
        return seconds / epochs if per_epoch else seconds
    return run


def training_gflops(images_of: Callable[[], tuple[torch.Tensor, torch.Tensor]], epochs: int, per_epoch: bool,
                    settings: Settings) -> Callable[[], float]:
    def count() -> float:
        images, labels = images_of()
        two = gflops_of(lambda: train_model(images, labels, settings.breast(), TrainProtocol(epochs=1), seed=0))  # 2 epochs are trained
        return two / 2 if per_epoch else two / 2 * epochs
    return count


def evaluation_seconds(models: int, epochs: int, settings: Settings) -> Callable[[Variant], float]:
    """Seconds of `evaluate` (train K networks and score them on the test split), sequential as on the CPU."""
    def run(variant: Variant) -> float:
        images, labels = small_set(settings)
        protocol = TrainProtocol(epochs=epochs - 1, bf16=variant.bf16, compile=variant.compile)
        with variant.context():
            evaluate(images, labels, settings.breast(), replace(protocol, epochs=1), num_models=1)  # warm-up / compile
            return seconds_of(lambda: evaluate(images, labels, settings.breast(), protocol, num_models=models))
    return run


EXPERT_STAGE = "expert_buffer_2x5"
MTT_SETTINGS = {"syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 2, "num_experts": 2, "buffer_epochs": 3, "eval_every": 0}


def expert_buffer(settings: Settings, root: str, parallel: int, bf16: bool, chunked: bool) -> tuple[float, float]:
    """(CPU seconds, peak resident MB) of building a 2-expert x 5-epoch buffer in a fresh process.

    The peak is the process's own high-water mark (VmHWM in /proc/self/status), not getrusage's
    ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec, so a child of this
    large benchmark process would report the parent's size.
    """
    code = (
        "import contextlib, re, sys, time, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from medistill.data import load_dataset\n"
        "from medistill.methods.experts import ExpertSettings, build_buffer\n"
        "from medistill.microbatch import whole_batches\n"
        f"data = load_dataset('breastmnist', root={str(settings.data_root)!r}, device=torch.device('cpu'), progress=False)\n"
        "start = time.process_time()\n"
        f"with {'contextlib.nullcontext()' if chunked else 'whole_batches()'}:\n"
        f"    build_buffer(data, ExpertSettings(epochs=5, bf16={bf16}), 2, root={root!r}, parallel={parallel}, log=lambda m: None)\n"
        "peak_kb = int(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "print(time.process_time() - start, peak_kb / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def stage_list(settings: Settings, scratch: str) -> list[Stage]:
    """The stages; `scratch` holds what they build (MTT's expert buffer)."""
    epochs = settings.pick(30, 300)
    dc = {"eval_every": 0}
    mtt = {**MTT_SETTINGS, "buffer_root": scratch}

    def full() -> tuple[torch.Tensor, torch.Tensor]:
        return settings.breast().train.images, settings.breast().train.labels

    stages = [
        Stage("dc_ipc1", "s/iteration", distill_seconds("dc", 1, dc, settings.pick(3, 6), settings),
              distill_gflops("dc", 1, dc, settings)),
        Stage("dc_ipc10", "s/iteration", distill_seconds("dc", 10, dc, 2, settings),
              distill_gflops("dc", 10, dc, settings)),
        Stage("evaluation_20_images", f"s per network, {epochs} epochs", training_seconds(lambda: small_set(settings), epochs, False, settings),
              training_gflops(lambda: small_set(settings), epochs, False, settings)),
        Stage("evaluation_full_set", "s/epoch", training_seconds(full, settings.pick(2, 3), True, settings),
              training_gflops(full, 1, True, settings)),
        Stage("evaluation_k5", f"s for 5 networks, {epochs} epochs", evaluation_seconds(5, epochs, settings), None),
        Stage("mtt_ipc1_syn_steps20", "s/iteration", distill_seconds("mtt", 1, mtt, settings.pick(11, 21), settings),  # short iterations: more of them
              distill_gflops("mtt", 1, mtt, settings), variants=VARIANTS[:3]),  # the unroll's double backward is not compiled
    ]
    return stages


def bench_stages(settings: Settings) -> dict[str, Any]:
    """Every stage in every variant, interleaved round by round; median seconds and paired speed-up."""
    rounds = settings.rounds or settings.pick(1, 3)
    peak = bench_peak(settings)
    results: dict[str, Any] = {"peak_gflops": {k: peak[k] for k in ("fp32", "bf16")}, "rounds": rounds, "stages": {}}
    scratch = tempfile.TemporaryDirectory()
    stages = stage_list(settings, scratch.name)
    known = {stage.name for stage in stages} | {EXPERT_STAGE}
    if settings.stages is not None and not settings.stages <= known:
        raise SystemExit(f"unknown stage(s) {', '.join(sorted(settings.stages - known))}; choose from {', '.join(sorted(known))}")
    for stage in stages:
        if settings.stages is not None and stage.name not in settings.stages:
            continue
        try:
            times: dict[str, list[float]] = {v.name: [] for v in stage.variants}
            for _ in range(rounds):
                for variant in stage.variants:
                    times[variant.name].append(stage.run(variant))
            gflop = stage.count() if stage.count is not None else None  # after the runs: what they build is there
        except Exception as exc:  # noqa: BLE001 - one broken stage must not sink the others' measurements
            results["stages"][stage.name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps({"stage": stage.name, **results["stages"][stage.name]}), flush=True)
            continue
        row: dict[str, Any] = {"unit": stage.unit, "gflop_per_unit": gflop, "variants": {}}
        for variant in stage.variants:
            seconds = statistics.median(times[variant.name])
            speedups = [f / s for f, s in zip(times[BASELINE], times[variant.name])]
            entry = {"seconds": seconds, "all_seconds": times[variant.name], f"speedup_over_{BASELINE}": statistics.median(speedups)}
            if gflop is not None:
                achieved = gflop / seconds
                entry |= {"gflops": achieved, "fraction_of_peak": achieved / peak["bf16" if variant.bf16 else "fp32"]}
            row["variants"][variant.name] = entry
        results["stages"][stage.name] = row
        print(json.dumps({"stage": stage.name, **row}), flush=True)  # each stage as soon as it is measured
    scratch.cleanup()
    if settings.stages is not None and EXPERT_STAGE not in settings.stages:
        return results
    with tempfile.TemporaryDirectory() as root:
        buffers = {}
        for label, parallel, bf16, chunked in (("fp32_two_at_once_whole_batch", 2, False, False),
                                               ("fp32_one_at_a_time_whole_batch", 1, False, False),
                                               ("fp32_one_at_a_time", 1, False, True), ("bf16_one_at_a_time", 1, True, True)):
            seconds, peak_mb = expert_buffer(settings, f"{root}/{label}", parallel, bf16, chunked)
            buffers[label] = {"seconds": seconds, "peak_rss_mb": peak_mb}
            print(json.dumps({"experts": label, **buffers[label]}), flush=True)
        results["stages"][EXPERT_STAGE] = buffers
    return results


# -- precision --------------------------------------------------------------------------------------

def bench_precision(settings: Settings) -> dict[str, Any]:
    """DM IPC 10, DC IPC 1 and MTT IPC 1 (on BreastMNIST unless `--precision-dataset` names another), fp32 and bf16
    end to end (distillation and scoring), per seed.

    MTT's two precisions share one fp32 expert buffer (4 experts x 12 epochs, built once): what is
    compared is the student's unroll and the scoring, not the experts.
    """
    seeds = (0, 1, 2)
    scratch = tempfile.TemporaryDirectory()
    mtt = {"iterations": settings.pick(10, 100), "num_experts": settings.pick(2, 4), "buffer_epochs": 12, "eval_every": 0,
           "buffer_root": scratch.name}
    cases = {"dm_ipc10": ("dm", 10, {"iterations": settings.pick(10, 100)}, True),
             "dc_ipc1": ("dc", 1, {"iterations": settings.pick(5, 50)}, False),
             "mtt_ipc1": ("mtt", 1, mtt, True)}
    if settings.cases is not None:
        if not settings.cases <= cases.keys():
            raise SystemExit(f"unknown case(s) {', '.join(sorted(settings.cases - cases.keys()))}; choose from {', '.join(cases)}")
        cases = {name: case for name, case in cases.items() if name in settings.cases}
    nets, epochs = settings.pick((1, 30), (2, 300))
    data = settings.precision_data()
    out: dict[str, Any] = {"dataset": data.name, "seeds": list(seeds), "networks": nets, "epochs": epochs, "cases": {}}
    for name, (method, ipc, config, augment) in cases.items():
        rows = []
        for seed in seeds:
            for variant in (VARIANTS[1], VARIANTS[2]):  # fp32 and bf16, both chunked
                synthetic = distill(method, data, ipc, {**config, **variant.settings(method)}, context=RunContext(seed=seed))
                protocol = TrainProtocol(epochs=epochs, augment="color_crop_cutout_flip_scale_rotate" if augment else None,
                                         bf16=variant.bf16)
                scores = score_set(synthetic, data, protocol, num_models=nets, seed=seed, progress=False)
                rows.append({"seed": seed, "variant": variant.name, "acc": scores.acc_mean, "acc_std": scores.acc_std,
                             "auc": scores.auc_mean, "auc_std": scores.auc_std})
                print(f"precision {name} seed {seed} {variant.name}: ACC {scores.acc_mean:.3f} AUC {scores.auc_mean:.3f}", flush=True)
        diffs = {m: [b[m] - f[m] for f, b in zip(rows[0::2], rows[1::2])] for m in ("acc", "auc")}
        shown = {k: v for k, v in config.items() if k != "buffer_root"}  # a temporary folder, not a setting
        out["cases"][name] = {"method": method, "ipc": ipc, "config": shown, "rows": rows,
                              "bf16_minus_fp32": {m: {"per_seed": d, "mean": statistics.mean(d)} for m, d in diffs.items()},
                              "mean_network_std": {m: statistics.mean(r[f"{m}_std"] for r in rows) for m in ("acc", "auc")}}
    scratch.cleanup()
    return out
