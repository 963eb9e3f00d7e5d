"""Cache-sized micro-batches: sized from the network, off for batch statistics and off the CPU, and the gradients,
networks, experts and features they give are the whole batch's up to float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medistill import microbatch
from medistill.methods import RunContext, distill
from medistill.methods.dc import DCConfig, GradientMatching
from medistill.methods.experts import ExpertSettings, StackedStep, stacked_experts
from medistill.microbatch import (
    backward_in_chunks,
    chunk_size,
    chunks,
    forward_in_chunks,
    samples_independent,
    whole_batches,
)
from medistill.models import create_model
from medistill.train import TrainProtocol, train_model
from medistill.train.protocol import init_model


def convnet(breast, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("convnet", breast.channels, breast.num_classes, breast.image_size, **kwargs)


def test_chunks_are_sized_by_the_largest_activation(breast) -> None:
    images = breast.train.images
    # 28 px padded to 32: the first convolution's 128 x 32 x 32 output is the largest, 4 bytes a value
    assert chunk_size(convnet(breast), images) == microbatch.CACHE_BYTES // (4 * 128 * 32 * 32) == 8
    assert chunk_size(convnet(breast, width=8), images) == microbatch.CACHE_BYTES // (4 * 8 * 32 * 32)
    with whole_batches():
        assert chunk_size(convnet(breast), images) is None
    assert chunk_size(convnet(breast), images) == 8  # the block restores chunking
    assert chunk_size(convnet(breast), images[:0]) is None  # an empty batch is one (empty) piece


def test_batch_statistics_keep_the_whole_batch(breast) -> None:
    model = convnet(breast, norm="batch").train()
    images = breast.train.images
    assert not samples_independent(model) and chunk_size(model, images) is None
    assert chunk_size(model, images, forward_only=True) == 8  # scoring in eval mode may be chunked
    assert model.training  # sizing does not leave the model in eval mode
    assert samples_independent(model.eval())


def test_chunks_cover_the_range_once() -> None:
    assert chunks(256, 16) == [slice(i, i + 16) for i in range(0, 256, 16)]
    assert chunks(35, 16) == [slice(0, 17), slice(17, 35)]  # two equal halves, no 3-image remainder
    assert chunks(20, 16) == [slice(0, 20)]  # a batch little over one chunk stays whole
    assert chunks(5, 1) == [slice(i, i + 1) for i in range(5)]
    assert chunks(35, None) == [slice(0, 35)]
    assert chunks(0, 16) == []


def test_chunked_gradient_and_forward_equal_the_whole_batch(breast) -> None:
    model = convnet(breast)
    x, y = breast.train.images[:70], breast.train.labels[:70]
    F.cross_entropy(model(x), y).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls: list[int] = []

    def loss_of(part: slice) -> torch.Tensor:
        calls.append(part.stop - part.start)
        return F.cross_entropy(model(x[part]), y[part])

    backward_in_chunks(loss_of, 70, 16)
    assert calls == [17, 18, 17, 18]
    for chunked, full in zip((p.grad for p in model.parameters()), whole):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(forward_in_chunks(model, x, 16), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_trained_networks_match_whole_batch_training(breast) -> None:
    protocol = TrainProtocol(epochs=1, batch_size=64)
    images, labels = breast.train.images[:150], breast.train.labels[:150]
    chunked = train_model(images, labels, breast, protocol, seed=3)
    with whole_batches():
        whole = train_model(images, labels, breast, protocol, seed=3)
    start = init_model(protocol, breast, 3, breast.device)
    moved = max(float((a - b).abs().max()) for a, b in zip(chunked.state_dict().values(), start.state_dict().values()))
    assert moved > 1e-3
    for a, b in zip(chunked.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_expert_step_is_the_whole_batch_step(breast) -> None:
    settings = ExpertSettings(epochs=1, model_kwargs={"width": 64})
    flat_model, flats, _ = stacked_experts(breast, settings, [0, 1])
    step = StackedStep(flat_model, settings)
    x = torch.stack([breast.train.images[:100], breast.train.images[100:200]])
    y = torch.stack([breast.train.labels[:100], breast.train.labels[100:200]])
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    chunked = step(flats, x, y, generators)
    with whole_batches():
        whole = StackedStep(flat_model, settings)(flats, x, y, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert step.chunk == 16 and not torch.equal(chunked, whole)  # width 64: 4 MiB / (64 x 32 x 32 x 4 B) = 16 a chunk, 6 of them
    assert not torch.equal(chunked, flats)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [pytest.param("dc", marks=pytest.mark.slow), "dm"])
def test_distilled_sets_match_whole_batch_ones(breast, method: str) -> None:
    config = {"iterations": 2, "batch_real": 40, "eval_every": 0}
    chunked = distill(method, breast, 1, config, context=RunContext(seed=0))
    with whole_batches():
        whole = distill(method, breast, 1, config, context=RunContext(seed=0))
    torch.testing.assert_close(chunked.images, whole.images, rtol=1e-3, atol=1e-4)


def test_dc_real_gradient_uses_chunks_only_without_live_batch_statistics(breast) -> None:
    instance = GradientMatching(breast, 1, DCConfig(batch_real=40), 1, 1)
    assert instance.real_chunk == 8
    params = list(instance.network.module.parameters())
    real = breast.train.images[:40]
    chunked = instance.real_gradient(real, torch.ones(40, dtype=torch.long), params)
    with torch.enable_grad():
        whole = torch.autograd.grad(F.cross_entropy(instance.network.module(real), torch.ones(40, dtype=torch.long)), params)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
