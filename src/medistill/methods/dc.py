"""`dc` and `dsa`: dataset condensation by gradient matching (Zhao et al., ICLR 2021), and DSA (ICML 2021).

Each iteration draws a fresh network. `outer_loop` times: for every class, the gradient of the
loss on up to `batch_real` real images of the class is matched to the gradient on its synthetic
images (second order through the synthetic gradient); one image step on the summed distance;
then, unless last, the network trains `inner_loop` epochs on the synthetic set (SGD `lr_net`,
batch `batch_train`). DSA applies the same random transform (one Siamese draw per class and
match) to the real and the synthetic batch, and (non-Siamese) DSA while training the network.

Schedule: the reference's (outer_loop, inner_loop) table for IPC 1, 10, 20, 30, 40, 50; any other
IPC is interpolated linearly between the neighbouring rows and rounded (below the first row and
above the last, the end row is used), so IPC 3 -> (3, 12), 7 -> (7, 34), 15 -> (15, 38),
100 -> (50, 10). `outer_loop` / `inner_loop` settings override the table.

Batch-norm networks (e.g. `convnet_bn`): before each match the network runs `BN_IMAGES_PER_CLASS`
real images per class in train mode (updating the running statistics with the layers' momentum),
and its batch-norm layers are then put in eval mode, so the match uses those frozen statistics
rather than the statistics of a 1-image synthetic batch (the reference does this); the inner
training runs the whole network in train mode again.

Per-class work, two ways (`class_batching`): "loop" runs one forward/backward pair per class
(the reference's order of work); "vmap" computes every class's gradient in one batched call
with `torch.func` (classes padded to the largest real batch with zero weight). Which is faster
depends on the device; see docs/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from medistill.artifact import SyntheticSet
from medistill.augment import DEFAULT_STRATEGY, DiffAugment
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.methods.base import MethodSpec, RunContext, register_method
from medistill.methods.matching import get_distance
from medistill.methods.pixel_methods import (
    FreshNetwork,
    IterationRandom,
    PixelConfig,
    RealSampler,
    class_labels,
    run_pixel_method,
)
from medistill.microbatch import chunk_size, samples_independent, weighted_chunks
from medistill.runtime import autocast, maybe_compile

# The reference's (IPC, outer_loop, inner_loop) rows.
LOOP_TABLE: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (10, 10, 50), (20, 20, 25), (30, 30, 20), (40, 40, 15), (50, 50, 10))
CLASS_BATCHING = ("loop", "vmap")
BN_IMAGES_PER_CLASS = 16  # real images per class whose statistics batch-norm layers are frozen at


def loops_for_ipc(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for any IPC >= 1: the table's row, else linear interpolation, clamped at the ends."""
    if ipc < 1:
        raise ConfigError(f"IPC must be at least 1, got {ipc}")
    ipcs = [row[0] for row in LOOP_TABLE]
    outer = float(np.interp(ipc, ipcs, [row[1] for row in LOOP_TABLE]))
    inner = float(np.interp(ipc, ipcs, [row[2] for row in LOOP_TABLE]))
    return max(1, int(outer + 0.5)), max(1, int(inner + 0.5))


@dataclass
class DCConfig(PixelConfig):
    """DC's reference settings."""

    iterations: int = 1000
    lr_img: float = 0.1
    init: str = "noise"
    distance: str = "ours"  # "ours" (layer-wise cosine), "mse" or "cos"
    lr_net: float = 0.01
    batch_train: int = 256  # batch size when training the network on the synthetic set
    outer_loop: int | None = None  # None = from the IPC table
    inner_loop: int | None = None
    class_batching: str = "loop"  # "loop" or "vmap"
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        get_distance(self.distance)
        if self.class_batching not in CLASS_BATCHING:
            raise ConfigError(f"unknown class_batching '{self.class_batching}'; choose one of {', '.join(CLASS_BATCHING)}")
        if not self.lr_net > 0 or self.batch_train < 1:
            raise ConfigError("lr_net must be positive and batch_train at least 1")
        if (self.outer_loop is not None and self.outer_loop < 1) or (self.inner_loop is not None and self.inner_loop < 0):
            raise ConfigError("outer_loop must be at least 1 and inner_loop at least 0")


@dataclass
class DSAConfig(DCConfig):
    """DSA's reference settings: DC's, with real init (the DSA reference's command) and the DSA strategy."""

    init: str = "real"
    dsa_strategy: str = DEFAULT_STRATEGY

    def __post_init__(self) -> None:
        super().__post_init__()
        DiffAugment(self.dsa_strategy)  # refuses an unknown op


class GradientMatching:
    """One DC/DSA run's state: data on the device, the network, the sampler and the distance."""

    def __init__(self, dataset: Dataset, ipc: int, config: DCConfig, outer: int, inner: int) -> None:
        self.ipc, self.config = ipc, config
        self.outer, self.inner = outer, inner
        self.device = dataset.device
        self.num_classes = dataset.num_classes
        self.real = dataset.train.images
        self.sampler = RealSampler(dataset, config.batch_real)
        self.network = FreshNetwork(dataset, config.model)
        self.first_order = maybe_compile(self.network.module, config.compile)
        self.distance = get_distance(config.distance)
        strategy = getattr(config, "dsa_strategy", None)
        self.augment = DiffAugment(strategy) if strategy else None
        self.batch_norms = [m for m in self.network.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.bn_sampler = RealSampler(dataset, BN_IMAGES_PER_CLASS) if self.batch_norms else None
        self.syn_labels = class_labels(dataset, ipc)
        self.real_chunk = chunk_size(self.network.module, self.real, forward_only=True)  # used while no batch statistics are live
        self.net_optimizer = torch.optim.SGD(self.network.module.parameters(), lr=config.lr_net)
        self.match: Callable[[Tensor, list[Tensor], IterationRandom], Tensor] = (
            self.match_vmap if config.class_batching == "vmap" else self.match_loop
        )

    def step(self, images: Tensor, optimizer: torch.optim.Optimizer, rng: IterationRandom) -> Tensor:
        """One iteration: a fresh network, `outer` matches with an image step each, inner training between."""
        self.network.reset(rng.net_seed).train()
        total = torch.zeros((), device=self.device)
        for outer in range(self.outer):
            self.freeze_batch_norm(rng)
            loss = self.match(images, self.draw_real(rng), rng)
            (images.grad,) = torch.autograd.grad(loss, [images])
            optimizer.step()
            total += loss.detach()
            if outer < self.outer - 1:
                self.train_network(images.detach(), rng)
        return total / (self.num_classes * self.outer)

    def draw_real(self, rng: IterationRandom) -> list[Tensor]:
        """The real images of one match: `batch_real` per class, from the iteration's generator."""
        return self.sampler.draw(rng.device)

    def freeze_batch_norm(self, rng: IterationRandom) -> None:
        """Batch-norm networks only: update the running statistics with one train-mode pass of real images
        of every class (the layers' own momentum, as the reference), then freeze them (eval mode)."""
        if self.bn_sampler is None:
            return
        real = self.real[torch.cat(self.bn_sampler.draw(rng.device))]
        module = self.network.module.train()
        with torch.no_grad():
            module(real)
        for norm in self.batch_norms:
            norm.eval()

    def _pair(self, real: Tensor, syn: Tensor, rng: IterationRandom) -> tuple[Tensor, Tensor]:
        """The real and synthetic batch of one class, with one shared DSA draw when augmenting."""
        if self.augment is None:
            return real, syn
        return self.augment.siamese_pair(real, syn, rng.siamese_seed())

    def match_loop(self, images: Tensor, picks: list[Tensor], rng: IterationRandom) -> Tensor:
        """Summed distance over classes, one forward/backward pair per class."""
        params = list(self.network.module.parameters())
        total = images.new_zeros(())
        for c, idx in enumerate(picks):
            real, syn = self._pair(self.real[idx], images[c * self.ipc : (c + 1) * self.ipc], rng)
            with autocast(self.device, self.config.bf16):
                loss_syn = F.cross_entropy(self.network.module(syn).float(), self.syn_labels[c * self.ipc : (c + 1) * self.ipc])
            g_real = [g.unsqueeze(0) for g in self.real_gradient(real, torch.full_like(idx, c), params)]
            g_syn = [g.unsqueeze(0) for g in torch.autograd.grad(loss_syn, params, create_graph=True)]
            total = total + self.distance(g_real, g_syn)
        return total

    def real_gradient(self, real: Tensor, labels: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        """The gradient of the mean cross-entropy on a class's real images, accumulated over cache-sized chunks on the
        CPU when the network treats images independently (`microbatch`; the same gradient up to float rounding)."""
        size = self.real_chunk if samples_independent(self.network.module) else None
        total: list[Tensor] = []
        for part, share in weighted_chunks(real.shape[0], size):
            with autocast(self.device, self.config.bf16):
                logits = self.first_order(real[part]).float()
            grads = torch.autograd.grad(F.cross_entropy(logits, labels[part]) * share, params)
            total = list(grads) if not total else [a + g for a, g in zip(total, grads)]
        return [g.detach() for g in total]

    def match_vmap(self, images: Tensor, picks: list[Tensor], rng: IterationRandom) -> Tensor:
        """Summed distance over classes, each side's per-class gradients in one `vmap(grad)` call."""
        width = max(len(idx) for idx in picks)
        pairs = [self._pair(self.real[idx], images[c * self.ipc : (c + 1) * self.ipc], rng) for c, idx in enumerate(picks)]
        real = torch.stack([F.pad(r, (0, 0, 0, 0, 0, 0, 0, width - len(r))) for r, _ in pairs])
        weights = torch.stack([(torch.arange(width, device=self.device) < len(idx)).float() / len(idx) for idx in picks])
        syn = torch.stack([s for _, s in pairs])
        labels = torch.arange(self.num_classes, device=self.device)
        params = {name: p.detach() for name, p in self.network.module.named_parameters()}
        module, bf16 = self.network.module, self.config.bf16

        def class_loss(p: dict[str, Tensor], x: Tensor, label: Tensor, w: Tensor) -> Tensor:
            with autocast(x.device, bf16):
                logits = functional_call(module, p, (x,)).float()
            return (F.cross_entropy(logits, label.expand(x.shape[0]), reduction="none") * w).sum()

        per_class = vmap(grad(class_loss), in_dims=(None, 0, 0, 0))
        g_real = {k: v.detach() for k, v in per_class(params, real, labels, weights).items()}
        syn_weights = torch.full((self.num_classes, self.ipc), 1.0 / self.ipc, device=self.device)
        g_syn = per_class(params, syn, labels, syn_weights)
        return self.distance([g_real[k] for k in params], [g_syn[k] for k in params])

    def train_network(self, images: Tensor, rng: IterationRandom) -> None:
        """`inner` epochs of SGD on the (detached) synthetic set, shuffled, DSA per sample when augmenting."""
        n, batch = images.shape[0], self.config.batch_train
        self.network.module.train()
        for _ in range(self.inner):
            order = torch.randperm(n, generator=rng.device, device=self.device)
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                x = images[idx]
                if self.augment is not None:
                    x = self.augment(x, generator=rng.cpu)
                with autocast(self.device, self.config.bf16):
                    loss = F.cross_entropy(self.first_order(x).float(), self.syn_labels[idx])
                self.net_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.net_optimizer.step()


def run_gradient_matching(name: str) -> Callable[[Dataset, int, DCConfig, RunContext], SyntheticSet]:
    """The registry's `run` for DC (no augmentation) or DSA (the config's DSA strategy)."""

    def run(dataset: Dataset, ipc: int, config: DCConfig, context: RunContext) -> SyntheticSet:
        table_outer, table_inner = loops_for_ipc(ipc)
        outer = config.outer_loop or table_outer
        inner = table_inner if config.inner_loop is None else config.inner_loop
        matcher = GradientMatching(dataset, ipc, config, outer, inner)
        return run_pixel_method(
            name, dataset, ipc, config, context, matcher.step, hyperparameters={"outer_loop": outer, "inner_loop": inner}
        )

    return run


DC_SPEC = register_method(
    MethodSpec(
        name="dc",
        run=run_gradient_matching("dc"),
        config_class=DCConfig,
        summary="gradient matching (DC, Zhao et al. 2021)",
        eval_augment=None,
        supports_multilabel=False,
        # behind DM in the demo measurement (docs/RESULTS.md)
        demo_rank=20,
        demo_settings={"iterations": 20, "batch_real": 64, "outer_loop": 5, "inner_loop": 10},
    )
)

DSA_SPEC = register_method(
    MethodSpec(
        name="dsa",
        run=run_gradient_matching("dsa"),
        config_class=DSAConfig,
        summary="gradient matching with differentiable Siamese augmentation (DSA, Zhao & Bilen 2021)",
        eval_augment=DEFAULT_STRATEGY,
        supports_multilabel=False,
    )
)
