"""The speed switches: bf16 autocast and torch.compile reach every network a command trains; the CLI chooses bf16 only
on a CPU with native bf16, unless told or pinned otherwise, and says and records what it chose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medistill.cli import app
from medistill.data.dataset import MULTI_CLASS, DataSource, build_dataset
from medistill.methods import RunContext, distill
from medistill.methods.experts import ExpertSettings
from medistill.methods.mtt import MTTConfig
from medistill.pipeline import EvalSettings
from medistill.runtime import choose_bf16
from medistill.train import TrainProtocol, train_model


def tiny_dataset(n_train: int = 12, size: int = 8):
    rng = np.random.default_rng(0)
    arrays = {split: (rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n).reshape(n, 1) % 2)
              for split, n in (("train", n_train), ("val", 4), ("test", 8))}
    return build_dataset(name="tiny", task=MULTI_CLASS, label_names=["a", "b"], arrays=arrays,
                         source=DataSource(kind="npz", name="tiny", path="-"))


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_compiled_training_computes_what_eager_training_does() -> None:
    data = tiny_dataset()
    images, labels = data.train.images, data.train.labels
    protocol = TrainProtocol(epochs=2)  # one batch per epoch: one graph to compile
    eager = weights(train_model(images, labels, data, protocol, seed=3))
    compiled = weights(train_model(images, labels, data, TrainProtocol(epochs=2, compile=True), seed=3))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)  # fused kernels round differently, nothing more
    bf16 = weights(train_model(images, labels, data, TrainProtocol(epochs=2, bf16=True), seed=3))
    assert (bf16 - eager).abs().max() > 1e-4  # the bf16 switch really changes the arithmetic


def test_eval_settings_carry_the_switches_into_every_protocol() -> None:
    protocol = EvalSettings(bf16=True, compile=True).protocol_for("dm")
    assert protocol.bf16 and protocol.compile and protocol.augment  # DM's reference protocol otherwise
    plain = EvalSettings().protocol_for("dm")
    assert not plain.bf16 and not plain.compile


@pytest.mark.slow
def test_mtt_student_and_experts_take_bf16(breast, tmp_path: Path) -> None:
    base = {"iterations": 1, "syn_steps": 2, "num_experts": 1, "buffer_epochs": 1, "max_start_epoch": 1, "expert_epochs": 1,
            "model_kwargs": {"width": 8}, "buffer_root": str(tmp_path)}
    fp32 = distill("mtt", breast, 1, base, context=RunContext(seed=0))
    bf16 = distill("mtt", breast, 1, {**base, "bf16": True, "expert_bf16": True}, context=RunContext(seed=0))
    assert torch.isfinite(bf16.images).all()
    assert not torch.equal(bf16.images, fp32.images)
    assert bf16.hyperparameters["bf16"] and bf16.hyperparameters["expert_bf16"]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2  # bf16 experts are a buffer of their own


def test_fp32_expert_buffers_keep_their_identity() -> None:
    settings = ExpertSettings()
    assert "bf16" not in settings.to_dict()  # the key of every fp32 buffer built before the switch existed
    assert ExpertSettings(bf16=True).key() != settings.key()
    assert MTTConfig(expert_bf16=True).expert_settings(zca=False).bf16


@pytest.mark.slow
def test_cli_switches_reach_the_method_and_the_evaluation(medmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dm"
    result = CliRunner().invoke(app, ["distill", "breastmnist", "-m", "dm", "--ipc", "1", "--iterations", "1", "--out", str(out),
                                      "--data-root", str(medmnist_root), "--device", "cpu", "--eval-models", "1", "--eval-epochs", "1",
                                      "--bf16", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["hyperparameters"]["bf16"] is True and record["hyperparameters"]["compile"] is False
    assert record["eval_protocol"]["bf16"] is True


def native_bf16_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Make this CPU report native bf16 (AVX512-BF16) or none, whatever it has."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("native", [True, False])
def test_precision_choice_flag_then_pinned_setting_then_the_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    native_bf16_cpu(monkeypatch, native)
    cpu = torch.device("cpu")
    assert choose_bf16(None, None, cpu)[0] is native
    for flag in (True, False):
        assert choose_bf16(flag, not flag, cpu) == (flag, "as asked")  # the flag beats a pinned setting
        assert choose_bf16(None, flag, cpu)[0] is flag  # a pinned setting beats the CPU
    assert choose_bf16(None, None, torch.device("cuda"))[0] is False  # GPUs train fp32, as the references
    assert choose_bf16(None, None, cpu, ["convnet", "ResNet18_BN"])[0] is False  # bf16 was not measured there
    assert choose_bf16(True, None, cpu, ["resnet18_bn"])[0] is True


def distill_cli(medmnist_root: Path, out: Path, *extra: str) -> tuple[str, dict]:
    result = CliRunner().invoke(app, ["distill", "breastmnist", "-m", "dc", "--ipc", "1", "--iterations", "1", "--out", str(out),
                                      "--data-root", str(medmnist_root), "--device", "cpu", "--eval-models", "1", "--eval-epochs", "1",
                                      "--no-progress", *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    return result.output, record


@pytest.mark.slow
def test_cli_trains_bf16_by_default_only_on_a_cpu_with_native_bf16(medmnist_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    native_bf16_cpu(monkeypatch, True)
    output, record = distill_cli(medmnist_root, tmp_path / "native")
    assert "bf16 networks (this CPU computes bf16 natively" in output
    assert record["hyperparameters"]["bf16"] is True and record["eval_protocol"]["bf16"] is True
    output, record = distill_cli(medmnist_root, tmp_path / "fp32", "--fp32")
    assert "fp32 networks (as asked)" in output
    assert record["hyperparameters"]["bf16"] is False and record["eval_protocol"]["bf16"] is False
    output, record = distill_cli(medmnist_root, tmp_path / "preset", "--config", "dc")  # a reference preset pins fp32
    assert "fp32 networks (as the method's settings pin it)" in output
    assert record["hyperparameters"]["bf16"] is False and record["eval_protocol"]["bf16"] is False
    output, record = distill_cli(medmnist_root, tmp_path / "preset_bf16", "--config", "dc", "--bf16")
    assert record["hyperparameters"]["bf16"] is True and record["eval_protocol"]["bf16"] is True
    output, record = distill_cli(medmnist_root, tmp_path / "lenet", "--eval-model", "lenet")
    assert "fp32 networks (as the references: bf16 was measured on the ConvNet only, not on lenet; --bf16 to ask)" in output
    assert record["hyperparameters"]["bf16"] is False and record["eval_protocol"]["bf16"] is False
    scored = CliRunner().invoke(app, ["evaluate", str(tmp_path / "native"), "--models", "convnet,lenet", "--eval-models", "1",
                                      "--eval-epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "scores.json")],
                                catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    assert "fp32 networks" in scored.output
    assert not any(row["eval_protocol"]["bf16"] for row in json.loads((tmp_path / "scores.json").read_text()).values())
    native_bf16_cpu(monkeypatch, False)
    output, record = distill_cli(medmnist_root, tmp_path / "emulated")
    assert "fp32 networks (as the references; this CPU has no native bf16)" in output
    assert record["hyperparameters"]["bf16"] is False and record["eval_protocol"]["bf16"] is False


def test_every_shipped_method_preset_pins_the_reference_fp32() -> None:
    from medistill.presets import list_presets
    from medistill.configfile import read_yaml
    methods = [p for p in list_presets() if p.kind == "method settings"]
    assert methods
    assert all(read_yaml(p.path).get("bf16") is False for p in methods), [p.name for p in methods]
