"""Train K evaluation networks in lockstep: one batched forward/backward/step for all of them.

Every network keeps its own initial weights (``torch.manual_seed(seed)`` before ``create_model``), its own
data order and its own augmentation draws (a CPU generator seeded with its seed, drawn through
`ModelStream` exactly as the sequential `train_model` draws), so a stacked run reproduces K
sequential runs up to float rounding. The K parameter sets live in stacked tensors (leading dim K);
momentum SGD with weight decay is elementwise, so one `torch.optim.SGD` over the stacked tensors
is the same update as K separate optimisers.

Two backends compute the K forward passes at once:

- ``grouped``: ConvNet only. The K models' channels sit side by side, every conv is one grouped
  conv (groups=K), instance norm one ``group_norm`` with K x groups, the classifier one ``baddbmm``.
- ``vmap``: any model without buffers, via ``torch.func.vmap(functional_call)``.

Models with buffers (batch norm: running statistics) or dropout are not stacked; `can_stack`
says so and the engine trains them one after the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from medistill.data.dataset import MULTI_LABEL, Dataset
from medistill.errors import ConfigError
from medistill.microbatch import forward_in_chunks
from medistill.models import create_model
from medistill.models.convnet import AvgPool, Conv2d, ConvNet
from medistill.runtime import autocast
from medistill.train.metrics import predict_scores, score
from medistill.train.protocol import ModelStream, TrainProtocol, init_model, make_augment
from medistill.transfer import to_device

STACK_PIXEL_BUDGET = 4096 * 28 * 28  # training images x pixels per stacked step (bounds activation memory)
EVAL_IMAGE_BUDGET = 4096  # test images x models per batched scoring forward


def can_stack(model: nn.Module) -> bool:
    """Whether K copies of the model can be trained stacked: no buffers (batch norm) and no dropout."""
    has_buffers = next(model.buffers(), None) is not None
    has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    return not has_buffers and not has_dropout


def protocol_can_stack(protocol: TrainProtocol, dataset: Dataset) -> bool:
    """Whether the protocol's architecture can be stacked (checked on a weightless meta copy)."""
    with torch.device("meta"):
        model = create_model(protocol.model, dataset.channels, dataset.num_classes, dataset.image_size)
    return can_stack(model)


def stack_group_size(num_models: int, step_images: int, image_size: int) -> int:
    """How many networks to stack per group so one step stays within `STACK_PIXEL_BUDGET`."""
    per_model = max(1, step_images * image_size * image_size)
    return max(1, min(num_models, STACK_PIXEL_BUDGET // per_model))


def stacked_loss(logits: Tensor, targets: Tensor, task: str) -> Tensor:
    """The sum over models of each model's mean loss, so each model gets exactly its own gradient.

    `logits` is (K, B, classes); `targets` (K, B) class indices, or (K, B, labels) for multi-label.
    """
    k = logits.shape[0]
    if task == MULTI_LABEL:
        per_element = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    else:
        per_element = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_element.reshape(k, -1).mean(dim=1).sum()


# --- backends: (template model, stacked params, x of shape (K, B, C, H, W)) -> logits (K, B, classes)

Forward = Callable[[nn.Module, dict[str, Tensor], Tensor], Tensor]


def _vmap_forward(template: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    return vmap(lambda p, xi: functional_call(template, p, (xi,)))(params, x)


def _grouped_conv(layer: nn.Conv2d, name: str, params: dict[str, Tensor], h: Tensor, k: int) -> Tensor:
    weight = params[f"{name}.weight"].flatten(0, 1)
    bias = params[f"{name}.bias"].flatten() if layer.bias is not None else None
    return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups * k)


def _grouped_group_norm(layer: nn.GroupNorm, name: str, params: dict[str, Tensor], h: Tensor, k: int) -> Tensor:
    weight = params[f"{name}.weight"].flatten() if layer.affine else None
    bias = params[f"{name}.bias"].flatten() if layer.affine else None
    return F.group_norm(h, layer.num_groups * k, weight, bias, layer.eps)


def _channelwise(layer: nn.Module, name: str, params: dict[str, Tensor], h: Tensor, k: int) -> Tensor:
    return layer(h)  # parameter-free and per-channel: the stacked layout needs nothing special


# the layer argument is of the key's type (Any: a mapping cannot say that to a type checker)
_GROUPED_LAYERS: dict[type, Callable[[Any, str, dict[str, Tensor], Tensor, int], Tensor]] = {
    nn.Conv2d: _grouped_conv,
    Conv2d: _grouped_conv,
    nn.GroupNorm: _grouped_group_norm,
    nn.ReLU: _channelwise,
    nn.LeakyReLU: _channelwise,
    nn.Sigmoid: _channelwise,
    nn.AvgPool2d: _channelwise,
    AvgPool: _channelwise,
    nn.MaxPool2d: _channelwise,
    nn.Identity: _channelwise,
}


def _grouped_supports(template: nn.Module) -> bool:
    return isinstance(template, ConvNet) and all(type(layer) in _GROUPED_LAYERS for layer in template.features)


def _grouped_forward(template: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    k, b = x.shape[:2]
    h = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])  # (B, K*C, H, W): model-major channels
    for index, layer in enumerate(cast(ConvNet, template).features):  # a ConvNet: `_grouped_supports`
        h = _GROUPED_LAYERS[type(layer)](layer, f"features.{index}", params, h, k)
    features = h.reshape(b, k, -1).transpose(0, 1)  # (K, B, embed_dim), ConvNet's flatten order
    return torch.baddbmm(params["classifier.bias"].unsqueeze(1), features, params["classifier.weight"].transpose(1, 2))


BACKENDS: dict[str, tuple[Callable[[nn.Module], bool], Forward]] = {
    "grouped": (_grouped_supports, _grouped_forward),
    "vmap": (can_stack, _vmap_forward),
}


def pick_backend(template: nn.Module, backend: str | None = None) -> str:
    """The named backend (checked), or the first one in `BACKENDS` that supports the model."""
    if backend is None:
        for name, (supports, _) in BACKENDS.items():
            if supports(template):
                return name
        raise ConfigError(f"{type(template).__name__} has buffers (batch norm) or dropout and cannot be trained stacked")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown stacking backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if not BACKENDS[backend][0](template):
        raise ConfigError(f"the '{backend}' stacking backend does not support {type(template).__name__}")
    return backend


class StackedModels:
    """K networks of one architecture as stacked parameter tensors (leading dim K)."""

    def __init__(self, models: list[nn.Module], backend: str | None = None) -> None:
        if not models:
            raise ConfigError("there must be at least one model to stack")
        self.backend = pick_backend(models[0], backend)
        params, _ = stack_module_state(models)
        self.params: dict[str, Tensor] = params
        self.template = copy.deepcopy(models[0]).to("meta")
        self._forward = BACKENDS[self.backend][1]

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of a batch per model, `x` of shape (K, B, C, H, W)."""
        return self._forward(self.template, self.params, x)

    @torch.no_grad()
    def logits(self, images: Tensor, budget: int = EVAL_IMAGE_BUDGET) -> Tensor:
        """Logits (K, N, classes) of every model on the same images, in chunks of `budget` images x models."""
        k = len(self)
        per_image = forward_in_chunks(
            lambda batch: self(batch.unsqueeze(0).expand(k, *batch.shape)).transpose(0, 1), images, max(1, budget // k)
        )
        return per_image.transpose(0, 1)

    def unstack(self) -> list[nn.Module]:
        """The K networks as ordinary modules (copies of the current weights)."""
        device = next(iter(self.params.values())).device
        models = []
        for k in range(len(self)):
            model = copy.deepcopy(self.template).to_empty(device=device)
            model.load_state_dict({name: p[k].detach() for name, p in self.params.items()})
            models.append(model)
        return models


def train_stacked(
    images: Tensor,
    labels: Tensor,
    dataset: Dataset,
    protocol: TrainProtocol,
    *,
    seeds: list[int],
    lr: float | None = None,
    backend: str | None = None,
    on_epoch: Callable[[], None] | None = None,
) -> StackedModels:
    """Train one fresh network per seed on `images`/`labels` (on the target device), all in lockstep.

    Gives the networks `train_model` gives for the same seeds, up to float rounding.
    """
    device = images.device
    models = [init_model(protocol, dataset, seed, device) for seed in seeds]
    stack = StackedModels(models, backend)
    augment = make_augment(protocol)
    streams = [ModelStream(seed, augment) for seed in seeds]
    base_lr = protocol.lr if lr is None else float(lr)
    optimizer = protocol.optimizer(list(stack.params.values()), base_lr)
    stack.template.train()
    n = images.shape[0]
    for epoch in range(protocol.total_epochs):
        orders = to_device(torch.stack([stream.epoch_order(n) for stream in streams]), device)
        for start in range(0, n, protocol.batch_size):
            idx = orders[:, start : start + protocol.batch_size]
            x = images[idx]
            if augment is not None:
                x = torch.stack([stream.augment_batch(x[k]) for k, stream in enumerate(streams)])
            with autocast(device, protocol.bf16):
                loss = stacked_loss(stack(x), labels[idx], dataset.task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch == protocol.lr_drop_epoch:
            optimizer = protocol.optimizer(list(stack.params.values()), base_lr * 0.1)
        if on_epoch is not None:
            on_epoch()
    return stack


def stacked_scores_on(stack: StackedModels, dataset: Dataset, split: str = "test") -> list[tuple[float, float]]:
    """(ACC, AUC) of every stacked model on one split of the dataset, from one batched forward per chunk."""
    stack.template.eval()
    data = dataset.split(split)
    logits = stack.logits(data.images)
    return [score(data.labels, predict_scores(model_logits, dataset.task), dataset.task) for model_logits in logits]
