"""MTT expert buffer: stacked training equals sequential and is the same in any group, storage round-trips, builds
state their cost first, resume and are reused, the experts at once follow the device and its memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medistill.augment import DiffAugment
from medistill.errors import ConfigError
from medistill.methods import experts as experts_module
from medistill.methods.experts import (
    ExpertBuffer,
    ExpertSettings,
    FlatModel,
    build_buffer,
    buffer_dir,
    expert_memory_bytes,
    expert_seed,
    experts_at_once,
    init_expert,
    new_network,
    stacked_count,
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
    grown = build_buffer(breast, settings, 2, root=tmp_path, log=messages.append)
    assert grown.num_experts == 2 and grown.paths[0].stat().st_mtime_ns == kept
    fresh = build_buffer(breast, settings, 2, root=tmp_path / "other")
    assert torch.equal(grown.trajectory(1), fresh.trajectory(1))
    build_buffer(breast, settings, 2, root=tmp_path, log=messages.append)
    assert "training 1 expert(s) x 1 epochs" in messages[0] and "reusing" in messages[2]
    assert "training 1 expert(s) x 1 epochs on breastmnist (the buffer holds 1 of the 2 needed)" in messages[1]


@pytest.mark.slow
def test_experts_are_the_same_whichever_group_trains_them(breast, tmp_path: Path) -> None:
    settings = ExpertSettings(epochs=2, model_kwargs=TINY)
    messages: list[str] = []
    together = build_buffer(breast, settings, 2, root=tmp_path / "together", parallel=2, log=messages.append)
    alone = build_buffer(breast, settings, 2, root=tmp_path / "alone", log=messages.append)
    assert "(2 at once: as asked)" in messages[0]
    assert "(1 at once: one at a time on cpu" in messages[1]
    for index in range(2):
        assert torch.equal(together.trajectory(index), alone.trajectory(index))
    assert not torch.equal(alone.trajectory(0), alone.trajectory(1))


def test_build_states_the_work_its_estimate_and_where_before_training(breast, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(experts_module, "step_seconds", lambda dataset, settings, count: 4.0 * count)
    settings = ExpertSettings(epochs=2, model_kwargs=TINY)
    messages: list[str] = []
    buffer = build_buffer(breast, settings, 3, root=tmp_path, parallel=2, smaller_buffer_hint="use fewer", log=messages.append)
    # 2 groups (2 + 1 experts) x 2 epochs x 3 steps (546 images, batches of 256) x 8 s per step of 2 experts
    (notice,) = messages
    assert notice == (f"training 3 expert(s) x 2 epochs on breastmnist (2 at once: as asked) into {buffer.directory}: "
                      "about 1.6 min on cpu (an estimate from one timed training step); use fewer")


def test_build_over_the_time_limit_trains_nothing(breast, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(experts_module, "step_seconds", lambda dataset, settings, count: 10.0)
    settings = ExpertSettings(epochs=1, model_kwargs=TINY)
    build_buffer(breast, settings, 1, root=tmp_path, max_minutes=0.5)  # 3 steps x 10 s: within 30 s
    messages: list[str] = []
    with pytest.raises(ConfigError) as refused:
        build_buffer(breast, settings, 3, root=tmp_path, max_minutes=0.5, smaller_buffer_hint="use fewer", log=messages.append)
    assert str(refused.value) == ("training 2 expert(s) x 1 epochs on breastmnist (the buffer holds 1 of the 3 needed) would take "
                                  "about 60 s on cpu (an estimate from one timed training step), over the limit of 0.5 min "
                                  "(max_expert_minutes); nothing was trained; use fewer")
    assert messages == [] and ExpertBuffer(buffer_dir(breast, settings, tmp_path)).num_experts == 1


def test_the_step_is_timed_on_the_real_data_without_touching_the_global_random_state(breast) -> None:
    settings = ExpertSettings(epochs=1, model_kwargs=TINY)
    before = torch.random.get_rng_state()
    seconds = experts_module.step_seconds(breast, settings, 2)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert 0 < seconds < 5


def test_expert_memory_estimate_counts_parameters_activations_and_inputs(breast) -> None:
    settings = ExpertSettings(epochs=1, model_kwargs=TINY)
    params = FlatModel(new_network(breast, settings)).num_params
    # width-8 ConvNet on 28 px (first conv padded to 32): conv, norm, relu at 32^2, pool 16^2, then 16^2 -> 8^2,
    # 8^2 -> 4^2, per channel; then 2 logits
    activations = 8 * (3 * 32**2 + 16**2 + 3 * 16**2 + 8**2 + 3 * 8**2 + 4**2) + 2
    assert expert_memory_bytes(breast, settings) == 4 * (4 * params + 256 * (3 * activations + 4 * 28 * 28))


def test_experts_at_once_follow_the_device_and_its_free_memory(breast) -> None:
    settings = ExpertSettings(epochs=1, model_kwargs=TINY)
    assert experts_at_once(breast, settings, 5, None)[0] == 1  # the CPU: one at a time
    assert experts_at_once(breast, settings, 5, 3) == (3, "as asked")
    assert experts_at_once(breast, settings, 2, 10) == (2, "as asked")  # never more than are missing
    gib = 2**30
    assert stacked_count(10 * gib, gib, 20) == 8  # 80% of the free memory
    assert stacked_count(10 * gib, gib, 3) == 3
    assert stacked_count(gib // 2, gib, 5) == 1  # at least one, even when the estimate says none fits


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
