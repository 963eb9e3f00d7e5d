"""The speed switches: bf16 autocast and torch.compile reach every network a command trains, and only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from medistill.cli import app
from medistill.data.dataset import MULTI_CLASS, DataSource, build_dataset
from medistill.methods import RunContext, distill
from medistill.methods.experts import ExpertSettings
from medistill.methods.mtt import MTTConfig
from medistill.pipeline import EvalSettings
from medistill.train import TrainProtocol, train_model


def tiny_dataset(n_train: int = 12, size: int = 8):
    rng = np.random.default_rng(0)
    arrays = {split: (rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n).reshape(n, 1) % 2)
              for split, n in (("train", n_train), ("val", 4), ("test", 8))}
    return build_dataset(name="tiny", task=MULTI_CLASS, label_names=["a", "b"], arrays=arrays,
                         source=DataSource(kind="npz", name="tiny", path="-"))


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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


def test_cli_switches_reach_the_method_and_the_evaluation(medmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dm"
    result = CliRunner().invoke(app, ["distill", "breastmnist", "-m", "dm", "--ipc", "1", "--iterations", "1", "--out", str(out),
                                      "--data-root", str(medmnist_root), "--device", "cpu", "--eval-models", "1", "--eval-epochs", "1",
                                      "--bf16", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["hyperparameters"]["bf16"] is True and record["hyperparameters"]["compile"] is False
    assert record["eval_protocol"]["bf16"] is True
