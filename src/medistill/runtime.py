"""Device, CPU threads and seeding: the one place that decides where tensors live and how they are computed."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from medistill.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
THREADS_ENV = "MEDISTILL_THREADS"
# One thread by default: on a small or shared machine more threads thrash (many times slower), and a
# fixed count keeps results the same across machines (float sums depend on how the work is split).
DEFAULT_THREADS = 1
_CUDA_NAME = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:N]`` into a device, refusing a GPU that is not there."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        match = _CUDA_NAME.fullmatch(name)
        if match is None:
            raise ConfigError(f"malformed device '{name}'; write cuda or cuda:N with N a GPU index (cuda:0, cuda:1, ...)")
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' was asked for, but no CUDA GPU is available here; use --device cpu or auto")
        if match.group(1) is not None:
            index, count = int(match.group(1)), torch.cuda.device_count()
            if index >= count:
                raise ConfigError(
                    f"device '{name}' does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
                )
        return torch.device(name)
    raise ConfigError(f"unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)}")


def set_threads(count: int) -> int:
    """Use `count` torch CPU threads; results are reproducible for the same seed, device and thread count."""
    if count < 1:
        raise ConfigError(f"the number of CPU threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return torch.get_num_threads()


def torch_build() -> str:
    """Which torch build is installed: its version and whether it is the CPU-only or a CUDA build."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__}: CPU-only build"
    gpu = "a GPU is visible" if torch.cuda.is_available() else "no GPU visible"
    return f"torch {torch.__version__}: CUDA {torch.version.cuda} build, {gpu}"


MAX_SEED = 2**32 - 1  # a run's seed is a 32-bit number, as every generator it seeds (NumPy's legacy one too) takes it


def check_seed(seed: object, what: str = "seed") -> int:
    """`seed` as an int, or a one-line ConfigError that states the range 0..2^32-1."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{what} {seed!r} is outside 0..{MAX_SEED} (2^32 - 1); choose a whole number in that range")
    return int(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer in 0..2^32-1."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_compile(fn: Callable[..., Any], enabled: bool, *, dynamic: bool | None = None) -> Callable[..., Any]:
    """`torch.compile(fn)` when enabled, else fn: the one compile switch (methods' passes and scoring networks).
    `dynamic=False` compiles one graph per input shape (the default lets torch decide)."""
    return torch.compile(fn, dynamic=dynamic) if enabled else fn


def native_bf16(device: torch.device) -> bool:
    """Whether `device` is a CPU whose instructions compute bf16 natively (AVX512-BF16 or AMX).

    Without them oneDNN emulates bf16 and autocast is slower than fp32, so bf16 is never chosen there."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume no native bf16
        return False


# The architectures on which a paired test over seeds showed bf16 within the spread of fp32's evaluation networks
# (DC, DM and MTT through them, and scoring with them; docs/RESULTS.md, "CPU speed"); others train fp32 unless asked.
BF16_MEASURED_MODELS = frozenset({"convnet"})


def choose_bf16(
    flag: bool | None, pinned: bool | None, device: torch.device, models: Iterable[str] = ("convnet",)
) -> tuple[bool, str]:
    """The precision a command trains its networks (`models`) in, and why: the flag (--bf16 / --fp32) when
    given, else a `bf16` setting the method's configuration pins (the shipped reference presets pin fp32),
    else bf16 on a CPU that computes it natively when every network is one bf16 was measured on, and fp32
    elsewhere (GPUs, other CPUs, other architectures: as the references)."""
    if flag is not None:
        return flag, "as asked"
    if pinned is not None:
        return bool(pinned), "as the method's settings pin it"
    if not native_bf16(device):
        return False, "as the references" + ("" if device.type != "cpu" else "; this CPU has no native bf16")
    unmeasured = sorted({name.lower() for name in models} - BF16_MEASURED_MODELS)
    if unmeasured:
        return False, f"as the references: bf16 was measured on the ConvNet only, not on {', '.join(unmeasured)}; --bf16 to ask"
    return True, "this CPU computes bf16 natively; --fp32 for the references' fp32 numerics"


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on `device` when enabled (a no-op context otherwise): the one mixed-precision switch."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
