"""The two CPU bf16 kernels medistill replaces, against its replacements; prints JSON and writes results/bf16_kernels.json.

- Average pooling (2x2, stride 2) of a 128 x 32 x 32 map, forward and backward: PyTorch's `avg_pool2d`
  against `models.convnet.AvgPool` (three strided adds), in bf16, and PyTorch's in fp32 for scale.
- The first layer's weight and bias gradients (1 input channel, 28 px padded by 3, 128 outputs):
  oneDNN's `convolution_backward` as autograd calls it (both in one call) in bf16 and fp32, and for the
  weight alone in bf16, against `models.convnet.Conv2d`'s backward under bf16 autocast (oneDNN for the
  weight alone, a sum for the bias).
- For scale, what bf16 gains on the ConvNet's 128-channel 3x3 convolutions at the sizes MTT's IPC 1
  student (2 images) and a 10-image chunk run them: forward, input gradient and weight gradient in fp32
  and bf16, with the achieved GFLOP/s.
- For scale, the elementwise kernels around them on the first block's map (128 x 32 x 32, 2 and 10
  images): ReLU and its backward, a product, a sum, instance norm forward and backward, and a dtype cast,
  in fp32 and bf16 (PyTorch's CPU kernels; bf16 is converted to fp32 and back inside each).
- MTT's student at IPC 1 (2 random 28-px images, 20 steps, no augmentation), split by phase: the 20
  forward passes, the 20 first backward passes (with a graph) and the one backward through the whole
  unroll, in fp32 and under bf16, through `methods.mtt.Unroll`'s own step.

Each time is the best of `--repeats` calls (of `--repeats` // 6 unrolls, at least 3, for the MTT student), in CPU
seconds, on `--threads` torch threads.

    python benchmarks/bf16_kernels.py [--threads 1] [--repeats 30] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: python benchmarks/bf16_kernels.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result
from medistill.methods.experts import FlatModel
from medistill.methods.mtt import Unroll
from medistill.models.convnet import AvgPool, Conv2d, ConvNet


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` calls after three warm-up calls, in CPU milliseconds."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1000 * min(times)


def pooling(batch: int, repeats: int) -> dict[str, float]:
    """Forward + backward of 2x2 average pooling on (batch, 128, 32, 32)."""
    def run(pool: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> float:
        x = torch.randn(batch, 128, 32, 32, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, 128, 16, 16, dtype=dtype)
        return best_ms(lambda: torch.autograd.grad(pool(x), x, grad), repeats)

    return {"pytorch_bf16_ms": run(lambda x: F.avg_pool2d(x, 2, 2), torch.bfloat16),
            "medistill_bf16_ms": run(AvgPool(), torch.bfloat16),
            "pytorch_fp32_ms": run(lambda x: F.avg_pool2d(x, 2, 2), torch.float32)}


def first_layer_weight_gradient(batch: int, repeats: int) -> dict[str, float]:
    """The weight and bias gradients of a 1-channel 3x3 convolution, 28 px padded by 3 (output 128 x 32 x 32)."""
    x = torch.randn(batch, 1, 28, 28)
    grad = torch.randn(batch, 128, 32, 32)
    conv = Conv2d(1, 128, kernel_size=3, padding=3)

    def onednn(dtype: torch.dtype, bias: bool) -> float:
        args = (grad.to(dtype), x.to(dtype), conv.weight.detach().to(dtype), [128], [1, 1], [3, 3], [1, 1], False, [0, 0], 1)
        return best_ms(lambda: torch.ops.aten.convolution_backward(*args, [False, True, bias]), repeats)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    ours = best_ms(lambda: torch.autograd.grad(out, (conv.weight, conv.bias), grad.to(out.dtype), retain_graph=True), repeats)
    return {"onednn_bf16_weight_and_bias_ms": onednn(torch.bfloat16, True), "onednn_bf16_weight_only_ms": onednn(torch.bfloat16, False),
            "medistill_bf16_weight_and_bias_ms": ours, "onednn_fp32_weight_and_bias_ms": onednn(torch.float32, True)}


def wide_convolution(batch: int, size: int, repeats: int) -> dict[str, float]:
    """oneDNN's 128 -> 128 channel 3x3 convolution (padding 1) on a (batch, 128, size, size) map, per kernel and dtype."""
    gflop = 2 * batch * size * size * 128 * 128 * 9 / 1e9
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, grad = torch.randn(batch, 128, size, size, dtype=dtype), torch.randn(batch, 128, size, size, dtype=dtype)
        weight = torch.randn(128, 128, 3, 3, dtype=dtype)
        geometry = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        kernels = {"forward": lambda: torch.ops.aten.convolution(x, weight, None, *geometry),
                   "input_gradient": lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, *geometry, [True, False, False]),
                   "weight_gradient": lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, *geometry, [False, True, False])}
        for kernel, fn in kernels.items():
            ms = best_ms(fn, repeats)
            out[f"{kernel}_{name}_ms"] = ms
            out[f"{kernel}_{name}_gflops"] = gflop / (ms / 1000)
    return out


def elementwise(batch: int, repeats: int) -> dict[str, float]:
    """PyTorch's CPU elementwise and instance-norm kernels on a (batch, 128, 32, 32) map, fp32 against bf16."""
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = torch.randn(batch, 128, 32, 32, dtype=dtype), torch.randn(batch, 128, 32, 32, dtype=dtype)
        gamma, beta = torch.randn(128, dtype=dtype), torch.randn(128, dtype=dtype)
        _, mean, rstd = torch.ops.aten.native_group_norm(x, gamma, beta, batch, 128, 32 * 32, 128, 1e-5)
        other = torch.bfloat16 if dtype == torch.float32 else torch.float32
        kernels = {"relu": lambda: torch.relu(x),
                   "relu_backward": lambda: torch.ops.aten.threshold_backward(y, x, 0),
                   "product": lambda: x * y,
                   "sum": lambda: x + y,
                   "instance_norm_forward": lambda: torch.ops.aten.native_group_norm(x, gamma, beta, batch, 128, 32 * 32, 128, 1e-5),
                   "instance_norm_backward": lambda: torch.ops.aten.native_group_norm_backward(
                       y, x, mean, rstd, gamma, batch, 128, 32 * 32, 128, [True, True, True]),
                   "cast_to_other_dtype": lambda: x.to(other)}
        for kernel, fn in kernels.items():
            out[f"{kernel}_{name}_ms"] = best_ms(fn, repeats)
    return out


def mtt_student(repeats: int, steps: int = 20) -> dict[str, float]:
    """One MTT IPC 1 unroll of a 1-channel 28-px ConvNet on 2 images, timed by phase, fp32 and bf16.

    The steps are `methods.mtt.plain_unroll`'s, through the same `Unroll.step_loss` and `Unroll.distance`,
    with a clock between the phases."""
    net = ConvNet(1, 2, 28)
    student = FlatModel(net)
    start = student.flatten(net)
    images = torch.randn(2, 1, 28, 28, requires_grad=True)
    target = start + 0.01 * torch.randn_like(start)  # one problem for both precisions
    everything = torch.arange(2)
    out: dict[str, float] = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        problem = Unroll(student, start, target, images, torch.tensor([0, 1]),
                         torch.tensor(0.01, requires_grad=True), [everything] * steps, [0] * steps, augment=None, bf16=bf16)
        phases: dict[str, list[float]] = {"forward": [], "first_backward": [], "final_backward": []}
        for _ in range(repeats + 1):  # the first unroll warms up
            spent = dict.fromkeys(phases, 0.0)
            theta = start.clone().requires_grad_(True)
            for k in range(steps):
                tick = time.process_time()
                loss = problem.step_loss(theta, problem.images[problem.batches[k]], k)
                tock = time.process_time()
                theta = theta - problem.syn_lr * torch.autograd.grad(loss, theta, create_graph=True)[0]
                spent["forward"] += tock - tick
                spent["first_backward"] += time.process_time() - tock
            tick = time.process_time()
            torch.autograd.grad(problem.distance(theta), (problem.images, problem.syn_lr))
            spent["final_backward"] = time.process_time() - tick
            for phase, seconds in spent.items():
                phases[phase].append(seconds)
        for phase, times in phases.items():
            out[f"{phase}_{name}_ms"] = 1000 * min(times[1:])
        out[f"unroll_{name}_ms"] = sum(out[f"{phase}_{name}_ms"] for phase in phases)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    add_out_argument(parser, "bf16_kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"threads": args.threads, "repeats": args.repeats,
              "pooling_forward_backward": {f"batch_{n}": pooling(n, args.repeats) for n in (2, 10)},
              "first_layer_weight_gradient": {f"batch_{n}": first_layer_weight_gradient(n, args.repeats) for n in (2, 10)},
              "wide_convolution": {f"batch_{n}_{size}px": wide_convolution(n, size, args.repeats) for n in (2, 10) for size in (16, 8)},
              "elementwise": {f"batch_{n}": elementwise(n, args.repeats) for n in (2, 10)},
              "mtt_student": mtt_student(max(3, args.repeats // 6))}
    print(json.dumps(report, indent=1))
    write_result("bf16_kernels", report, path=args.out)


if __name__ == "__main__":
    main()
