"""`kcenter`: a class-balanced real subset by greedy k-center in the same feature space as herding.

Greedy k-center (Sener & Savarese 2018; the coreset baseline of the DC papers and DC-BENCH): within
each class, start from one image drawn with the run's seed, then repeatedly add the image farthest
(Euclidean) from its nearest chosen image, in the features of a network trained on the whole
training set (`feature_space`). The output is real training images: never exported, flagged by the audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medistill.methods.feature_space import FeatureSettings, register_chosen_subset


@dataclass
class KCenterConfig(FeatureSettings):
    """The feature network's training; the first center of each class comes from the run's seed."""


def kcenter_order(features: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of `count` rows: a seeded first row, then each time the row farthest from its nearest chosen row.

    Ties go to the lowest index. After the first pick the choice is deterministic.
    """
    features = features.double()
    first = int(torch.randint(len(features), (1,), generator=generator))
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)
    for _ in range(count - 1):
        nearest[chosen] = -1.0
        pick = int(torch.argmax(nearest))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (features - features[pick]).norm(dim=1))
    return torch.tensor(chosen, dtype=torch.long)


SPEC = register_chosen_subset(
    "kcenter",
    kcenter_order,
    KCenterConfig,
    "class-balanced real subset by greedy k-center in a full-set ConvNet's features (baseline)",
)
