"""The ConvNet used as the default backbone in dataset distillation (DC, DM, MTT)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medistill.errors import ConfigError

NORMS = ("instance", "batch", "group", "none")
POOLINGS = ("avg", "max", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; valid choices: {', '.join(choices)}")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build a normalisation layer for ``channels`` feature maps.

    ``"instance"`` is ``GroupNorm(channels, channels)``: per-sample, per-channel
    normalisation with an affine transform, as in the DC/MTT reference code.
    """
    _check_choice("norm", norm, NORMS)
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


def make_activation(activation: str) -> nn.Module:
    """Build an activation layer by name."""
    _check_choice("activation", activation, ACTIVATIONS)
    if activation == "relu":
        return nn.ReLU(inplace=True)
    if activation == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    return nn.Sigmoid()


FEW_CHANNELS = 3  # input channels up to which a CPU bf16 convolution asks oneDNN for its weight gradient alone


class _FewChannelConv(torch.autograd.Function):
    """A convolution whose backward asks oneDNN for the input and weight gradients only, never the bias,
    and sums the bias gradient itself. Its backward is made of differentiable operations, so it can be differentiated again
    (MTT), and it works under torch.func transforms (the experts' vmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any
    ) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias, ctx.stride, ctx.padding, ctx.dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(  # oneDNN, never asked for the bias
            grad, x, weight, None, ctx.stride, ctx.padding, ctx.dilation, False, [0, 0], 1, [needs_x, needs_weight, False]
        )
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and needs_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``, except under CPU bf16 autocast with at most `FEW_CHANNELS` input channels (the first
    layer on 1- and 3-channel images): its backward then asks oneDNN for the weight gradient alone and
    sums the bias gradient itself, where oneDNN's bf16 backward asked for both together (as autograd
    asks) is several times slower for so few input channels (`benchmarks/bf16_kernels.py`). Its forward
    and input gradient are oneDNN's as usual; both parameter gradients accumulate in fp32 and round once
    to bf16, as oneDNN's do. fp32 and GPU convolutions are ``nn.Conv2d``'s own."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        few = (
            self.in_channels <= FEW_CHANNELS
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        )
        if not (few and input.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
            return super()._conv_forward(input, weight, bias)
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return _FewChannelConv.apply(
                input.to(dtype),
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
                self.stride,
                self.padding,
                self.dilation,
            )


class AvgPool(nn.AvgPool2d):
    """2x2, stride-2 average pooling, as ``nn.AvgPool2d(2, 2)`` (a trailing odd row or column is dropped).

    A bf16 map on the CPU is pooled as the mean of its four strided quarter-grids, added pairwise in
    bf16 (three roundings where PyTorch's kernel accumulates in fp32 and rounds once): PyTorch's CPU
    pooling kernel for bf16 is scalar code, several times slower than these three vectorised adds, and
    its backward likewise. Every other dtype and device uses ``nn.AvgPool2d`` itself, so fp32 results
    are unchanged.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return super().forward(x)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        columns = x[..., 0::2] + x[..., 1::2]
        return (columns[..., 0::2, :] + columns[..., 1::2, :]) * 0.25


def make_pool(pooling: str) -> nn.Module:
    """Build a 2x2, stride-2 pooling layer by name (``"none"`` keeps the size)."""
    _check_choice("pooling", pooling, POOLINGS)
    if pooling == "avg":
        return AvgPool()
    if pooling == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


def first_padding(in_channels: int, image_size: int) -> int:
    """The first conv's padding: 3 for 28-px input or 1-channel input, else 1.

    This is the reference geometry: it pads a 1-channel image by 3, so a 28x28 MNIST-like image
    becomes 32x32 after the first conv (32 -> 16 -> 8 -> 4 with depth 3) and a 1-channel 32x32
    image 36x36 (36 -> 18 -> 9 -> 4). The reference crashes on 3-channel 28x28 input; padding it
    by 3 as well gives the same 28 -> 32 geometry for every channel count.
    """
    return 3 if image_size == 28 or in_channels == 1 else 1


class ConvNet(nn.Module):
    """``depth`` blocks of conv3x3 -> norm -> activation -> pool2x2, then one linear layer.

    The first conv is padded as `first_padding` says, the others by 1. The classifier's input
    size is derived from the padding and the pooling, so any channel count and any square size
    works as long as the feature map does not shrink to nothing.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        pooling: str = "avg",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError(f"ConvNet depth must be at least 1, got {depth}")
        if norm == "group" and width % 4:
            raise ConfigError(f"ConvNet norm 'group' needs a width divisible by 4, got {width}")

        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for index in range(depth):
            padding = first_padding(in_channels, image_size) if index == 0 else 1
            size += 2 * padding - 2
            layers += [
                Conv2d(channels, width, kernel_size=3, padding=padding),
                make_norm(norm, width),
                make_activation(activation),
                make_pool(pooling),
            ]
            channels = width
            if pooling != "none":
                size //= 2
        if size < 1:
            raise ConfigError(f"image size {image_size} is too small for a ConvNet of depth {depth} with pooling")
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened penultimate features, shape ``(N, embed_dim)``."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
