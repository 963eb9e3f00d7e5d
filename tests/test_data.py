"""The MedMNIST data layer: flags and metadata from medmnist.INFO, the data root, loading, corrupt and missing files."""

from __future__ import annotations

import shutil
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch
from medmnist.info import DEFAULT_ROOT

from medistill.data import FLAGS, SIZES, dataset_info, ensure_file, is_cached, load_dataset, resolve_data_root, write_npz_dataset
from medistill.data.dataset import convert_channels
from medistill.data.download import md5sum
from medistill.data.medmnist import DATA_ENV, MIRROR_ENV, file_name, url_and_md5
from medistill.errors import ConfigError, DataError

# The twelve MedMNIST 2D flags, written out; every piece of metadata is then read from medmnist.INFO.
EXPECTED_FLAGS = {
    "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
    "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
}


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def _corrupt_copy(src: Path, dest_dir: Path) -> Path:
    """Copy a file into dest_dir and flip a run of bytes in its middle."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    shutil.copyfile(src, dest)
    data = bytearray(dest.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    dest.write_bytes(bytes(data))
    return dest


def test_all_twelve_2d_flags_with_official_metadata() -> None:
    assert set(FLAGS) == EXPECTED_FLAGS and len(FLAGS) == 12
    assert SIZES == (28, 64, 128, 224)
    for flag in FLAGS:
        info = dataset_info(flag)
        assert info is medmnist.INFO[flag]
        assert url_and_md5(flag) == (medmnist.INFO[flag]["url"], medmnist.INFO[flag]["MD5"])
        assert url_and_md5(flag, 64) == (medmnist.INFO[flag]["url_64"], medmnist.INFO[flag]["MD5_64"])
        assert file_name(flag) == f"{flag}.npz" and file_name(flag, 224) == f"{flag}_224.npz"


def test_unknown_flag_and_size_are_data_errors(medmnist_root: Path) -> None:
    with pytest.raises(DataError, match="nosuchmnist"):
        dataset_info("nosuchmnist")
    with pytest.raises(DataError, match="nosuchmnist"):
        load_dataset("nosuchmnist", root=medmnist_root)
    with pytest.raises(DataError, match="32"):
        load_dataset("breastmnist", root=medmnist_root, size=32)
    with pytest.raises(DataError):
        dataset_info("organmnist3d")  # 3D sets are not part of the 2D toolkit


def test_breastmnist_from_the_shared_root(breast, medmnist_root: Path) -> None:
    info = medmnist.INFO["breastmnist"]
    assert (len(breast.train), len(breast.val), len(breast.test)) == (546, 78, 156)
    assert breast.task == info["task"] == "binary-class"
    assert breast.label_names == [info["label"][str(i)] for i in range(len(info["label"]))]
    assert breast.channels == 1 and breast.image_size == 28 and breast.num_classes == 2
    assert sum(breast.class_counts()) == 546
    assert breast.train.images.dtype == torch.float32 and breast.train.labels.dtype == torch.int64
    mean = breast.train.images.mean(dim=(0, 2, 3))
    std = breast.train.images.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(1), atol=1e-4)
    assert torch.allclose(std, torch.ones(1), atol=1e-4)
    # the stored stats are the raw pixel stats, and denormalising gives back the file's uint8 pixels
    with np.load(medmnist_root / "breastmnist.npz") as raw:
        pixels = raw["train_images"].astype(np.float64) / 255.0
        test_labels = raw["test_labels"][:, 0]
    assert breast.mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert breast.std[0] == pytest.approx(pixels.std(ddof=1), rel=1e-4)
    back = (breast.denormalize(breast.train.images) * 255).round().to(torch.uint8)[:, 0].numpy()
    np.testing.assert_array_equal(back, (pixels * 255).round().astype(np.uint8))
    assert torch.equal(breast.test.labels, torch.from_numpy(test_labels.astype(np.int64)))
    assert breast.source.kind == "medmnist" and breast.source.md5 == info["MD5"] == md5sum(medmnist_root / "breastmnist.npz")


def test_data_root_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, medmnist_root: Path) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_root() == Path(DEFAULT_ROOT).expanduser()
    monkeypatch.setenv(DATA_ENV, str(medmnist_root))
    assert resolve_data_root() == medmnist_root
    assert resolve_data_root(tmp_path) == tmp_path  # the argument wins over the environment
    # the environment is what load_dataset uses when no root is given ...
    data = load_dataset("breastmnist", download=False, progress=False)
    assert Path(data.source.path) == medmnist_root / "breastmnist.npz"
    assert is_cached("breastmnist") and is_cached("pathmnist") == (medmnist_root / "pathmnist.npz").exists()
    # ... and an explicit root overrides it (the empty tmp folder has no file)
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("breastmnist", root=tmp_path, download=False, progress=False)


def test_gray_to_rgb_and_resize(medmnist_root: Path, breast) -> None:
    rgb = load_dataset("breastmnist", root=medmnist_root, image_size=32, channels=3, progress=False)
    assert rgb.train.images.shape == (546, 3, 32, 32) and rgb.test.images.shape == (156, 3, 32, 32)
    assert rgb.channels == 3 and rgb.image_size == 32 and len(rgb.mean) == 3
    assert torch.equal(rgb.train.images[:, 0], rgb.train.images[:, 1])
    assert torch.equal(rgb.train.images[:, 0], rgb.train.images[:, 2])
    assert torch.allclose(rgb.train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # a 32x32 image of the same picture: its mean pixel stays close to the 28x28 one
    small = breast.denormalize(breast.train.images).mean(dim=(1, 2, 3))
    large = rgb.denormalize(rgb.train.images)[:, :1].mean(dim=(1, 2, 3))
    assert torch.allclose(small, large, atol=0.02)


def test_rgb_to_gray_is_luminance(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {s: (rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), np.arange(n).reshape(-1, 1) % 2)
              for s, n in (("train", 8), ("val", 4), ("test", 4))}
    path = write_npz_dataset(tmp_path / "rgb.npz", arrays, task="binary-class", label_names=["a", "b"])
    gray = load_dataset(path, channels=1)
    assert gray.train.images.shape == (8, 1, 16, 16)
    pixels = gray.denormalize(gray.train.images)[:, 0].numpy()
    expected = (arrays["train"][0].astype(np.float64) / 255.0) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(pixels, expected, atol=1e-5)
    with pytest.raises(ConfigError):
        convert_channels(torch.zeros(1, 2, 4, 4), 3)


def test_corrupt_local_file_is_reported_and_left_alone(medmnist_root: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(medmnist_root / "breastmnist.npz", tmp_path / "root")
    before = bad.read_bytes()
    with pytest.raises(DataError) as info:
        ensure_file("breastmnist", root=bad.parent, progress=False)
    message = str(info.value)
    assert "MD5" in message and medmnist.INFO["breastmnist"]["MD5"] in message and md5sum(bad) in message
    assert "\n" not in message
    with pytest.raises(DataError, match="MD5"):
        load_dataset("breastmnist", root=bad.parent, progress=False)
    assert bad.read_bytes() == before
    assert sorted(p.name for p in bad.parent.iterdir()) == ["breastmnist.npz"]


def test_unreadable_npz_at_a_custom_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    path.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(DataError, match="not a readable npz") as info:
        load_dataset(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "absent.npz")


def test_missing_file_without_download_names_file_url_and_folder(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        load_dataset("breastmnist", root=root, download=False, progress=False)
    message = str(info.value)
    assert "breastmnist.npz" in message and medmnist.INFO["breastmnist"]["url"] in message and str(root) in message
    assert "\n" not in message
    with pytest.raises(DataError, match="breastmnist_64.npz"):
        load_dataset("breastmnist", root=root, size=64, download=False)
    assert not root.exists() or not any(root.iterdir())


def test_damaged_compressed_npz_is_always_a_data_error(tmp_path: Path) -> None:
    """Byte damage inside a compressed member raises zlib errors, bad CRCs or bad headers: all become DataError."""
    import zipfile

    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 60, (20, 12, 12), dtype=np.uint8), np.arange(20).reshape(-1, 1) % 2) for s in ("train", "val", "test")}
    good = write_npz_dataset(tmp_path / "good.npz", arrays, task="binary-class", label_names=["a", "b"])
    data = good.read_bytes()
    with zipfile.ZipFile(good) as archive:
        member = archive.getinfo("train_images.npy")
    header = member.header_offset  # local file header: 30 bytes, then name and extra field, then the deflate stream
    name_len, extra_len = (int.from_bytes(data[header + i : header + i + 2], "little") for i in (26, 28))
    start = header + 30 + name_len + extra_len
    bad = tmp_path / "bad.npz"
    for offset in range(start, start + min(member.compress_size, 120)):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        with pytest.raises(DataError, match="not a readable npz"):
            load_dataset(bad)


def test_data_root_that_cannot_be_created(tmp_path: Path) -> None:
    """A data root that is a file (or otherwise not creatable) is a one-line DataError, before any download."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create the data folder") as info:
        load_dataset("breastmnist", root=blocker / "medmnist", progress=False)
    assert str(blocker / "medmnist") in str(info.value) and "\n" not in str(info.value)
