"""`mtt`: matching training trajectories (Cazenavette et al., CVPR 2022), with a bounded-memory unroll.

Each iteration picks an expert and a start epoch s, runs `syn_steps` SGD steps of a functional
student from the expert's parameters at s on minibatches of the (DSA-augmented) synthetic set with
the learnable lr `syn_lr`, and pulls the student's end point towards the expert's parameters at
s + expert_epochs: loss = |theta_N - theta_target|^2 / |theta_start - theta_target|^2. Pixels and
`syn_lr` are updated by SGD with momentum.

Two ways to get the gradient (`unroll`): `plain` keeps the whole unrolled graph (memory grows with
syn_steps); `bounded` runs the student forward without a graph, keeps only the parameter vector
after each step (in host memory on a GPU), then walks the steps backwards, recomputing one step's
graph at a time and carrying the adjoint lambda_k = dL/dtheta_k (lambda_k = lambda_{k+1} - lr *
H_k lambda_{k+1}). Both give the same gradients; the second needs the memory of one step.

Guards: a non-finite loss or gradient stops the run with a clear error (the last checkpoint is kept,
no result is written); `syn_lr` is clamped to a positive floor `min_syn_lr`, so it can never turn negative
(`min_syn_lr: null` leaves it free, as the reference does; a run whose syn_lr ends at or below zero has
diverged and is refused the same way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medistill.artifact import SyntheticSet
from medistill.augment import DEFAULT_STRATEGY, DiffAugment
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.methods.base import MethodSpec, RunContext, check_ipc, register_method
from medistill.methods.driver import DistillConfig, Distiller, DivergenceError, iteration_seeds, run_distiller
from medistill.methods.experts import ExpertBuffer, ExpertSettings, FlatModel, build_buffer, new_network
from medistill.methods.mtt_presets import stable_preset
from medistill.methods.pixel_methods import class_labels, real_init
from medistill.registry import Registry
from medistill.runtime import autocast
from medistill.transfer import to_device, to_host_async
from medistill.zca import ZCA, whitened_dataset


@dataclass
class MTTConfig(DistillConfig):
    """MTT settings; the defaults are those of the preset mtt-28-ipc10 (stable on BreastMNIST; reasons there).

    `distill("mtt", ...)` with settings given as a mapping (or none) starts from the stable preset of
    the requested IPC (`mtt_presets.stable_preset`) instead; an `MTTConfig` is used as it is.
    """

    iterations: int = 1000
    syn_steps: int = 10  # student steps per iteration
    expert_epochs: int = 2  # the target is this many expert epochs after the start
    max_start_epoch: int = 10  # start epoch uniform in [0, max_start_epoch)
    lr_img: float = 1000.0
    lr_lr: float = 1e-7
    lr_teacher: float = 0.01  # the experts' lr
    syn_lr_init: float | None = 0.001  # syn_lr's initial value (None: lr_teacher, as the reference)
    min_syn_lr: float | None = 1e-4  # syn_lr is clamped to at least this (None: no floor, as the reference)
    batch_syn: int | None = None  # synthetic minibatch per student step (None: the whole set)
    dsa_strategy: str | None = DEFAULT_STRATEGY  # DSA for the student and the experts; "none" (or null) switches it off
    zca: bool = False  # kornia-style ZCA as the reference (a warning on 1-channel data)
    unroll: str = "plain"  # "plain" or "bounded" (memory independent of syn_steps)
    num_experts: int = 20
    buffer_epochs: int = 30
    expert_batch: int = 256
    expert_seed: int = 0
    expert_fp16: bool = False
    expert_bf16: bool = False  # train the experts under bf16 autocast (a different buffer from fp32 experts')
    experts_parallel: int | None = (
        None  # experts trained at once when the buffer is built (None: 1 on the CPU, as many as fit on CUDA)
    )
    max_expert_minutes: float | None = None  # refuse to build a buffer estimated to take longer (None: build whatever it takes)
    buffer_root: str | None = None  # default: $MEDISTILL_CACHE/experts or ~/.cache/medistill/experts
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("syn_steps", "expert_epochs", "max_start_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mtt setting {name} must be at least 1, got {getattr(self, name)}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ConfigError(f"mtt setting batch_syn must be at least 1 (or null for the whole set), got {self.batch_syn}")
        if self.experts_parallel is not None and self.experts_parallel < 1:
            raise ConfigError(
                f"mtt setting experts_parallel must be at least 1 (or null: chosen from the device), got {self.experts_parallel}"
            )
        if self.max_expert_minutes is not None and not (math.isfinite(self.max_expert_minutes) and self.max_expert_minutes > 0):
            raise ConfigError(
                f"mtt setting max_expert_minutes must be a positive number (or null: no limit), got {self.max_expert_minutes}"
            )
        floor = self.min_syn_lr if self.min_syn_lr is not None else 0.0
        if self.syn_lr_init is not None and not (
            math.isfinite(self.syn_lr_init) and self.syn_lr_init > 0 and self.syn_lr_init >= floor
        ):
            raise ConfigError(
                f"mtt setting syn_lr_init must be a positive number >= min_syn_lr ({self.min_syn_lr}), got {self.syn_lr_init}"
            )
        for name in ("lr_teacher", "min_syn_lr"):
            value = getattr(self, name)
            if name == "min_syn_lr" and value is None:
                continue
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"mtt setting {name} must be a positive number, got {value}")
        if not (math.isfinite(self.lr_lr) and self.lr_lr >= 0):
            raise ConfigError(f"mtt setting lr_lr must be a number >= 0, got {self.lr_lr}")
        UNROLLS.get(self.unroll)
        if self.augment is not None:
            DiffAugment(self.augment)  # refuses an unknown op
        last = self.max_start_epoch - 1 + self.expert_epochs
        if last > self.buffer_epochs:
            raise ConfigError(
                f"max_start_epoch {self.max_start_epoch} + expert_epochs {self.expert_epochs} needs expert "
                f"snapshots up to epoch {last}, but buffer_epochs is {self.buffer_epochs}"
            )

    @property
    def augment(self) -> str | None:
        """The DSA strategy in use, None when switched off."""
        off = self.dsa_strategy is None or self.dsa_strategy.strip().lower() in ("", "none")
        return None if off else self.dsa_strategy

    def smaller_buffer_hint(self) -> str:
        """How to ask for a smaller (cheaper) buffer than these settings'."""
        least_epochs = self.max_start_epoch - 1 + self.expert_epochs
        fewer = [f"--set num_experts=N (now {self.num_experts})"]
        if self.buffer_epochs > least_epochs:
            fewer.append(
                f"--set buffer_epochs={least_epochs} (now {self.buffer_epochs}; the least max_start_epoch "
                f"{self.max_start_epoch} + expert_epochs {self.expert_epochs} allow)"
            )
        return "for a smaller buffer: " + " or ".join(fewer)

    def expert_settings(self, zca: bool) -> ExpertSettings:
        return ExpertSettings(
            epochs=self.buffer_epochs,
            lr_teacher=self.lr_teacher,
            batch_size=self.expert_batch,
            augment=self.augment,
            model=self.model,
            model_kwargs=dict(self.model_kwargs),
            zca=zca,
            seed=self.expert_seed,
            fp16=self.expert_fp16,
            bf16=self.expert_bf16,
        )


@dataclass
class Unroll:
    """One iteration's student problem: where it starts and ends, and its minibatches and augmentation seeds."""

    student: FlatModel
    start: torch.Tensor  # (P,)
    target: torch.Tensor  # (P,)
    images: torch.Tensor  # (N, C, H, W), a leaf that requires grad
    labels: torch.Tensor
    syn_lr: torch.Tensor  # scalar leaf that requires grad
    batches: list[torch.Tensor]  # syn_steps index tensors
    seeds: list[int]  # one augmentation seed per step
    augment: DiffAugment | None
    bf16: bool = False

    def step_loss(self, theta: torch.Tensor, batch: torch.Tensor, k: int) -> torch.Tensor:
        """Cross-entropy of the student `theta` on step k's batch of images (augmented here)."""
        x = batch
        if self.augment is not None:
            x = self.augment(x, generator=torch.Generator().manual_seed(self.seeds[k]))
        if self.bf16:  # one cast of the whole vector per step, not one per layer by autocast, forward and backward
            theta = theta.to(torch.bfloat16)
        with autocast(theta.device, self.bf16):  # cross-entropy itself runs in fp32 under autocast
            return F.cross_entropy(self.student(theta, x), self.labels[self.batches[k]])

    def distance(self, theta_end: torch.Tensor) -> torch.Tensor:
        """The normalised parameter distance to the target."""
        return (theta_end - self.target).square().sum() / (self.start - self.target).square().sum().clamp_min(1e-12)


UnrollResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # loss, d loss / d images, d loss / d syn_lr


def plain_unroll(problem: Unroll) -> UnrollResult:
    """Keep the whole unrolled graph and backpropagate through it once."""
    theta = problem.start.detach().requires_grad_(True)
    for k in range(len(problem.batches)):
        batch = problem.images[problem.batches[k]]
        g = torch.autograd.grad(problem.step_loss(theta, batch, k), theta, create_graph=True)[0]
        theta = theta - problem.syn_lr * g
    loss = problem.distance(theta)
    grad_images, grad_lr = torch.autograd.grad(loss, (problem.images, problem.syn_lr))
    return loss.detach(), grad_images, grad_lr


def bounded_unroll(problem: Unroll) -> UnrollResult:
    """The same gradients with one step's graph at a time: forward without a graph, then the adjoint backwards."""
    lr = problem.syn_lr.detach()
    neg_lr = -float(lr)  # read once, before this unroll's work is queued (the image update needs it as a number)
    images = problem.images.detach()
    offload = images.device.type != "cpu"
    thetas = []
    theta = problem.start.detach()
    for k in range(len(problem.batches)):
        thetas.append(to_host_async(theta) if offload else theta)  # read back on the same stream: no wait
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            g = torch.autograd.grad(problem.step_loss(leaf, images[problem.batches[k]], k), leaf)[0]
        theta = (leaf - lr * g).detach()
    loss = problem.distance(theta)
    adjoint = 2 * (theta - problem.target) / (problem.start - problem.target).square().sum().clamp_min(1e-12)
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(lr)
    for k in reversed(range(len(problem.batches))):
        leaf = to_device(thetas.pop(), images.device).requires_grad_(True)
        batch = images[problem.batches[k]].requires_grad_(True)
        g = torch.autograd.grad(problem.step_loss(leaf, batch, k), leaf, create_graph=True)[0]
        hvp, grad_batch = torch.autograd.grad(g, (leaf, batch), grad_outputs=adjoint)
        grad_lr = grad_lr - (g.detach() * adjoint).sum()
        grad_images.index_add_(0, problem.batches[k], grad_batch, alpha=neg_lr)
        adjoint = adjoint - lr * hvp
    return loss.detach(), grad_images, grad_lr


UNROLLS: Registry[Callable[[Unroll], UnrollResult]] = Registry("unroll", {"plain": plain_unroll, "bounded": bounded_unroll})


def plan_steps(count: int, syn_steps: int, batch_syn: int | None, generator: torch.Generator) -> list[torch.Tensor]:
    """Minibatches of the synthetic set for each student step: chunks of fresh permutations."""
    size = count if batch_syn is None else min(batch_syn, count)
    chunks: list[torch.Tensor] = []
    while len(chunks) < syn_steps:
        chunks.extend(torch.randperm(count, generator=generator).split(size))
    return chunks[:syn_steps]


class MTTDistiller(Distiller):
    """MTT's state (images, learned lr, their optimisers) and one iteration; the driver runs the loop."""

    def __init__(self, dataset: Dataset, ipc: int, config: MTTConfig, context: RunContext) -> None:
        check_ipc(dataset, ipc, "mtt")
        self.config, self.seed = config, context.seed
        device = dataset.device
        if config.zca and dataset.channels == 1:
            context.log(
                f"warning: ZCA on the 1-channel '{dataset.name}': the feasibility study's MTT with ZCA diverged on "
                "grayscale BreastMNIST (the stable presets switch it off)"
            )
        self.dataset = dataset
        self.zca = ZCA.for_dataset(dataset) if config.zca else None
        self.buffer: ExpertBuffer = build_buffer(
            dataset,
            config.expert_settings(config.zca),
            config.num_experts,
            root=config.buffer_root,
            parallel=config.experts_parallel,
            max_minutes=config.max_expert_minutes,
            smaller_buffer_hint=config.smaller_buffer_hint(),
            progress=context.progress,
            log=context.log,
        )
        self.student = FlatModel(new_network(dataset, config.expert_settings(config.zca)))
        real = real_init(dataset, ipc, context.seed)  # the random baseline's subset
        self.images = (
            (real if self.zca is None else self.zca.whiten_normalized(dataset, real)).detach().clone().requires_grad_(True)
        )
        self.labels = class_labels(dataset, ipc)
        syn_lr = config.lr_teacher if config.syn_lr_init is None else config.syn_lr_init
        self.syn_lr = torch.tensor(syn_lr, device=device, dtype=self.images.dtype, requires_grad=True)
        self.optimizers = {
            "opt_img": torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum),
            "opt_lr": torch.optim.SGD([self.syn_lr], lr=config.lr_lr, momentum=config.momentum),
        }
        self.augment = DiffAugment(config.augment) if config.augment else None
        self.lr_clamps = torch.zeros((), dtype=torch.long, device=device)  # iterations that ended clamped (kept on the device)

    def problem(self, iteration: int) -> Unroll:
        """Draw the expert, start epoch, minibatches and augmentation seeds of iteration `iteration` (counted from 1)."""
        c = self.config
        generator = torch.Generator().manual_seed(iteration_seeds(self.seed, iteration, 1)[0])
        expert = int(torch.randint(min(c.num_experts, self.buffer.num_experts), (1,), generator=generator))
        start_epoch = int(torch.randint(c.max_start_epoch, (1,), generator=generator))
        batches = [to_device(b, self.images.device) for b in plan_steps(len(self.labels), c.syn_steps, c.batch_syn, generator)]
        seeds = torch.randint(2**31 - 1, (c.syn_steps,), generator=generator).tolist()
        device, dtype = self.images.device, self.images.dtype
        start = to_device(self.buffer.snapshot(expert, start_epoch), device).to(dtype)
        target = to_device(self.buffer.snapshot(expert, start_epoch + c.expert_epochs), device).to(dtype)
        return Unroll(
            self.student, start, target, self.images, self.labels, self.syn_lr, batches, seeds, self.augment, self.config.bf16
        )

    def step(self, iteration: int) -> torch.Tensor:
        """One MTT iteration: unroll, check, update pixels and syn_lr, clamp syn_lr."""
        number = iteration + 1
        loss, grad_images, grad_lr = UNROLLS.get(self.config.unroll)(self.problem(number))
        # The guard must stop the run before the update, so it reads the device once per iteration:
        # the loss and the gradients' finiteness in one copy.
        grads_finite = torch.isfinite(grad_images).all() & torch.isfinite(grad_lr)
        value, finite = torch.stack([loss, grads_finite.to(loss.dtype)]).tolist()
        if not (math.isfinite(value) and finite):
            raise DivergenceError(
                f"MTT diverged at iteration {number} (loss {value:.4g}, syn_lr {self.syn_lr.item():.4g}); "
                "no result is written and the last checkpoint is kept. Lower lr_img, lr_lr or syn_steps"
            )
        self.images.grad, self.syn_lr.grad = grad_images, grad_lr
        for optimizer in self.optimizers.values():
            optimizer.step()
        if self.config.min_syn_lr is not None:
            with torch.no_grad():  # the clamp and its count stay on the device (no read-back per iteration)
                self.lr_clamps += self.syn_lr < self.config.min_syn_lr
                self.syn_lr.clamp_(min=self.config.min_syn_lr)
        self.images.grad = self.syn_lr.grad = None
        return loss

    def synthetic_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthetic images in the dataset's normalised space (un-whitened when ZCA is on), and their labels."""
        images = self.images.detach()
        return (images if self.zca is None else self.zca.unwhiten_normalized(self.dataset, images)), self.labels

    def evaluation_dataset(self, dataset: Dataset) -> Dataset:
        """The dataset in the space the images are learnt in (ZCA space when on, as the reference scores them)."""
        return dataset if self.zca is None else whitened_dataset(dataset, self.zca)

    def learned_lr(self) -> float:
        return self.syn_lr.item()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "syn_lr": self.syn_lr.item(), "lr_clamps": int(self.lr_clamps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.fill_(state["syn_lr"])
            self.lr_clamps.fill_(state["lr_clamps"])

    def health(self, losses: list[float]) -> list[str]:
        """Signs of a badly scaled setup in the first iterations: the student overshoots, or syn_lr sits on its floor."""
        warnings = []
        if losses and sum(losses) / len(losses) > 2:
            warnings.append(
                f"warning: mean MTT loss {sum(losses) / len(losses):.3g} > 2 over the first {len(losses)} iterations: the "
                "student moves much further than the expert; lower syn_lr_init or syn_steps, or raise expert_epochs"
            )
        if int(self.lr_clamps) > len(losses) // 2:
            warnings.append(
                f"warning: syn_lr was clamped to min_syn_lr in {int(self.lr_clamps)} of {len(losses)} iterations; "
                "lower lr_lr or syn_lr_init (evaluation trains with this lr)"
            )
        return warnings

    def finish(self, losses: list[float]) -> dict[str, Any]:
        if not self.syn_lr.item() > 0:
            raise DivergenceError(f"MTT's learned lr ended at {self.syn_lr.item():.4g} (not positive); the set is not usable")
        # the buffer's identity, not where this machine keeps it: no local path in a set that may be shared
        return {
            "extra": {
                "loss": list(losses),
                "syn_lr_clamps": int(self.lr_clamps),
                "zca": self.zca is not None,
                "buffer": {k: v for k, v in self.buffer.summary().items() if k != "directory"},
            }
        }


def run_mtt(dataset: Dataset, ipc: int, config: MTTConfig, context: RunContext) -> SyntheticSet:
    """Distil `dataset` to `ipc` images per class by trajectory matching."""
    return run_distiller("mtt", dataset, ipc, config, context, MTTDistiller(dataset, ipc, config, context))


SPEC = register_method(
    MethodSpec(
        name="mtt",
        run=run_mtt,
        config_class=MTTConfig,
        summary="matching training trajectories (learned lr; builds an expert buffer first if needed)",
        eval_augment=DEFAULT_STRATEGY,
        supports_multilabel=False,
        ipc_defaults=stable_preset,
    )
)

__all__ = ["UNROLLS", "DivergenceError", "MTTConfig", "MTTDistiller", "Unroll", "bounded_unroll", "plain_unroll", "run_mtt"]
