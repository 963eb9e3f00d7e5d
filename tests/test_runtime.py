"""Device selection: names are parsed, and a GPU that is not there is refused with a ConfigError.

The CUDA checks run on a CPU machine by faking the device query (`torch.cuda.is_available` and
`torch.cuda.device_count`); `resolve_device` only builds a `torch.device`, it touches no GPU.
"""

from __future__ import annotations

import pytest
import torch

from medistill.errors import ConfigError
from medistill.runtime import resolve_device


@pytest.fixture
def two_gpus(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_and_auto_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda:x", "cuda:", "cuda:-1", "cuda:1:0", "cudax", "cuda 0"])
def test_malformed_cuda_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="malformed device"):
        resolve_device(name)


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(monkeypatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        resolve_device(name)


def test_existing_cuda_indices_are_accepted(two_gpus) -> None:
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda:2", "cuda:7", torch.device("cuda", 7)])
def test_a_cuda_index_past_the_last_gpu_is_refused(two_gpus, name) -> None:
    with pytest.raises(ConfigError, match=r"does not exist: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device(name)
