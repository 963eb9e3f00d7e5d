"""Outputs that are never half-written and never clobber earlier work.

Every file medistill writes goes to a uniquely named temporary file in the destination's folder
and is renamed into place only once it is complete, so a full disk or a kill leaves either the
old file or the new one, never a truncated one, and two writers never share a temporary name.
A write that fails for lack of space (or any OS reason) is a one-line `DataError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from medistill.errors import ConfigError, DataError

ORDINARY_FILE_MODE = 0o666


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on success it is renamed to `path`, on failure removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, ORDINARY_FILE_MODE & ~current_umask())  # mkstemp (and safetensors) create files 0600
        os.replace(partial, path)
    except (OSError, SafetensorError) as exc:  # safetensors reports a failed write (full disk) as its own error
        partial.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise DataError(f"cannot write {path}: {reason}; nothing was replaced") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write bytes (or UTF-8 text) to `path` through a temporary file and a rename."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def refuse_existing(path: str | Path, force: bool, what: str = "output") -> Path:
    """Refuse to replace an existing file unless `force`; a folder is never replaced by a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not force:
        raise ConfigError(f"{what} {path} already exists; choose another path or pass --force to replace it")
    return path


__all__ = ["atomic_path", "atomic_write", "refuse_existing"]
