"""The MedMNIST download path (ensure_file / load_dataset) against a real HTTP server on 127.0.0.1.

`MEDISTILL_MIRROR` points the data layer at the local server; the MD5 checked is still the
official one from medmnist.INFO.
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import medmnist
import numpy as np
import pytest

from medistill.data import ensure_file, load_dataset
from medistill.data.download import md5sum
from medistill.data.medmnist import MIRROR_ENV
from medistill.errors import DataError

OFFICIAL_MD5 = medmnist.INFO["breastmnist"]["MD5"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Mirror:
    """A static HTTP server on a free local port, serving one folder."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[Path, _Mirror]]:
    folder = tmp_path / "www"
    folder.mkdir()
    mirror = _Mirror(folder)
    try:
        yield folder, mirror
    finally:
        mirror.stop()


def test_good_file_downloads_verifies_and_loads(www, tmp_path: Path, medmnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, mirror = www
    shutil.copyfile(medmnist_root / "breastmnist.npz", folder / "breastmnist.npz")
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    root = tmp_path / "data"
    path = ensure_file("breastmnist", root=root, progress=False)
    assert path == root / "breastmnist.npz"
    assert md5sum(path) == OFFICIAL_MD5
    assert sorted(p.name for p in root.iterdir()) == ["breastmnist.npz"]  # no .part left behind
    data = load_dataset("breastmnist", root=root, progress=False)
    assert (len(data.train), len(data.val), len(data.test)) == (546, 78, 156)
    assert data.source.md5 == OFFICIAL_MD5
    # once cached, the file is not fetched again: it loads with the server gone
    mirror.stop()
    assert load_dataset("breastmnist", root=root, progress=False).source.path == str(path)


def test_download_through_load_dataset(www, tmp_path: Path, medmnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, mirror = www
    shutil.copyfile(medmnist_root / "breastmnist.npz", folder / "breastmnist.npz")
    monkeypatch.setenv(MIRROR_ENV, mirror.url + "/")
    root = tmp_path / "fresh"
    data = load_dataset("breastmnist", root=root, progress=True)
    assert data.task == "binary-class" and len(data.train) == 546
    assert md5sum(root / "breastmnist.npz") == OFFICIAL_MD5


def test_wrong_md5_is_refused(www, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, mirror = www
    rng = np.random.default_rng(0)
    arrays = {
        f"{split}_{kind}": rng.integers(0, 2 if kind == "labels" else 256, size=shape, dtype=np.uint8)
        for split in ("train", "val", "test")
        for kind, shape in (("images", (4, 28, 28)), ("labels", (4, 1)))
    }
    np.savez_compressed(folder / "breastmnist.npz", **arrays)
    served_md5 = md5sum(folder / "breastmnist.npz")
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_dataset("breastmnist", root=root, progress=False)
    message = str(info.value)
    assert OFFICIAL_MD5 in message and served_md5 in message and "\n" not in message
    assert not (root / "breastmnist.npz").exists()
    with pytest.raises(DataError, match=OFFICIAL_MD5):
        ensure_file("breastmnist", root=tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / "breastmnist.npz").exists()


def test_server_down_names_url_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = _Mirror(tmp_path)
    url = mirror.url
    mirror.stop()
    monkeypatch.setenv(MIRROR_ENV, url)
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_dataset("breastmnist", root=root, progress=False)
    message = str(info.value)
    assert f"{url}/breastmnist.npz" in message and str(root) in message and "\n" not in message
    assert not (root / "breastmnist.npz").exists() and not (root / "breastmnist.npz.part").exists()


def test_missing_on_the_mirror_is_a_data_error(www, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, mirror = www
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    with pytest.raises(DataError, match="404"):
        ensure_file("breastmnist", size=64, root=tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "breastmnist_64.npz").exists()
