"""Model registry and the small-image networks used to train and evaluate distilled data.

Every builder takes ``(in_channels, num_classes, image_size, **kwargs)`` and
returns a module mapping ``(N, in_channels, image_size, image_size)`` to
``(N, num_classes)``; each model also has ``embed(x)`` (penultimate features)
and ``embed_dim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from medistill.errors import ConfigError
from medistill.models.convnet import ConvNet, make_norm
from medistill.registry import Registry

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")
register_model = MODELS.decorator  # @register_model(name) on builder(in_channels, num_classes, image_size, **kwargs)
list_models = MODELS.names


def model_summary(name: str) -> str:
    """First line of a registered model's description (its builder's docstring)."""
    builder = MODELS.get(name)
    return (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""


def embedding(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.embed`, the penultimate features every model here has, typed (torch types module attributes loosely)."""
    return cast(Callable[[torch.Tensor], torch.Tensor], model.embed)


def create_model(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a registered model by (case-insensitive) name."""
    return MODELS.get(name)(in_channels, num_classes, image_size, **kwargs)


class MLP(nn.Module):
    """Two hidden layers of ``hidden`` units with ReLU, on flattened pixels."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.embed_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeNet-5: conv5 (6) -> pool -> conv5 (16) -> pool -> 120 -> 84 -> classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        # conv1 keeps the size (padding 2), conv2 (no padding) removes 4 pixels.
        size = (image_size // 2 - 4) // 2
        if size < 1:
            raise ConfigError(f"image size {image_size} is too small for LeNet (need at least 12)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(16 * size * size, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.embed_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class AlexNet(nn.Module):
    """Small-image AlexNet from DC's networks.py: five convs, three 2x2 max pools, one linear."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        size = image_size // 8  # every conv keeps the size; three pools halve it
        if size < 1:
            raise ConfigError(f"image size {image_size} is too small for AlexNet (need at least 8)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 128, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
        )
        self.embed_dim = 192 * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


_VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG11(nn.Module):
    """Small-image VGG-11 (DC variant), each stage followed by a 2x2 max pool.

    A pool is skipped when it would shrink the map below 2x2 before the last
    stage (so instance norm never sees a single pixel), the last pool is skipped
    at 1x1, and an adaptive average pool yields 512 features at any size.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, norm: str = "instance"):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for index, stage in enumerate(_VGG11_STAGES):
            for width in stage:
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1),
                    make_norm(norm, width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            last = index == len(_VGG11_STAGES) - 1
            if size >= (2 if last else 4):
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.embed_dim = channels
        self.classifier = nn.Linear(channels, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected when needed) identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                make_norm(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max pool, adaptive average pool.

    Instance norm by default, as the reference's ``ResNet18`` (``ResNet18BN`` is the batch-norm one).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, norm: str = "instance"):
        super().__init__()
        del image_size  # the adaptive pool makes the network size-agnostic
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            make_norm(norm, 64),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(in_planes, planes, stride, norm), BasicBlock(planes, planes, 1, norm)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@register_model("convnet")
def convnet(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """ConvNet-3, width 128, instance norm, average pooling."""
    return ConvNet(in_channels, num_classes, image_size, **kwargs)


@register_model("convnet_bn")
def convnet_bn(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """ConvNet-3 with batch norm."""
    return ConvNet(in_channels, num_classes, image_size, **{"norm": "batch", **kwargs})


@register_model("convnetd4")
def convnetd4(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """ConvNet of depth 4 (for 64x64 and larger images)."""
    return ConvNet(in_channels, num_classes, image_size, **{"depth": 4, **kwargs})


@register_model("mlp")
def mlp(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """MLP with two hidden layers of 128 units."""
    return MLP(in_channels, num_classes, image_size, **kwargs)


@register_model("lenet")
def lenet(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """LeNet-5."""
    return LeNet(in_channels, num_classes, image_size, **kwargs)


@register_model("alexnet")
def alexnet(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Small-image AlexNet."""
    return AlexNet(in_channels, num_classes, image_size, **kwargs)


@register_model("vgg11")
def vgg11(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Small-image VGG-11 with instance norm."""
    return VGG11(in_channels, num_classes, image_size, **kwargs)


@register_model("vgg11_bn")
def vgg11_bn(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Small-image VGG-11 with batch norm."""
    return VGG11(in_channels, num_classes, image_size, **{"norm": "batch", **kwargs})


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """CIFAR-style ResNet-18 with instance norm (the reference's ResNet18)."""
    return ResNet18(in_channels, num_classes, image_size, **kwargs)


@register_model("resnet18_bn")
def resnet18_bn(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """CIFAR-style ResNet-18 with batch norm (the reference's ResNet18BN)."""
    return ResNet18(in_channels, num_classes, image_size, **{"norm": "batch", **kwargs})
