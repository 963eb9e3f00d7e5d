"""`herding`: a class-balanced real subset whose running feature mean tracks the class mean.

Herding (Welling 2009; the coreset baseline of the DC papers and DC-BENCH): within each class,
greedily add the image that brings the mean of the chosen features closest (Euclidean) to the
mean of all the class's features, in the feature space of a network trained on the whole training
set (`feature_space`). The output is real training images: never exported, flagged by the audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medistill.methods.feature_space import FeatureSettings, register_chosen_subset


@dataclass
class HerdingConfig(FeatureSettings):
    """The feature network's training; the selection itself has no settings."""


def herding_order(features: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row indices of `count` rows of `features`, chosen greedily so that their running mean tracks the mean of all rows.

    Step k adds the unchosen row x minimising || mean - (sum of chosen + x) / k ||; ties go to the lowest
    index. Deterministic: `generator` is accepted for a common signature and not used.
    """
    features = features.double()
    target = features.mean(dim=0)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    total = torch.zeros_like(target)
    chosen = []
    for k in range(1, count + 1):
        distance = ((total + features) / k - target).norm(dim=1)
        distance[~available] = torch.inf
        pick = int(torch.argmin(distance))
        chosen.append(pick)
        available[pick] = False
        total = total + features[pick]
    return torch.tensor(chosen, dtype=torch.long)


SPEC = register_chosen_subset(
    "herding", herding_order, HerdingConfig, "class-balanced real subset by herding in a full-set ConvNet's features (baseline)"
)
