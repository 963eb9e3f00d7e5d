"""The randomness a differential-privacy guarantee rests on: a secret key from the operating system.

A private release is only as private as its noise is unpredictable to the reader of everything
published. So every private draw (the Poisson sample of real images, the Gaussian noise on their
clipped sums, the noise on the class counts, DP-SGD's sampling and noise) comes from
`SecretRandom`, whose 256-bit key is drawn from the operating system's entropy (`secrets`) when a
run starts: never derived from `--seed` or any other recorded value, never written to an output,
never shared between runs. `--seed` keeps governing the public, data-independent draws (network
initialisations, augmentation, the noise-initialised images), which stay reproducible.

The stream is SHAKE-256 (a cryptographic extendable-output function) of the key and a label naming
the draw (its purpose and release number), so one release's draws are independent of every other's
and a resumed run can redraw exactly what the killed one would have. For that the key is kept
beside the run's local checkpoint (owner-only permissions, never followed through a link) while the
run is unfinished, and deleted when the run ends; no command ever copies it elsewhere.

Gaussian variates are made from the stream's uniforms by the Box-Muller transform in float64.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from medistill.errors import DataError

KEY_BYTES = 32
SECRET_NAME = "private-randomness.key"  # in a run's checkpoint folder, only while the run is unfinished
DESCRIPTION = "SHAKE-256 stream keyed by 256 bits of operating-system entropy drawn at run start (Box-Muller Gaussians)"


class SecretRandom:
    """Deterministic draws from a secret key: `uniform`, `normal` and `seed`, each named by (purpose, index)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secret key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)

    @classmethod
    def fresh(cls) -> SecretRandom:
        """A new key from the operating system's entropy."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def __repr__(self) -> str:  # never print the key
        return "SecretRandom(<secret>)"

    def _words(self, purpose: str, index: int, count: int) -> np.ndarray:
        """`count` uniformly random 64-bit words of the stream named (purpose, index)."""
        label = json.dumps([purpose, int(index)]).encode()
        return np.frombuffer(hashlib.shake_256(self._key + label).digest(8 * count), dtype="<u8")

    def uniform(
        self, purpose: str, index: int, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu"
    ) -> Tensor:
        """float64 uniforms in the open interval (0, 1), 53 random bits each."""
        count = math.prod(shape)
        words = self._words(purpose, index, count) >> np.uint64(11)
        values = (words.astype(np.float64) + 0.5) * 2.0**-53
        return torch.from_numpy(values).reshape(tuple(shape)).to(device)

    def normal(
        self,
        purpose: str,
        index: int,
        shape: tuple[int, ...] | torch.Size,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Standard normal variates (Box-Muller on the stream's uniforms, computed in float64)."""
        count = math.prod(shape)
        pairs = (count + 1) // 2
        uniforms = self.uniform(purpose, index, (2, pairs))
        radius = torch.sqrt(-2.0 * torch.log(uniforms[0]))
        angle = 2.0 * math.pi * uniforms[1]
        values = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        return values.reshape(tuple(shape)).to(device=device, dtype=dtype)

    def seed(self, purpose: str, index: int = 0) -> int:
        """A 63-bit seed for a library that takes its own generator (Opacus's DP-SGD)."""
        return int(self._words(purpose, index, 1)[0] >> np.uint64(1))

    def save(self, path: str | Path) -> None:
        """Write the key with owner-only permissions, atomically, never through a symbolic link."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(self._key)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            if partial.exists():
                partial.unlink()

    @classmethod
    def load(cls, path: str | Path) -> SecretRandom:
        """Read a key written by `save`; a link, a non-regular file or a wrong size is a one-line DataError."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise DataError(
                f"{path} cannot be read as a run's secret ({exc.strerror}); delete the run's checkpoints to start over"
            ) from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size != KEY_BYTES:
                raise DataError(
                    f"{path} is not a run's secret ({KEY_BYTES}-byte file); delete the run's checkpoints to start over"
                )
            return cls(handle.read(KEY_BYTES))


def run_secret(checkpoint_dir: Path | None, resume: bool) -> SecretRandom:
    """This run's secret: the one kept beside the checkpoint when a checkpointed run resumes, else a fresh one.

    A fresh secret is stored in `checkpoint_dir` (when there is one) so that a killed run can resume;
    a resumed run whose secret is gone draws a fresh one, which keeps the guarantee (only exact
    replay of the killed run's remaining draws is lost).
    """
    path = checkpoint_dir / SECRET_NAME if checkpoint_dir is not None else None
    if resume and path is not None and (path.exists() or path.is_symlink()):
        return SecretRandom.load(path)
    secret = SecretRandom.fresh()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret.save(path)
    return secret


def forget_secret(checkpoint_dir: Path | None) -> None:
    """Delete the kept secret once the run has finished: nothing that remains can redraw its noise."""
    if checkpoint_dir is not None:
        (checkpoint_dir / SECRET_NAME).unlink(missing_ok=True)


__all__ = ["DESCRIPTION", "SECRET_NAME", "SecretRandom", "forget_secret", "run_secret"]
