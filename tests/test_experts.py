"""MTT expert buffer: stacked training equals sequential, storage round-trips, builds resume and are reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medistill.augment import DiffAugment
from medistill.errors import ConfigError
from medistill.methods.experts import (
    ExpertBuffer,
    ExpertSettings,
    FlatModel,
    build_buffer,
    buffer_dir,
    expert_seed,
    init_expert,
    new_network,
    train_experts,
)

TINY = {"width": 8}


def sequential_expert(dataset, settings: ExpertSettings, index: int) -> torch.Tensor:
    """One expert trained the ordinary way (nn.Module + torch.optim.SGD), with the stacked code's seeds."""
    seed = expert_seed(settings.seed, index)
    model = init_expert(dataset, settings, seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr_teacher)
    augment = DiffAugment(settings.augment)
    images, labels = dataset.train.images, dataset.train.labels
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            loss = F.cross_entropy(model(augment(images[idx], generator=generator)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return FlatModel(model).flatten(model)


def test_stacked_training_equals_sequential(breast) -> None:
    settings = ExpertSettings(epochs=2, model_kwargs=TINY)
    trajectories, accs = train_experts(breast, settings, [0, 1])
    assert trajectories.shape[:2] == (2, 3) and len(accs) == 2
    assert not torch.equal(trajectories[0, -1], trajectories[1, -1])
    for row, index in enumerate([0, 1]):
        assert torch.equal(trajectories[row, 0], FlatModel(new_network(breast, settings)).flatten(
            init_expert(breast, settings, expert_seed(0, index))))
        reference = sequential_expert(breast, settings, index)
        moved = (trajectories[row, -1] - trajectories[row, 0]).abs().max()
        assert moved > 1e-3
        torch.testing.assert_close(trajectories[row, -1], reference, atol=3e-4, rtol=1e-3)  # vmap vs module rounding over 6 steps


@pytest.mark.parametrize("fp16", [False, True])
def test_buffer_round_trips(breast, tmp_path: Path, fp16: bool) -> None:
    settings = ExpertSettings(epochs=1, model_kwargs=TINY, fp16=fp16)
    buffer = build_buffer(breast, settings, 2, root=tmp_path)
    trained, _ = train_experts(breast, settings, [0, 1])
    assert buffer.num_experts == 2 and buffer.epochs == 1
    reopened = ExpertBuffer(buffer.directory)
    for i in range(2):
        stored = reopened.trajectory(i)
        assert stored.dtype == torch.float32 and stored.shape == trained[i].shape
        if fp16:
            torch.testing.assert_close(stored, trained[i], atol=1e-3, rtol=1e-3)
        else:
            assert torch.equal(stored, trained[i])
        assert torch.equal(reopened.snapshot(i, 1), stored[1])
    per_value = 2 if fp16 else 4
    assert buffer.size_bytes() >= 2 * 2 * FlatModel(new_network(breast, settings)).num_params * per_value


def test_build_resumes_per_expert_and_is_reused(breast, tmp_path: Path) -> None:
    settings = ExpertSettings(epochs=1, model_kwargs=TINY)
    messages: list[str] = []
    first = build_buffer(breast, settings, 1, root=tmp_path, log=messages.append)
    kept = first.paths[0].stat().st_mtime_ns
    grown = build_buffer(breast, settings, 2, root=tmp_path, parallel=1, log=messages.append)
    assert grown.num_experts == 2 and grown.paths[0].stat().st_mtime_ns == kept
    together = build_buffer(breast, settings, 2, root=tmp_path / "other")
    torch.testing.assert_close(grown.trajectory(1), together.trajectory(1), atol=1e-6, rtol=1e-5)
    build_buffer(breast, settings, 2, root=tmp_path, log=messages.append)
    assert "training 1 expert(s)" in messages[0] and "training 1 expert(s)" in messages[1] and "reusing" in messages[2]


def test_batch_norm_models_are_refused(breast, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch norm"):
        build_buffer(breast, ExpertSettings(epochs=1, model="convnet_bn"), 1, root=tmp_path)


def test_experts_cli_builds_then_reuses(medmnist_root: Path, tmp_path: Path, breast) -> None:
    from medistill.cli import app

    args = ["experts", "breastmnist", "--num-experts", "2", "--epochs", "1", "--out", str(tmp_path), "--data-root",
            str(medmnist_root), "--device", "cpu", "--model-arg", "width=16", "--no-progress"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 experts x 1 epochs" in first.output
    directory = buffer_dir(breast, ExpertSettings(epochs=1, model_kwargs={"width": 16}), tmp_path)
    files = sorted(directory.glob("expert_*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 2
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "reusing" in second.output
    assert [f.stat().st_mtime_ns for f in files] == stamps
