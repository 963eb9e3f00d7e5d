"""`dp-dc`: differentially private gradient matching (in the spirit of Chen et al., "Private Set Generation
with Discriminative Information", NeurIPS 2022).

DC's loop (a fresh random network per iteration, `outer_loop` matches with an image step each,
`inner_loop` epochs of network training on the synthetic set between them), with the real-gradient
side computed DP-SGD style: the real images of each match are a Poisson sample (rate q) of the
training set, every image's loss gradient (all parameters, flattened) is clipped to L2 norm C,
the clipped gradients of a class are summed and N(0, (σC)²) noise is added before dividing by the
expected class batch. Training the network on the synthetic set only post-processes released
values. One release per match: a run spends `iterations x outer_loop` steps of the accountant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.dp.accounting import PrivacyLedger
from medistill.dp.mechanism import (
    GaussianMechanism,
    PoissonSampler,
    PrivateSettings,
    finish_private_set,
    private_run,
    public_view,
    release_class_counts,
    require_per_example,
    sync_ledger,
)
from medistill.dp.randomness import SecretRandom
from medistill.methods.base import MethodSpec, RunContext, register_method
from medistill.methods.dc import DCConfig, GradientMatching, loops_for_ipc
from medistill.methods.pixel_methods import IterationRandom, run_pixel_method
from medistill.runtime import autocast

MECHANISM = "subsampled Gaussian mechanism on clipped per-example loss gradients, summed per class (DP gradient matching)"
PER_EXAMPLE_CHUNK = 64  # real images whose per-example gradients are held at once


@dataclass
class DPDCConfig(DCConfig, PrivateSettings):
    """dp-dc's settings: DC's (noise init, its loop table) and the privacy settings.

    Real images are drawn by `sample_rate` (Poisson), so `batch_real` is not used.
    """

    iterations: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_private(self.init)


class PrivateGradientMatching(GradientMatching):
    """DC's gradient matching whose real side is a noisy mean of clipped per-example gradients."""

    def __init__(
        self,
        dataset: Dataset,
        ipc: int,
        config: DPDCConfig,
        outer: int,
        inner: int,
        ledger: PrivacyLedger,
        counts: Tensor,
        secret: SecretRandom,
    ) -> None:
        super().__init__(dataset, ipc, config, outer, inner)
        require_per_example(self.network.module, config.model)
        self.private_sampler = PoissonSampler(dataset, config.sample_rate, secret)
        self.ledger = ledger
        self.mechanism = GaussianMechanism(ledger, counts, self.device, secret)
        self.match = self.match_private

    def draw_real(self, rng: IterationRandom) -> list[Tensor]:
        """The Poisson sample of the release about to be made (secret draws, not the public per-iteration generator)."""
        return self.private_sampler.draw(self.mechanism.next_release)

    def step(self, images: Tensor, optimizer: torch.optim.Optimizer, rng: IterationRandom) -> Tensor:
        sync_ledger(self.ledger, rng.iteration, self.outer)
        return super().step(images, optimizer, rng)

    def per_example_gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """(N, parameters) flattened loss gradients, one row per image."""
        module, bf16 = self.network.module, self.config.bf16
        params = {name: p.detach() for name, p in module.named_parameters()}

        def example_loss(p: dict[str, Tensor], image: Tensor, label: Tensor) -> Tensor:
            with autocast(image.device, bf16):
                logits = functional_call(module, p, (image.unsqueeze(0),)).float()
            return F.cross_entropy(logits, label.unsqueeze(0))

        grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([grads[name].flatten(1) for name in params], 1)

    def real_class_sums(self, picks: list[Tensor]) -> Tensor:
        """(classes, parameters) sums of the clipped per-example gradients of the sampled real images (no noise)."""
        width = sum(p.numel() for p in self.network.module.parameters())
        sums = torch.zeros(self.num_classes, width, device=self.device)
        for c, idx in enumerate(picks):
            for start in range(0, len(idx), PER_EXAMPLE_CHUNK):
                chunk = idx[start : start + PER_EXAMPLE_CHUNK]
                labels = torch.full((len(chunk),), c, device=self.device, dtype=torch.long)
                sums += self.mechanism.class_sums(self.per_example_gradients(self.real[chunk], labels), labels, self.num_classes)
        return sums

    def match_private(self, images: Tensor, picks: list[Tensor], rng: IterationRandom) -> Tensor:
        """Summed distance over classes between the noisy real mean gradient and the synthetic gradient."""
        params = list(self.network.module.parameters())
        real = self.mechanism.release(self.real_class_sums(picks))
        shapes = [p.shape for p in params]
        total = images.new_zeros(())
        for c in range(self.num_classes):
            g_real = [g.view(1, *shape) for g, shape in zip(torch.split(real[c], [p.numel() for p in params]), shapes)]
            syn = images[c * self.ipc : (c + 1) * self.ipc]
            with autocast(self.device, self.config.bf16):
                loss_syn = F.cross_entropy(self.network.module(syn).float(), self.syn_labels[c * self.ipc : (c + 1) * self.ipc])
            g_syn = [g.unsqueeze(0) for g in torch.autograd.grad(loss_syn, params, create_graph=True)]
            total = total + self.distance(g_real, g_syn)
        return total


def run_dp_dc(dataset: Dataset, ipc: int, config: DPDCConfig, context: RunContext) -> SyntheticSet:
    """The registry's `run` for dp-dc."""
    table_outer, table_inner = loops_for_ipc(ipc)
    outer = config.outer_loop or table_outer
    inner = table_inner if config.inner_loop is None else config.inner_loop
    ledger = PrivacyLedger(config, config.iterations * outer, MECHANISM)
    public = public_view(dataset)

    def run(secret: SecretRandom) -> SyntheticSet:
        counts = release_class_counts(dataset, config, secret)
        matcher = PrivateGradientMatching(public, ipc, config, outer, inner, ledger, counts, secret)
        synthetic = run_pixel_method(
            "dp-dc", public, ipc, config, context, matcher.step, hyperparameters={"outer_loop": outer, "inner_loop": inner}
        )
        sync_ledger(ledger, config.iterations, outer)
        return finish_private_set(synthetic, ledger, counts, config)

    return private_run(context.checkpoint_dir, context.resume, run)


SPEC = register_method(
    MethodSpec(
        name="dp-dc",
        run=run_dp_dc,
        config_class=DPDCConfig,
        summary="differentially private gradient matching: clipped, noised per-example real gradients, (ε, δ) by Opacus",
        eval_augment=None,
        supports_multilabel=False,
        private_releases=lambda settings: int(settings["iterations"]) * int(settings["outer_loop"]),
    )
)
