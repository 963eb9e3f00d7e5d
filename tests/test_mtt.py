"""MTT: bounded and plain unrolls agree, the loss falls, a killed run resumes exactly, guards hold, a buffer to
build is announced with its cost (and refused over a time limit) before any expert is trained."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
import torch

from medistill.errors import ConfigError, MedistillError
from medistill.methods import RunContext, distill
from medistill.methods.checkpoint import CHECKPOINT_NAME, read_state
from medistill.methods import experts as experts_module
from medistill.methods import mtt as mtt_module
from medistill.methods.mtt import MTTConfig, MTTDistiller, Unroll, bounded_unroll, plain_unroll
from medistill.zca import ZCA


@pytest.fixture(scope="module")
def buffer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experts")


def tiny(buffer_root: Path, **overrides) -> MTTConfig:
    """A small, fast MTT setup on BreastMNIST: width-16 ConvNet, 2 experts x 3 epochs."""
    settings = dict(iterations=6, syn_steps=4, expert_epochs=1, max_start_epoch=2, num_experts=2, buffer_epochs=3,
                    lr_img=10.0, lr_lr=1e-6, model_kwargs={"width": 16}, buffer_root=str(buffer_root), checkpoint_every=2)
    settings.update(overrides)
    return MTTConfig(**settings)


def test_distill_builds_the_buffer_first_then_reuses_it(breast, buffer_root: Path) -> None:
    messages: list[str] = []
    config = tiny(buffer_root, iterations=2)
    first = distill("mtt", breast, 1, config, context=RunContext(log=messages.append))
    distill("mtt", breast, 2, config, context=RunContext(log=messages.append))
    assert "training 2 expert(s) x 3 epochs" in messages[0]
    assert "reusing the expert buffer" in messages[1]
    assert first.learned_lr is not None and first.learned_lr > 0
    assert first.images.shape == (2, 1, 28, 28) and torch.isfinite(first.images).all()
    assert first.extra["buffer"]["num_experts"] == 2
    assert "directory" not in first.extra["buffer"]  # the set records what the buffer is, not where this machine keeps it


def one_expert_one_epoch(buffer_root: Path) -> dict:
    """The smallest buffer MTT accepts: 1 expert x 1 epoch of a width-8 ConvNet."""
    return {"iterations": 1, "syn_steps": 1, "num_experts": 1, "buffer_epochs": 1, "max_start_epoch": 1, "expert_epochs": 1,
            "model_kwargs": {"width": 8}, "buffer_root": str(buffer_root)}


@pytest.mark.slow
def test_a_buffer_to_build_is_announced_with_its_cost_first(breast, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(experts_module, "step_seconds", lambda dataset, settings, count: 4.0)
    messages: list[str] = []
    distill("mtt", breast, 1, one_expert_one_epoch(tmp_path), context=RunContext(log=messages.append))
    notice = messages[0]
    assert notice.startswith(f"training 1 expert(s) x 1 epochs on breastmnist (1 at once: one at a time on cpu, "
                             f"where stacking brings no speed) into {tmp_path}/breastmnist-")
    # 1 expert x 1 epoch x 3 steps (546 images, batches of 256) x 4 s
    assert notice.endswith(": about 12 s on cpu (an estimate from one timed training step); "
                           "for a smaller buffer: --set num_experts=N (now 1)")


def test_the_default_buffer_says_how_to_ask_for_a_smaller_one() -> None:
    assert MTTConfig().smaller_buffer_hint() == (
        "for a smaller buffer: --set num_experts=N (now 20) or --set buffer_epochs=11 "
        "(now 30; the least max_start_epoch 10 + expert_epochs 2 allow)")


def test_cli_refuses_a_buffer_over_the_time_limit_in_one_line(medmnist_root: Path, tmp_path: Path, run_main, assert_one_line_error) -> None:
    argv = ["distill", "breastmnist", "-m", "mtt", "--ipc", "1", "--out", tmp_path / "run", "--data-root", medmnist_root,
            "--device", "cpu", "--no-progress", "--max-expert-minutes", "1e-6"]
    for pair in ("num_experts=1", "buffer_epochs=1", "max_start_epoch=1", "expert_epochs=1", "model_kwargs={width: 8}",
                 f"buffer_root={tmp_path / 'experts'}"):
        argv += ["--set", pair]
    code, err = run_main(argv)
    assert_one_line_error(code, err, "training 1 expert(s) x 1 epochs on breastmnist", "(an estimate from one timed training step)",
                          "over the limit of 1e-06 min (max_expert_minutes); nothing was trained", "--set num_experts=N")
    assert not list((tmp_path / "experts").rglob("expert_*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("augment", [None, "color_crop_cutout_flip_scale_rotate"])
def test_bounded_unroll_gradients_equal_plain(breast, buffer_root: Path, augment) -> None:
    config = tiny(buffer_root, syn_steps=7, batch_syn=3, dsa_strategy=augment)
    distiller = MTTDistiller(breast, 2, config, RunContext())
    p = distiller.problem(1)
    images = p.images.detach().double().requires_grad_(True)
    syn_lr = p.syn_lr.detach().double().requires_grad_(True)
    problem = Unroll(p.student, p.start.double(), p.target.double(), images, p.labels, syn_lr, p.batches, p.seeds, p.augment)
    assert {len(b) for b in p.batches} == {3, 1}  # chunking of 4 images into minibatches of 3
    plain, bounded = plain_unroll(problem), bounded_unroll(problem)
    assert float(plain[0]) > 0 and plain[1].abs().sum() > 0 and plain[2] != 0
    for a, b in zip(plain, bounded):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_loss_decreases_on_a_fixed_problem(breast, buffer_root: Path) -> None:
    config = tiny(buffer_root, iterations=12, num_experts=1, max_start_epoch=1, dsa_strategy=None, lr_img=10.0, lr_lr=0.0)
    result = distill("mtt", breast, 1, config, context=RunContext())
    losses = result.extra["loss"]
    assert len(losses) == 12
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(breast, buffer_root: Path, tmp_path: Path, monkeypatch, without_seconds) -> None:
    config = tiny(buffer_root, iterations=7, unroll="bounded", eval_every=3, eval_epochs=2)
    whole = distill("mtt", breast, 1, config, context=RunContext(seed=3))

    calls = {"n": 0}
    original = mtt_module.UNROLLS.get("bounded")

    def dies_at_five(problem):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(problem)

    monkeypatch.setitem(mtt_module.UNROLLS._items, "bounded", dies_at_five)
    with pytest.raises(KeyboardInterrupt):
        distill("mtt", breast, 1, config, context=RunContext(seed=3, checkpoint_dir=tmp_path))
    monkeypatch.setitem(mtt_module.UNROLLS._items, "bounded", original)
    with pytest.raises(ConfigError, match="--resume"):
        distill("mtt", breast, 1, config, context=RunContext(seed=3, checkpoint_dir=tmp_path))
    messages: list[str] = []
    resumed = distill("mtt", breast, 1, config, context=RunContext(seed=3, checkpoint_dir=tmp_path, resume=True, log=messages.append))
    assert any("mtt: resuming after iteration 4" in m for m in messages)
    assert torch.equal(resumed.images, whole.images)
    assert resumed.learned_lr == whole.learned_lr
    assert resumed.extra["loss"] == whole.extra["loss"]
    assert without_seconds(resumed.metrics["eval_points"]) == without_seconds(whole.metrics["eval_points"])
    assert [p["iteration"] for p in whole.metrics["eval_points"]] == [3, 6, 7]
    assert {"best", "last"} <= set(whole.metrics)


def test_syn_lr_never_goes_negative_or_nan(breast, buffer_root: Path) -> None:
    config = tiny(buffer_root, iterations=5, lr_lr=1e3, min_syn_lr=1e-4)
    result = distill("mtt", breast, 1, config, context=RunContext())
    assert result.extra["syn_lr_clamps"] > 0
    assert result.learned_lr == pytest.approx(1e-4) or result.learned_lr > 1e-4  # floor, in float32
    assert math.isfinite(result.learned_lr)
    assert torch.isfinite(result.images).all()


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_state(breast, buffer_root: Path, tmp_path: Path) -> None:
    config = tiny(buffer_root, iterations=5, lr_img=1e30, checkpoint_every=1)
    with pytest.raises(MedistillError, match=r"diverged at iteration (\d)") as caught:
        distill("mtt", breast, 1, config, context=RunContext(checkpoint_dir=tmp_path))
    diverged = int(re.search(r"iteration (\d)", str(caught.value)).group(1))
    state = read_state(tmp_path / CHECKPOINT_NAME)["state"]
    assert state["iteration"] == diverged - 1
    assert torch.isfinite(state["distiller"]["images"]).all()


def test_pipeline_evaluates_with_the_learned_lr(breast, buffer_root: Path, tmp_path: Path) -> None:
    from medistill.pipeline import EvalSettings, run_job

    config = tiny(buffer_root, iterations=2)
    job = run_job(breast, "mtt", 1, config=config, evaluation=EvalSettings(num_models=1, epochs=2), out_dir=tmp_path)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["learned_lr"] == job.synthetic.learned_lr != 0.01
    assert record["eval_protocol"]["augment"] == "color_crop_cutout_flip_scale_rotate"


@pytest.mark.slow
def test_zca_runs_on_grayscale_with_a_warning_and_round_trips_on_rgb(breast, medmnist_root: Path, buffer_root: Path) -> None:
    messages: list[str] = []
    gray = distill("mtt", breast, 1, tiny(buffer_root, iterations=1, zca=True), context=RunContext(log=messages.append))
    assert gray.extra["zca"] is True and any("ZCA on the 1-channel" in m for m in messages)

    from medistill.data import load_dataset

    rgb = load_dataset("breastmnist", root=medmnist_root, channels=3, image_size=16, progress=False)  # small covariance
    zca = ZCA.for_dataset(rgb)
    torch.testing.assert_close(zca.unwhiten_normalized(rgb, zca.whiten_normalized(rgb, rgb.test.images)), rgb.test.images,
                               atol=1e-3, rtol=1e-3)
    result = distill("mtt", rgb, 1, tiny(buffer_root, iterations=1, zca=True), context=RunContext())
    assert result.extra["zca"] is True and torch.isfinite(result.images).all()


def test_bad_settings_are_refused(breast, buffer_root: Path) -> None:
    with pytest.raises(ConfigError, match="buffer_epochs"):
        distill("mtt", breast, 1, {"max_start_epoch": 30, "buffer_epochs": 30})
    with pytest.raises(ConfigError, match="unroll"):
        distill("mtt", breast, 1, {"unroll": "magic"})
    with pytest.raises(ConfigError, match="IPC"):
        distill("mtt", breast, 1000, tiny(buffer_root))


@pytest.mark.slow
def test_badly_scaled_setups_are_reported(breast, buffer_root: Path) -> None:
    messages: list[str] = []
    config = tiny(buffer_root, iterations=20, syn_steps=8, syn_lr_init=0.05, lr_lr=1e-3, dsa_strategy=None)
    result = distill("mtt", breast, 1, config, context=RunContext(log=messages.append))
    assert sum(result.extra["loss"][:20]) / 20 > 2 or result.extra["syn_lr_clamps"] > 10
    assert any(m.startswith("warning: ") and ("student moves much further" in m or "clamped" in m) for m in messages)


def test_tensorboard_logs_loss_learned_lr_eval_points_and_images(breast, buffer_root: Path, tmp_path: Path, read_tensorboard) -> None:
    config = tiny(buffer_root, iterations=4, checkpoint_every=2, eval_every=2, eval_epochs=1, tensorboard=str(tmp_path / "tb"))
    result = distill("mtt", breast, 1, config, context=RunContext(seed=1))
    scalars, images = read_tensorboard(tmp_path / "tb")
    assert [value for _, value in scalars["loss"]] == pytest.approx(result.extra["loss"])
    assert [step for step, _ in scalars["eval/acc"]] == [2, 4]
    assert scalars["lr"][-1] == (4, pytest.approx(result.learned_lr))
    assert [step for step, _, _ in images["synthetic"]] == [2, 4]
    assert "tensorboard" not in result.hyperparameters and "buffer_root" not in result.hyperparameters


@pytest.mark.parametrize(("ipc", "preset"), [(1, 1), (2, 1), (10, 10), (7, 10), (50, 50), (200, 50)])
def test_without_settings_mtt_runs_the_stable_preset_of_the_ipc(ipc: int, preset: int) -> None:
    from medistill.methods import get_method
    from medistill.methods.mtt_presets import stable_settings
    from medistill.methods.base import resolve_config

    spec = get_method("mtt")
    assert resolve_config(spec, ipc, None) == MTTConfig(**stable_settings(preset))
    overridden = resolve_config(spec, ipc, {"iterations": 3, "lr-img": 7.0})
    assert (overridden.iterations, overridden.lr_img, overridden.syn_steps) == (3, 7.0, stable_settings(preset)["syn_steps"])
    explicit = MTTConfig(lr_img=3.0)
    assert resolve_config(spec, ipc, explicit) is explicit


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_the_stable_presets_are_complete_mtt_settings(ipc: int) -> None:
    from medistill.methods import get_method, make_config
    from medistill.methods.mtt_presets import stable_settings

    settings = stable_settings(ipc)
    assert make_config(get_method("mtt"), settings) == MTTConfig(**settings)
    assert set(settings) >= {"lr_img", "syn_steps", "syn_lr_init", "lr_lr", "expert_epochs", "max_start_epoch"}


def test_a_diverged_run_shows_as_diverged_in_the_study_table() -> None:
    from medistill.study.analysis import cells_from_records, format_score
    from medistill.study.store import FAILED

    def record(key: str, error: str) -> dict:
        return {"key": key, "status": FAILED, "dataset_label": "breastmnist", "spec": {"method": "mtt", "ipc": 1, "seed": 0},
                "error": {"type": error, "message": "x"}}

    (diverged,) = cells_from_records([record("a", "DivergenceError")])
    (crashed,) = cells_from_records([record("a", "DivergenceError"), record("b", "RuntimeError")])
    assert format_score(diverged, "acc") == "diverged" and format_score(crashed, "acc") == "failed"
