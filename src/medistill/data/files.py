"""Reading files that others made: regular files only, and inside the folder that was named.

Every reader of a data file or an image folder checks its paths here before reading. A FIFO, a
device or a socket is refused without being opened (opening a FIFO waits for a writer that may
never come); a symbolic-link loop, a dangling link and an unreadable path are one-line errors; and
in an image folder every path is resolved, so that a link at any level (the file, its class folder,
`train/`) whose target lies outside the folder is refused. `open_regular` checks once more on the
open file, so a file swapped for a FIFO after the check is refused as well.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from medistill.errors import DataError

_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def resolved(path: str | Path, *, inside: Path | None = None) -> Path:
    """`path` with every link followed, refused (one line) when it is a link loop, missing or unreadable, or
    when `inside` (a resolved folder) is given and the path leads outside it."""
    path = Path(path)
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13 reports a link loop this way
        raise DataError(f"{path} is a symbolic-link loop; it cannot be read") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path} is a symbolic-link loop; it cannot be read") from None
        if exc.errno == errno.ENOENT:
            what = "is a link to a missing file" if path.is_symlink() else "does not exist"
            raise DataError(f"{path} {what}") from None
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if inside is not None and not target.is_relative_to(inside):
        raise DataError(f"{path} leads to {target}, outside the image folder {inside}; links must stay inside it")
    return target


def regular_file(path: str | Path, *, inside: Path | None = None) -> Path:
    """`path` if it is (or links to) a regular file, inside `inside` when given; anything else is a one-line
    DataError. Nothing is opened: the kind of file comes from `stat`."""
    target = resolved(path, inside=inside)
    mode = os.stat(target).st_mode
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is a {_kind(mode)}, not a regular file; only regular files are read")
    return Path(path)


def is_folder(path: str | Path, *, inside: Path | None = None) -> bool:
    """Whether `path` is (or links to) a folder: False when it is absent or another kind of file; a link loop, or
    a link out of `inside` when given, is a one-line DataError."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    return stat.S_ISDIR(os.stat(resolved(path, inside=inside)).st_mode)


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading (binary); anything else is refused without waiting on it."""
    path = regular_file(path)
    try:
        # O_NONBLOCK: a FIFO put in the file's place after the check above opens at once instead of waiting
        handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path} is a {_kind(mode)}, not a regular file; only regular files are read")
        os.set_blocking(handle.fileno(), True)
        return handle
    except BaseException:
        handle.close()
        raise


__all__ = ["is_folder", "open_regular", "regular_file", "resolved"]
