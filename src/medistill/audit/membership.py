"""Membership inference: can an attacker tell which real images were in the training split?

Three target models are trained with the same architecture: on the synthetic set, on a random
real subset of the same size and class balance (with the synthetic set's protocol, so only the
data differ), and on the full training set. Members are the real training images (the patients
the synthetic set was made from), non-members the real test images, as in the literature.

Attacks:
- loss threshold (Yeom et al. 2018): a lower loss means "member";
- offline LiRA (Carlini et al. 2022), a shadow-model attack: shadow networks are trained on
  complementary random halves of train+test with the full-set protocol; for each image the
  attacker keeps the logit-scaled confidence of the shadows that did NOT train on it (mean
  mu_out). With a global variance (their advice below 64 shadows) the likelihood-ratio test ranks
  images by phi_target - mu_out, which is the score used. The shadows imitate training on real
  data, not re-running the distillation (far too costly), which makes the attack on the synthetic
  target weaker than a fully adaptive one: read it as a lower bound.

Every attack reports ROC AUC and the TPR at 1% and 0.1% FPR. A TPR at FPR f is only reported when
there are at least 1/f non-members (below that not even one false positive is allowed, so the
figure is noise); otherwise it is None with the reason in `notes`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from medistill.artifact import SyntheticSet, renormalize
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.methods import get_method
from medistill.train import TrainProtocol, model_seeds, scores_on, train_model

FPRS = (0.01, 0.001)


def roc_summary(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, fprs: tuple[float, ...] = FPRS) -> dict[str, Any]:
    """AUC and TPR at fixed FPRs of an attack whose higher scores mean 'member'."""
    members = member_scores.detach().double().cpu().numpy()
    others = nonmember_scores.detach().double().cpu().numpy()
    y_true = [1] * len(members) + [0] * len(others)
    y_score = list(members) + list(others)
    fpr, tpr, _ = roc_curve(y_true, y_score)
    tprs: dict[str, float | None] = {}
    notes = []
    for target in fprs:
        needed = math.ceil(1 / target - 1e-9)
        if len(others) >= needed:
            tprs[f"{target:g}"] = float(tpr[fpr <= target].max())
        else:
            tprs[f"{target:g}"] = None
            notes.append(f"TPR at {target:.1%} FPR not meaningful: {len(others)} non-members, at least {needed} needed")
    return {
        "auc": float(roc_auc_score(y_true, y_score)),
        "tpr_at_fpr": tprs,
        "members": len(members),
        "non_members": len(others),
        "notes": notes,
    }


@torch.no_grad()
def per_example_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, multilabel: bool, batch_size: int = 1024
) -> torch.Tensor:
    """The training loss of each example (cross-entropy, or BCE averaged over labels)."""
    model.eval()
    losses = []
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size])
        y = labels[i : i + batch_size]
        if multilabel:
            losses.append(F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(dim=1))
        else:
            losses.append(F.cross_entropy(logits, y, reduction="none"))
    return torch.cat(losses)


@torch.no_grad()
def logit_confidence(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, multilabel: bool, batch_size: int = 1024
) -> torch.Tensor:
    """LiRA's logit-scaled confidence log(p / (1 - p)) of the true label, computed stably from the logits."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size]).double()
        y = labels[i : i + batch_size]
        if multilabel:
            out.append((logits * (2 * y.double() - 1)).mean(dim=1))
        else:
            true = logits.gather(1, y.view(-1, 1)).squeeze(1)
            others = logits.scatter(1, y.view(-1, 1), -math.inf).logsumexp(dim=1)
            out.append(true - others)
    return torch.cat(out)


def matched_real_subset(synthetic: SyntheticSet, dataset: Dataset, seed: int) -> torch.Tensor:
    """Indices of real training images with the synthetic set's size and per-class counts."""
    generator = torch.Generator().manual_seed(seed)
    if dataset.is_multilabel:
        return torch.randperm(len(dataset.train), generator=generator)[: len(synthetic)]
    counts = torch.bincount(synthetic.labels.long().cpu(), minlength=dataset.num_classes).tolist()
    picks = []
    for label, count in enumerate(counts):
        members = dataset.class_indices(label).cpu()
        picks.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picks)


def membership_audit(
    synthetic: SyntheticSet,
    dataset: Dataset,
    *,
    model: str = "convnet",
    epochs: int | None = None,
    shadows: int = 8,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Loss-threshold and (if `shadows` > 0) offline LiRA attacks on the synthetic, random-subset and full targets.

    `epochs` overrides every protocol's epochs (None = the reference: the synthetic set's method
    protocol for the synthetic and random targets, 300 epochs for the full target and shadows).
    """
    if shadows < 0 or shadows % 2:
        raise ConfigError(f"the number of LiRA shadow models must be 0 or an even number >= 2, got {shadows}")
    start = time.perf_counter()
    device = dataset.device
    multilabel = dataset.is_multilabel
    spec = get_method(synthetic.method)
    set_protocol = _with_epochs(spec.default_protocol(model), epochs)
    full_protocol = _with_epochs(get_method("full").default_protocol(model), epochs)
    subset = matched_real_subset(synthetic, dataset, seed).to(device)
    train, test = dataset.train, dataset.test
    plans = {
        "synthetic": (
            renormalize(synthetic, dataset).to(device),
            synthetic.labels.to(device),
            set_protocol,
            synthetic.learned_lr,
        ),
        "random": (train.images[subset], train.labels[subset], set_protocol, None),
        "full": (train.images, train.labels, full_protocol, None),
    }
    seeds = model_seeds(seed, len(plans) + shadows)
    targets: dict[str, Any] = {}
    trained: dict[str, nn.Module] = {}
    for (name, (images, labels, protocol, lr)), model_seed in zip(plans.items(), seeds):
        log(f"membership: training the '{name}' target ({len(images)} images, {protocol.epochs} epochs)")
        net = train_model(images, _train_labels(labels, multilabel), dataset, protocol, seed=model_seed, lr=lr)
        trained[name] = net
        acc, auc = scores_on(net, dataset)
        member_loss = per_example_loss(net, train.images, train.labels, multilabel)
        nonmember_loss = per_example_loss(net, test.images, test.labels, multilabel)
        targets[name] = {
            "train_images": len(images),
            "protocol": protocol.to_dict(),
            "learned_lr": lr,
            "test_acc": acc,
            "test_auc": auc,
            "loss_attack": roc_summary(-member_loss, -nonmember_loss),
        }
        if name == "random":
            targets[name]["loss_attack_on_subset"] = roc_summary(-member_loss[subset], -nonmember_loss)
    lira = _offline_lira(trained, dataset, full_protocol, shadows, seeds[len(plans) :], log) if shadows else None
    for name, result in (lira or {}).get("targets", {}).items():
        targets[name]["lira"] = result
    return {
        "attack_model": model,
        "members": len(train),
        "non_members": len(test),
        "targets": targets,
        "lira": {k: v for k, v in lira.items() if k != "targets"}
        if lira
        else {"skipped": "no shadow models asked for (shadows=0)"},
        "seconds": time.perf_counter() - start,
    }


def _offline_lira(
    targets: dict[str, nn.Module],
    dataset: Dataset,
    protocol: TrainProtocol,
    shadows: int,
    seeds: list[int],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Offline LiRA with a global variance: score = phi_target - mean phi of the shadows that did not train on the image."""
    multilabel = dataset.is_multilabel
    images = torch.cat([dataset.train.images, dataset.test.images])
    labels = torch.cat([dataset.train.labels, dataset.test.labels])
    n, n_train = len(images), len(dataset.train)
    generator = torch.Generator().manual_seed(seeds[0])
    out_sum = torch.zeros(n, dtype=torch.float64, device=images.device)
    out_count = torch.zeros(n, dtype=torch.float64, device=images.device)
    for pair in range(shadows // 2):
        order = torch.randperm(n, generator=generator).to(images.device)
        halves = (order[: n // 2], order[n // 2 :])
        for k, inside in enumerate(halves):
            log(f"membership: shadow model {2 * pair + k + 1}/{shadows} ({len(inside)} images, {protocol.epochs} epochs)")
            net = train_model(
                images[inside], _train_labels(labels[inside], multilabel), dataset, protocol, seed=seeds[2 * pair + k]
            )
            outside = halves[1 - k]
            out_sum[outside] += logit_confidence(net, images[outside], labels[outside], multilabel)
            out_count[outside] += 1
    mu_out = out_sum / out_count
    results = {}
    for name, net in targets.items():
        score = logit_confidence(net, images, labels, multilabel) - mu_out
        results[name] = roc_summary(score[:n_train], score[n_train:])
    return {
        "shadows": shadows,
        "shadow_protocol": protocol.to_dict(),
        "pool": "train + test, complementary random halves",
        "variance": "global",
        "targets": results,
    }


def _train_labels(labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return labels.float() if multilabel else labels


def _with_epochs(protocol: TrainProtocol, epochs: int | None) -> TrainProtocol:
    return protocol if epochs is None else replace(protocol, epochs=epochs)


__all__ = ["FPRS", "logit_confidence", "matched_real_subset", "membership_audit", "per_example_loss", "roc_summary"]
