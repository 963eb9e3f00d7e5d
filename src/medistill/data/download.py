"""Download MedMNIST files over HTTP(S) with a progress bar, an MD5 check and an atomic rename.

Besides the per-read timeout, a download has an overall deadline and a size cap: a server that
trickles bytes forever or sends more than the file can be is cut off with a one-line error.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from medistill.data.files import open_regular
from medistill.errors import DataError
from medistill.markdown import unguarded

_CHUNK = 1 << 16
DEFAULT_DEADLINE = 6 * 3600.0  # seconds for a whole download when the caller gives none


def md5sum(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex MD5 digest of the file at `path`, read in chunks."""
    digest = hashlib.md5()
    with open_regular(path) as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, md5: str) -> None:
    """Raise DataError if the MD5 of `path` is not `md5`."""
    actual = md5sum(path)
    if actual != md5.lower():
        raise DataError(f"{path.name} fails its MD5 check: expected {md5}, got {actual} ({path}).")


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Download `url` to `dest` via `dest.part`, check its MD5 (if given) and rename it into place.

    `timeout` bounds each read, `deadline` (seconds, default `DEFAULT_DEADLINE`) the whole download
    and `max_bytes` its size. Never overwrites an existing `dest`. On an MD5 mismatch the bytes stay
    at the `.part` path. Raises DataError with a one-line message on network failure, a cut-off
    download, a full disk or an MD5 mismatch.
    """
    dest = Path(dest)
    if dest.exists():
        raise DataError(f"{dest} already exists; not downloading {url} over it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    try:
        _stream(url, part, progress=progress, timeout=timeout, deadline=deadline or DEFAULT_DEADLINE, max_bytes=max_bytes)
    except _CutOff as exc:
        raise _network_error(dest, part, url, str(exc)) from None
    except urllib.error.HTTPError as exc:
        raise _network_error(dest, part, url, f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _network_error(dest, part, url, str(exc.reason)) from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _network_error(dest, part, url, str(exc) or type(exc).__name__) from exc
    except OSError as exc:  # the disk, not the network: full, read-only, gone
        part.unlink(missing_ok=True)
        raise DataError(f"cannot write {part}: {exc.strerror or exc}; nothing was kept") from None

    if md5 is not None:
        actual = md5sum(part)
        if actual != md5.lower():
            raise DataError(
                f"{dest.name} fails its MD5 check: expected {md5}, got {actual} "
                f"(downloaded from {url}); the downloaded bytes were left at {part}."
            )
    os.replace(part, dest)
    return dest


class _CutOff(Exception):
    """A download stopped by its deadline or size cap."""


def _stream(url: str, part: Path, *, progress: bool, timeout: float, deadline: float, max_bytes: int | None) -> None:
    """Copy the body of `url` into `part` chunk by chunk, showing a progress bar if enabled."""
    stop_at = time.monotonic() + deadline
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and max_bytes is not None and total > max_bytes:
            raise _CutOff(f"the server announces {total} bytes, more than the file can be ({max_bytes} bytes)")
        console = Console(file=unguarded(sys.stderr))  # a live bar: under the command line's guard (the file name is ours)
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not (progress and unguarded(sys.stderr).isatty()),
        )
        received = 0
        with bar, open(part, "wb") as fh:
            task = bar.add_task(part.name.removesuffix(".part"), total=total)
            while chunk := resp.read(_CHUNK):
                fh.write(chunk)
                received += len(chunk)
                bar.advance(task, len(chunk))
                if max_bytes is not None and received > max_bytes:
                    raise _CutOff(f"more than {max_bytes} bytes received, more than the file can be")
                if time.monotonic() > stop_at:
                    raise _CutOff(f"not finished within its deadline of {deadline:.0f} s ({received} bytes received)")
    if total is not None and received != total:
        raise http.client.IncompleteRead(b"", total - received)


def _network_error(dest: Path, part: Path, url: str, reason: str) -> DataError:
    """Remove the incomplete `.part` file and build a one-line DataError telling the user what to do."""
    part.unlink(missing_ok=True)
    reason = " ".join(reason.split())
    return DataError(f"Could not download {dest.name} from {url}: {reason}. Download it manually and put it in {dest.parent}.")
