"""Tests for medistill.data.download against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from medistill.data.download import download_file, md5sum, verify_file
from medistill.errors import DataError



class _QuietHandler(SimpleHTTPRequestHandler):
    """Static file handler that does not log requests to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _start_server(directory: Path) -> ThreadingHTTPServer:
    """Start a threaded HTTP server on a free port serving `directory`."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def _stop_server(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """Serve a tiny MedMNIST-style npz; yield its URL and bytes."""
    root = tmp_path / "www"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        f"{split}_{kind}": rng.integers(0, 2 if kind == "labels" else 256, size=shape, dtype=np.uint8)
        for split in ("train", "val", "test")
        for kind, shape in (("images", (4, 28, 28)), ("labels", (4, 1)))
    }
    np.savez_compressed(root / "tinymnist.npz", **arrays)
    server = _start_server(root)
    try:
        yield f"http://127.0.0.1:{server.server_port}/tinymnist.npz", (root / "tinymnist.npz").read_bytes()
    finally:
        _stop_server(server)


def test_good_file_is_downloaded(served: tuple[str, bytes], tmp_path: Path) -> None:
    url, data = served
    dest = tmp_path / "out" / "tinymnist.npz"
    result = download_file(url, dest, hashlib.md5(data).hexdigest(), progress=True, timeout=5)
    assert result == dest
    assert dest.read_bytes() == data
    assert not dest.with_name(dest.name + ".part").exists()
    with np.load(dest) as npz:
        assert npz["train_images"].shape == (4, 28, 28)


def test_without_md5_skips_check(served: tuple[str, bytes], tmp_path: Path) -> None:
    url, data = served
    dest = tmp_path / "tinymnist.npz"
    download_file(url, dest, None, progress=False, timeout=5)
    assert dest.read_bytes() == data


def test_wrong_md5_keeps_part(served: tuple[str, bytes], tmp_path: Path) -> None:
    url, data = served
    dest = tmp_path / "tinymnist.npz"
    wrong = "0" * 32
    with pytest.raises(DataError) as info:
        download_file(url, dest, wrong, progress=False, timeout=5)
    msg = str(info.value)
    part = dest.with_name(dest.name + ".part")
    assert wrong in msg and hashlib.md5(data).hexdigest() in msg
    assert url in msg and str(part) in msg and "\n" not in msg
    assert not dest.exists()
    assert part.read_bytes() == data


def test_server_down(tmp_path: Path) -> None:
    server = _start_server(tmp_path)
    port = server.server_port
    _stop_server(server)
    url = f"http://127.0.0.1:{port}/tinymnist.npz"
    dest = tmp_path / "data" / "tinymnist.npz"
    with pytest.raises(DataError) as info:
        download_file(url, dest, None, progress=False, timeout=5)
    msg = str(info.value)
    assert url in msg and str(dest.parent) in msg and "manually" in msg and "\n" not in msg
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_http_404(served: tuple[str, bytes], tmp_path: Path) -> None:
    url, _ = served
    missing = url.replace("tinymnist.npz", "nope.npz")
    dest = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="404") as info:
        download_file(missing, dest, None, progress=False, timeout=5)
    assert missing in str(info.value)
    assert not dest.exists()


def test_existing_dest_untouched(served: tuple[str, bytes], tmp_path: Path) -> None:
    url, data = served
    dest = tmp_path / "tinymnist.npz"
    dest.write_bytes(b"keep me")
    with pytest.raises(DataError, match="already exists"):
        download_file(url, dest, hashlib.md5(data).hexdigest(), progress=False, timeout=5)
    assert dest.read_bytes() == b"keep me"
    assert not dest.with_name(dest.name + ".part").exists()


def test_md5sum_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(1).bytes(3000)
    path.write_bytes(data)
    assert md5sum(path, chunk_size=1000) == hashlib.md5(data).hexdigest()
    verify_file(path, hashlib.md5(data).hexdigest())
    with pytest.raises(DataError, match="MD5"):
        verify_file(path, "f" * 32)


def test_md5sum_of_real_breastmnist(medmnist_root: Path) -> None:
    import medmnist

    assert md5sum(medmnist_root / "breastmnist.npz") == medmnist.INFO["breastmnist"]["MD5"]
