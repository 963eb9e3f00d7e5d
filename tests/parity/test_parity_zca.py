"""ZCA as the MTT reference uses it (kornia ZCAWhitening(eps=0.1, compute_inv=True)): fitted on [0, 1] pixels;
the evaluation networks train and test in ZCA space."""

from __future__ import annotations

import torch

from medistill import pipeline
from medistill.artifact import SyntheticSet
from medistill.methods.base import new_set
from medistill.train import TrainProtocol
from medistill.zca import ZCA, to_pixels


def direct_whitening(train_pixels: torch.Tensor, pixels: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """W = U diag(1 / sqrt(S + eps)) U^T from an SVD of the unbiased covariance; whitened = (x - mean) W."""
    flat = train_pixels.reshape(len(train_pixels), -1).double()
    mean = flat.mean(0)
    cov = (flat - mean).T @ (flat - mean) / (len(flat) - 1)
    u, s, _ = torch.linalg.svd(cov)
    w = u @ torch.diag(1 / torch.sqrt(s + eps)) @ u.T
    return ((pixels.reshape(len(pixels), -1).double() - mean) @ w).reshape(pixels.shape)


def test_fitted_on_pixels_against_a_direct_svd(make_small) -> None:
    data = make_small(channels=3, size=4, per_class=20)
    train_pixels = to_pixels(data, data.train.images)
    assert 0 <= float(train_pixels.min()) and float(train_pixels.max()) <= 1
    zca = ZCA.for_dataset(data)
    got = zca.whiten_normalized(data, data.test.images)
    expected = direct_whitening(train_pixels, to_pixels(data, data.test.images)).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zca.unwhiten_normalized(data, got), data.test.images, atol=1e-4, rtol=1e-4)


def test_a_zca_set_is_scored_in_zca_space(make_small, monkeypatch) -> None:
    data = make_small(channels=3, size=4, per_class=20)
    seen = {}

    def fake_evaluate(images, labels, dataset, protocol, **kwargs):
        seen["images"], seen["test"] = images, dataset.test.images
        return pipeline.Scores(acc=[0.5], auc=[0.5])

    monkeypatch.setattr(pipeline, "evaluate", fake_evaluate)
    synthetic: SyntheticSet = new_set(data, data.train.images[:2], data.train.labels[:2], method="mtt", ipc=1, seed=0)
    synthetic.extra = {"zca": True}
    pixels = to_pixels(data, data.train.images)
    pipeline.score_set(synthetic, data, TrainProtocol(epochs=1), num_models=1, seed=0, progress=False)
    torch.testing.assert_close(seen["images"], direct_whitening(pixels, pixels[:2]).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen["test"], direct_whitening(pixels, to_pixels(data, data.test.images)).float(), atol=1e-4, rtol=1e-4)
    pipeline.score_set(synthetic, data, TrainProtocol(epochs=1), num_models=1, seed=0, progress=False, zca_space=False)
    torch.testing.assert_close(seen["images"], data.train.images[:2])  # as stored: what a receiver without the transform trains on
