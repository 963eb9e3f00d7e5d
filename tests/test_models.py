"""Shape, gradient and error checks for every registered model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medistill.errors import ConfigError
from medistill.models import ConvNet, create_model, list_models, register_model
from medistill.models import zoo
from medistill.models import convnet
from medistill.models.convnet import make_pool

NUM_CLASSES = 3


def _check_forward_backward(model: nn.Module, in_channels: int, size: int, batch: int = 2) -> None:
    x = torch.randn(batch, in_channels, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (batch, NUM_CLASSES)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_registry_has_required_models() -> None:
    required = {"convnet", "convnet_bn", "mlp", "lenet", "alexnet", "vgg11", "resnet18", "resnet18_bn"}
    assert required <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_model_shapes_and_backward(name: str, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels, NUM_CLASSES, size)
    _check_forward_backward(model, in_channels, size)
    emb = model.embed(torch.randn(2, in_channels, size, size))
    assert emb.shape == (2, model.embed_dim)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_convnet_at_64(in_channels: int) -> None:
    _check_forward_backward(ConvNet(in_channels, NUM_CLASSES, 64, width=16), in_channels, 64)


def test_convnet_and_resnet_at_128() -> None:
    _check_forward_backward(ConvNet(3, NUM_CLASSES, 128, width=8), 3, 128, batch=1)
    resnet = create_model("resnet18", 1, NUM_CLASSES, 128).eval()
    assert resnet(torch.randn(1, 1, 128, 128)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
@pytest.mark.parametrize("pooling", ["avg", "max", "none"])
def test_convnet_norm_and_pooling_options(norm: str, pooling: str) -> None:
    model = ConvNet(3, NUM_CLASSES, 28, width=8, norm=norm, pooling=pooling)
    _check_forward_backward(model, 3, 28)


def test_convnet_rgb_28_does_not_crash() -> None:
    """The DC/MTT reference hard-codes the feature size and fails on 3x28x28."""
    model = ConvNet(3, NUM_CLASSES, 28)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(("channels", "size", "expected"), [(1, 32, 128 * 4 * 4), (1, 28, 128 * 4 * 4), (3, 64, 128 * 8 * 8)])
def test_convnet_embed_size(channels: int, size: int, expected: int) -> None:
    model = ConvNet(channels, NUM_CLASSES, size)
    assert model.embed(torch.randn(2, channels, size, size)).shape == (2, expected)
    assert model.embed_dim == expected


def test_convnet_no_pooling_keeps_spatial_size() -> None:
    model = ConvNet(3, NUM_CLASSES, 8, width=4, pooling="none")
    assert model.embed_dim == 4 * 8 * 8


def test_convnet_minimum_size() -> None:
    assert ConvNet(3, NUM_CLASSES, 8, width=4).embed_dim == 4
    with pytest.raises(ConfigError, match="too small"):
        ConvNet(3, NUM_CLASSES, 7)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"norm": "layer"}, "norm"), ({"pooling": "sum"}, "pooling"), ({"activation": "gelu"}, "activation")],
)
def test_convnet_invalid_option_lists_choices(kwargs: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown {option} .*valid choices: "):
        ConvNet(1, NUM_CLASSES, 28, **kwargs)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'nope'; available: .*convnet"):
        create_model("nope", 1, NUM_CLASSES, 28)


def test_create_model_is_case_insensitive_and_forwards_kwargs() -> None:
    model = create_model("ConvNet", 3, NUM_CLASSES, 32, width=8, depth=2)
    assert isinstance(model, ConvNet)
    assert model.embed_dim == 8 * 8 * 8
    assert isinstance(create_model("convnet_bn", 1, NUM_CLASSES, 32).features[1], nn.BatchNorm2d)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo.MODELS, "_items", dict(zoo.MODELS._items))

    @register_model("tiny")
    def tiny(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    assert "tiny" in list_models()
    assert create_model("tiny", 1, NUM_CLASSES, 8)(torch.randn(2, 1, 8, 8)).shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny")(tiny)


@pytest.mark.parametrize("size", [32, 9, 4])  # 9: the 36-px ConvNet's last pool drops a row and a column
def test_bf16_pooling_on_the_cpu_is_the_average_of_each_window(size: int) -> None:
    torch.manual_seed(0)
    pool = make_pool("avg")
    x = torch.randn(2, 3, size, size).requires_grad_(True)
    reference = F.avg_pool2d(x, 2, 2)
    low = x.detach().to(torch.bfloat16).requires_grad_(True)
    out = pool(low)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    torch.testing.assert_close(out.float(), reference, atol=0.03, rtol=0.02)  # bf16 rounding, nothing more
    # first and second derivatives (MTT differentiates through the gradient), against fp32 autograd
    weight, direction = torch.randn_like(reference), torch.randn_like(x)
    (grad,) = torch.autograd.grad((out.float().square() * weight).sum(), low, create_graph=True)
    (expected,) = torch.autograd.grad((reference.square() * weight).sum(), x, create_graph=True)
    torch.testing.assert_close(grad.float(), expected, atol=0.05, rtol=0.05)
    (second,) = torch.autograd.grad((grad.float() * direction).sum(), low)
    (expected_second,) = torch.autograd.grad((expected * direction).sum(), x)
    torch.testing.assert_close(second.float(), expected_second, atol=0.05, rtol=0.05)


def test_fp32_pooling_is_pytorchs_kernel_bit_for_bit() -> None:
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(make_pool("avg")(x), F.avg_pool2d(x, 2, 2))


def test_few_channel_convolutions_under_cpu_bf16_take_the_same_derivatives(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = ConvNet(1, NUM_CLASSES, 28, width=8)
    first = model.features[0]
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    params = (first.weight, first.bias)

    def derivatives() -> list[torch.Tensor]:
        """Output, first derivatives and a second derivative (through the gradient, as MTT takes it)."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = first(x)
        loss = (out.float().square() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        grads = torch.autograd.grad(loss, (x, *params), create_graph=True)
        second = torch.autograd.grad(sum(g.float().square().sum() for g in grads[1:]), x)[0]
        return [type(out.grad_fn).__name__, out.float(), *(g.float() for g in grads), second]

    ours = derivatives()
    monkeypatch.setattr(convnet, "FEW_CHANNELS", 0)  # every convolution on autocast's own kernels
    plain = derivatives()
    assert ours[0] == "_FewChannelConvBackward" and plain[0] != ours[0]
    assert torch.equal(ours[1], plain[1])  # the same forward kernel
    for mine, theirs in zip(ours[2:], plain[2:]):
        assert (mine - theirs).abs().max() <= 0.02 * theirs.abs().max()  # bf16 rounding, nothing more
    assert torch.equal(first(x), F.conv2d(x, first.weight, first.bias, padding=first.padding))  # fp32: nn.Conv2d's own


def test_few_channel_convolutions_work_under_vmap_and_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = ConvNet(1, NUM_CLASSES, 28, width=8)
    params = {k: torch.stack([v.detach(), v.detach() * 0.5]) for k, v in model.named_parameters()}
    x = torch.randn(2, 4, 1, 28, 28)

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.func.functional_call(model, p, (xi,)).float().square().mean()

    ours = torch.func.vmap(torch.func.grad(loss))(params, x)  # as the experts' stacked step takes it
    monkeypatch.setattr(convnet, "FEW_CHANNELS", 0)
    plain = torch.func.vmap(torch.func.grad(loss))(params, x)
    for name in ours:
        assert (ours[name] - plain[name]).abs().max() <= 0.02 * plain[name].abs().max()
