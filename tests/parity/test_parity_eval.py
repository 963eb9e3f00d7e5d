"""The evaluation schedule of DatasetCondensation's `evaluate_synset` (and MTT's): Epoch+1 epochs, and after
epoch Epoch//2+1 a new SGD optimiser at lr x0.1, so the momentum buffer starts again from zero."""

from __future__ import annotations

import pytest
import torch

from medistill.train import TrainProtocol, train_model
from medistill.train.protocol import model_seeds
from medistill.train.stacked import train_stacked


class RecordingSGD(torch.optim.SGD):
    """The real SGD, logging every step: (optimiser, lr, momentum, momentum buffer empty before the step)."""

    log: list[tuple[int, float, float, bool]] = []

    def step(self, closure=None):
        group = self.param_groups[0]
        first = group["params"][0]
        empty = self.state.get(first, {}).get("momentum_buffer") is None
        RecordingSGD.log.append((id(self), group["lr"], group["momentum"], empty))
        return super().step(closure)


def expected_schedule(epochs: int, lr: float) -> list[tuple[float, bool]]:
    """(lr, fresh optimiser) per epoch when every epoch is one step."""
    drop = epochs // 2 + 1
    return [(lr if epoch <= drop else lr * 0.1, epoch in (0, drop + 1)) for epoch in range(epochs + 1)]


@pytest.mark.parametrize(("epochs", "lr"), [(4, 0.01), (5, 0.05), (2, 0.01), (1, 0.01)])
@pytest.mark.parametrize("stacked", [False, True])
def test_lr_and_momentum_per_step(small, monkeypatch: pytest.MonkeyPatch, epochs: int, lr: float, stacked: bool) -> None:
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    RecordingSGD.log = []
    protocol = TrainProtocol(epochs=epochs, lr=lr, batch_size=256)  # 12 images: one step per epoch
    images, labels = small.train.images, small.train.labels
    if stacked:
        train_stacked(images, labels, small, protocol, seeds=model_seeds(0, 2))
    else:
        train_model(images, labels, small, protocol, seed=0)
    got = RecordingSGD.log
    assert [(pytest.approx(step_lr), empty) for _, step_lr, _, empty in got] == expected_schedule(epochs, lr)
    assert all(momentum == 0.9 for _, _, momentum, _ in got)
    optimisers = [identity for identity, *_ in got]
    drop = epochs // 2 + 1
    assert len(set(optimisers[: drop + 1])) == 1
    if drop < epochs:  # epochs after the drop run on a second optimiser (for epochs <= 2 the drop comes after the last epoch)
        assert len(set(optimisers[drop + 1 :])) == 1 and optimisers[drop + 1] != optimisers[0]
