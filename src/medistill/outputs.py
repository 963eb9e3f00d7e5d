"""Where a command may write: one decision, made before any data is loaded or any work is done.

Every command that writes asks `output_folder` (a folder of outputs) or `output_file` (one file) first.
The answer is the output's real path (links and `..` resolved), or a one-line `MedistillError`:

- a shared bundle (a folder holding `dataset_card.json`) is written by `export` alone, and only as a
  whole new bundle; nothing is ever written into a folder inside one;
- a set's folder (one holding `synthetic.safetensors`) is written only by the job that writes a set
  there itself (`distill --resume/--force` on its own folder) and by commands that say so
  (`evaluate --out`, a scores file beside the set it scored); nothing goes into a folder inside one;
- a file or folder the command writes inside its folder must not be a link (it would lead out of
  the folder), nor a folder where a file goes or the reverse;
- what the command writes must not exist yet unless the run replaces it (`--force`, `--resume`, an
  earlier bundle, the study's own folder); with `empty`, the folder may hold nothing else either;
- the folder must be a folder (or creatable: no file on the way) and writable: a probe file is
  created, written and removed, and folders created for the probe are removed again.

`safe_name` refuses a name taken from a config, metadata or a file name that would leave the folder it
is joined to. `exclusive_lock` holds a folder's lock file without ever following a link.
`staged_folder` assembles a folder beside its destination and renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from medistill.artifact import ARTIFACT_NAME, BUNDLE_MARKER
from medistill.atomic import current_umask
from medistill.errors import ConfigError, DataError

LOCK_NAME = ".lock"  # a folder's lock file (`exclusive_lock`); never counts as work in the folder
PROBE_PREFIX = ".medistill-probe-"
BUNDLE = "a shared bundle"
SET_FOLDER = "a synthetic set's folder"
ORDINARY_FOLDER_MODE = 0o777


def safe_name(name: object, what: str = "name") -> str:
    """`name` if it is one plain path component (it stays inside the folder it is joined to), else a ConfigError.

    Refused: anything not a string, the empty name, `.` and `..`, a name holding a path separator
    (so also every absolute path), NUL or another control character."""
    if not isinstance(name, str):
        raise ConfigError(f"the {what} must be a string, got {type(name).__name__}")
    shown = ascii(name)[:80]
    if not name.strip():
        raise ConfigError(f"the {what} is empty")
    if name in (".", ".."):
        raise ConfigError(f"the {what} {shown} names a folder, not something in it")
    if any(sep in name for sep in {"/", "\\", os.sep, os.altsep or "/"}):
        raise ConfigError(f"the {what} {shown} holds a path separator; it must be a plain name, not a path")
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise ConfigError(f"the {what} {shown} holds a control character")
    return name


def inside(folder: str | Path, name: object, what: str = "name") -> Path:
    """`folder / name` once `name` is a safe plain name (`safe_name`)."""
    return Path(folder) / safe_name(name, what)


def what_folder_is(folder: Path) -> str | None:
    """'a shared bundle', "a synthetic set's folder", or None."""
    if os.path.lexists(folder / BUNDLE_MARKER):
        return BUNDLE
    if os.path.lexists(folder / ARTIFACT_NAME):
        return SET_FOLDER
    return None


def _shown(given: Path, real: Path) -> str:
    """The path as given, and its real path too when a link or `..` leads elsewhere."""
    return _printable(given) if Path(os.path.abspath(given)) == real else f"{_printable(given)} (which is {_printable(real)})"


def _real(given: Path) -> Path:
    """The real path (links and `..` resolved; the part that does not exist yet taken as it is)."""
    try:
        return given.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise ConfigError(f"{_printable(given)} cannot be resolved ({type(exc).__name__}: a link loop?)") from None


def _printable(value: object) -> str:
    """A path or name for a one-line message: as it is when printable, else as Python writes it (escapes shown)."""
    text = str(value)
    return text if text.isprintable() else ascii(text)


def output_folder(
    path: str | Path,
    *,
    option: str = "--out",
    files: Collection[str] = (),
    folders: Collection[str] = (),
    replace: bool = False,
    hint: str = " or pass --force to replace it",
    empty: bool = False,
    makes: str | None = None,
    into_set: bool = False,
    where: str | None = None,
) -> Path:
    """The real path of a folder a command may write `files` and `folders` into, or a one-line MedistillError.

    `replace`: the run may replace what it writes (--force, --resume, its own earlier outputs). `empty`: the
    folder may hold nothing but what the command writes (and its lock file). `makes`: the folder may be
    `BUNDLE` or `SET_FOLDER` because the command writes one there itself (what it holds then counts as
    the command's own outputs). `into_set`: the command may write into a set's folder. `where`: how the
    messages name the folder (default: the option and the path). A folder that does not exist is created
    for the probe and removed again."""
    given = Path(path)
    real = _real(given)
    where = where or f"{option} {_shown(given, real)}"
    _refuse_files_on_the_way(real, where)
    _refuse_shared_places(real, where, makes, into_set)
    if real.is_dir():
        _refuse_what_is_there(real, where, option, files, folders, replace, hint, empty)
    _probe(real, where)
    return real


def output_file(
    path: str | Path,
    *,
    option: str = "--out",
    force: bool = False,
    what: str | None = None,
    into_set: bool = False,
) -> Path:
    """The real path of one file a command may write (its folder checked as by `output_folder`), or a MedistillError.

    An existing file is replaced only with `force`; a folder or a link is never replaced by a file. `what`
    names the file in messages (default: the option)."""
    given = Path(path)
    what = what or option
    if os.path.islink(given):
        raise ConfigError(f"{what} {_printable(given)} is a link; medistill never writes through a link: give the path itself")
    real = _real(given)
    shown = _shown(given, real)
    if real.is_dir():
        raise ConfigError(f"{what} {shown} is a folder; give a file path")
    for place in real.parents:
        if os.path.lexists(place):
            if not place.is_dir():
                raise ConfigError(f"{what} {shown} cannot be written: {_printable(place)} is a file, not a folder")
            break
    where = f"the folder of {what} {shown}"
    output_folder(real.parent, option=option, files=(real.name,), replace=force, into_set=into_set, where=where)
    return real


def _refuse_files_on_the_way(real: Path, where: str) -> None:
    for place in (real, *real.parents):
        if os.path.lexists(place):
            if place.is_dir():
                return
            if place == real:
                raise ConfigError(f"{where} is a file, not a folder; give a folder")
            raise ConfigError(f"{where} cannot be a folder: {_printable(place)} is a file, not a folder")


def _refuse_shared_places(real: Path, where: str, makes: str | None, into_set: bool) -> None:
    kind = what_folder_is(real) if real.is_dir() else None
    if kind == BUNDLE and makes != BUNDLE:
        raise ConfigError(f"{where} is {BUNDLE} ({BUNDLE_MARKER}); only `export` writes a bundle: choose a folder of its own")
    if kind == SET_FOLDER and makes != SET_FOLDER and not into_set:
        raise ConfigError(f"{where} is {SET_FOLDER} ({ARTIFACT_NAME}); choose a folder of its own")
    nearest = True  # a set's folder counts only as the nearest existing folder above; a bundle at any height
    for above in real.parents:
        if not above.is_dir():
            continue
        kind = what_folder_is(above)
        if kind == BUNDLE or (kind == SET_FOLDER and nearest and not into_set):
            raise ConfigError(f"{where} is inside {_printable(above)}, {kind}; choose a folder of its own")
        nearest = False


def _refuse_what_is_there(
    real: Path,
    where: str,
    option: str,
    files: Collection[str],
    folders: Collection[str],
    replace: bool,
    hint: str,
    empty: bool,
) -> None:
    present = []
    for name, wants_folder in [*((f, False) for f in files), *((f, True) for f in folders)]:
        place = real / name
        if os.path.islink(place):
            raise ConfigError(
                f"{where}: {name} there is a link (to {_printable(os.readlink(place))}); medistill never writes through a link"
            )
        if place.exists():
            if place.is_dir() != wants_folder:
                raise ConfigError(
                    f"{where}: {name} there is a {'file' if wants_folder else 'folder'}, "
                    f"where this command writes a {'folder' if wants_folder else 'file'}"
                )
            present.append(name)
    if empty:
        own = {*files, *folders, LOCK_NAME}
        others = sorted(_printable(p.name) for p in real.iterdir() if p.name not in own)
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(f"{where} is not an empty folder (it holds {listed}); choose another {option}")
    if present and not replace:
        if len(present) == 1:
            raise ConfigError(f"{_printable(real / present[0])} already exists; choose another {option}{hint}")
        raise ConfigError(f"{where} already holds {', '.join(present)}; choose another {option}{hint}")


def _probe(real: Path, where: str) -> None:
    """Create, write and remove a probe file in `real` (creating the folder for it, then removing what was created)."""
    created: list[Path] = []
    try:
        for place in reversed([real, *real.parents]):
            if not place.is_dir():
                place.mkdir()
                created.append(place)
        handle, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=real)
        try:
            os.write(handle, b"\0")
        finally:
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        raise DataError(f"cannot write to {where}: {exc.strerror or exc}") from None
    finally:
        for place in reversed(created):
            with contextlib.suppress(OSError):
                place.rmdir()


@contextlib.contextmanager
def exclusive_lock(folder: str | Path, *, user: str = "another process", option: str = "--out") -> Iterator[None]:
    """Hold the exclusive lock (the kernel's flock, released even after kill -9) of a folder while a run writes it.

    The lock file `folder/.lock` is opened without following a link (O_NOFOLLOW) and must be a plain file with
    one name; while another process holds it, a ConfigError names the holder (`user` says who that would be).
    Folders created for the lock are removed again, with the lock file, when the run leaves nothing in them."""
    import fcntl

    folder = Path(folder)
    path = folder / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    created = [place for place in (folder, *folder.parents) if not os.path.lexists(place)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; a lock file is never followed through a link: remove it") from None
        raise DataError(f"cannot lock {folder}: {exc.strerror or exc}") from None
    with open(handle, "r+", closefd=True) as lock:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise ConfigError(f"{path} is not a plain lock file (a link or a special file); remove it")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = _printable(" ".join(lock.read(200).split()) or "another process")
            raise ConfigError(
                f"{folder} is in use by {user} ({holder}); wait for it to finish or choose another {option}"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            if created and os.listdir(folder) == [LOCK_NAME]:  # a run that wrote nothing leaves no folder behind
                with contextlib.suppress(OSError):
                    path.unlink()
                    for place in created:
                        place.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged_folder(destination: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside `destination`; once the body succeeds it replaces `destination` whole.

    A failure (or a kill) in the body leaves `destination` as it was and removes the temporary folder. An
    existing `destination` is moved aside, the new folder renamed into its place, and the old one removed."""
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    except OSError as exc:
        raise DataError(f"cannot write {destination}: {exc.strerror or exc}") from None
    try:
        yield staging
        os.chmod(staging, ORDINARY_FOLDER_MODE & ~current_umask())
        _swap_into_place(staging, destination)
    except OSError as exc:
        raise DataError(f"cannot write {destination}: {exc.strerror or exc}; nothing was replaced") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, destination: Path) -> None:
    if not os.path.lexists(destination):
        os.rename(staging, destination)
        return
    if destination.is_dir() and not any(destination.iterdir()):
        os.rename(staging, destination)  # rename(2) replaces an empty folder
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
    os.rmdir(aside)
    os.rename(destination, aside)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(aside, destination)
        raise
    shutil.rmtree(aside, ignore_errors=True)


__all__ = [
    "LOCK_NAME",
    "exclusive_lock",
    "inside",
    "output_file",
    "output_folder",
    "safe_name",
    "staged_folder",
    "what_folder_is",
]
