"""DC/DSA with a batch-norm network: before each match the reference runs real images through the network
in train mode and then freezes the batch-norm statistics (eval mode) for the match."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medistill.methods import RunContext, distill
from medistill.methods.dc import GradientMatching


@pytest.mark.parametrize("class_batching", ["loop", "vmap"])
def test_batch_norm_is_frozen_from_real_images_during_the_match(make_small, monkeypatch: pytest.MonkeyPatch, class_batching: str) -> None:
    data = make_small(size=16)
    states: list[tuple[bool, float]] = []
    match = GradientMatching.match_loop if class_batching == "loop" else GradientMatching.match_vmap

    def recording(self, images, picks, rng):
        norms = [m for m in self.network.module.modules() if isinstance(m, nn.BatchNorm2d)]
        states.append((any(m.training for m in norms), float(norms[0].running_mean.abs().sum())))
        return match(self, images, picks, rng)

    monkeypatch.setattr(GradientMatching, "match_loop" if class_batching == "loop" else "match_vmap", recording)
    result = distill("dc", data, 1, {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 4, "model": "convnet_bn",
                                     "class_batching": class_batching}, context=RunContext(seed=0))
    assert len(states) == 4 and torch.isfinite(result.images).all()
    assert all(not training for training, _ in states)  # frozen: every match sees eval-mode batch norm
    assert all(moved > 0 for _, moved in states)  # ... with statistics updated from real images first
