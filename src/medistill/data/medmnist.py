"""Official MedMNIST 2D datasets: metadata from `medmnist.INFO`, files in the data root, MD5-checked."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT
from numpy.lib import format as npy_format

from medistill.data.dataset import SPLITS, Dataset, DataSource, build_dataset
from medistill.data.download import download_file, md5sum
from medistill.data.files import open_regular
from medistill.errors import DataError

SIZES = (28, 64, 128, 224)
FLAGS = tuple(flag for flag, info in INFO.items() if not flag.endswith("3d"))
DATA_ENV = "MEDISTILL_DATA"
MAX_BYTES_ENV = "MEDISTILL_MAX_NPZ_BYTES"  # raise it to load an own npz larger than the default limit
DEFAULT_MAX_NPZ_BYTES = 4 << 30
MIRROR_ENV = "MEDISTILL_MIRROR"  # base URL of a mirror holding the official files under their official names


def dataset_info(flag: str) -> dict[str, Any]:
    """The official `medmnist.INFO` entry of a 2D dataset."""
    if flag not in FLAGS:
        raise DataError(f"unknown MedMNIST dataset '{flag}'; available: {', '.join(FLAGS)}")
    return INFO[flag]


def _check_size(size: int) -> None:
    if size not in SIZES:
        raise DataError(f"MedMNIST size {size} does not exist; choose one of {', '.join(map(str, SIZES))}")


def file_name(flag: str, size: int = 28) -> str:
    """The official file name: `flag.npz` at 28x28, `flag_SIZE.npz` otherwise."""
    _check_size(size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def url_and_md5(flag: str, size: int = 28) -> tuple[str, str]:
    """Download URL and official MD5 of one file: the official URL, or `$MEDISTILL_MIRROR/<file name>`."""
    info = dataset_info(flag)
    _check_size(size)
    suffix = "" if size == 28 else f"_{size}"
    mirror = os.environ.get(MIRROR_ENV)
    url = f"{mirror.rstrip('/')}/{file_name(flag, size)}" if mirror else info[f"url{suffix}"]
    return url, info[f"MD5{suffix}"]


def resolve_data_root(root: str | Path | None = None) -> Path:
    """The data root: the argument, else $MEDISTILL_DATA, else the medmnist cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path(DEFAULT_ROOT).expanduser()


def local_path(flag: str, size: int = 28, root: str | Path | None = None) -> Path:
    return resolve_data_root(root) / file_name(flag, size)


def ensure_file(
    flag: str, size: int = 28, root: str | Path | None = None, *, download: bool = True, progress: bool = True
) -> Path:
    """Return the verified local file of a dataset, downloading it from the official URL if absent.

    An existing file whose MD5 differs is reported and left untouched.
    """
    path = local_path(flag, size, root)
    url, md5 = url_and_md5(flag, size)
    if path.exists():
        actual = md5sum(path)
        if actual != md5:
            raise DataError(
                f"{path} is corrupt or not the official file (MD5 {actual}, expected {md5}); "
                f"it was left in place: remove it to download it again from {url}"
            )
        return path
    if not download:
        raise DataError(f"{path.name} is not in {path.parent}; download {url} and put it there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the data folder {path.parent} ({exc.strerror}); give a writable --data-root or set {DATA_ENV}"
        ) from None
    return download_file(url, path, md5, progress=progress, max_bytes=max_file_bytes(flag, size))


def max_file_bytes(flag: str, size: int = 28) -> int:
    """An upper bound of an official file's size from `medmnist.INFO`: its images and labels uncompressed, plus headers."""
    info = dataset_info(flag)
    images = sum(info["n_samples"].values())
    return images * (size * size * info["n_channels"] + len(info["label"])) + (1 << 20)


def max_npz_bytes() -> int:
    """The most bytes an own npz may hold once inflated ($MEDISTILL_MAX_NPZ_BYTES, default 4 GiB)."""
    text = os.environ.get(MAX_BYTES_ENV)
    if text is None:
        return DEFAULT_MAX_NPZ_BYTES
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        raise DataError(f"${MAX_BYTES_ENV} must be a number of bytes, got {text!r}") from None


_NPY_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
MAX_NPZ_MEMBERS = 1024  # an npz of MedMNIST arrays has seven; more is not a dataset


def _npy_header(handle: IO[bytes] | _Inflated, member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a .npy header (the header only: no array data is read).

    Only plain dtypes are read: numbers, booleans and strings. Structured, nested and object dtypes are refused
    (a MedMNIST array never has them; an object array would need pickle)."""
    version = npy_format.read_magic(handle)
    read_header = _NPY_HEADER_READERS.get(version)
    if read_header is None:
        raise ValueError(f"{member} has .npy format version {version}, which is not read here")
    shape, fortran_order, dtype = read_header(handle)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biufcSU":
        raise ValueError(f"{member} has the dtype {dtype.descr!r}; only arrays of numbers or strings are read")
    return shape, fortran_order, dtype


def declared_bytes(path: Path) -> int:
    """The bytes an npz inflates to as its headers declare them: every member counts, a .npy member by the larger
    of its stored size and the array its header declares, any other member by its stored size."""
    with open_regular(path) as handle, zipfile.ZipFile(handle) as archive:
        return sum(_declared(archive, info) for info in _members(archive, path))


def _members(archive: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if len(members) > MAX_NPZ_MEMBERS:
        raise DataError(f"{path} holds {len(members)} members; an npz of arrays is read with at most {MAX_NPZ_MEMBERS}")
    return members


def _declared(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    if not info.filename.endswith(".npy"):
        return info.file_size
    with archive.open(info) as handle:
        shape, _, dtype = _npy_header(handle, info.filename)
    return max(info.file_size, int(np.prod(shape, dtype=object)) * dtype.itemsize)


class _Inflated(io.RawIOBase):
    """A zip member read through a shared byte count: past `limit` bytes inflated in all, reading stops."""

    def __init__(self, member: IO[bytes], counted: list[int], limit: int | None, path: Path) -> None:
        super().__init__()
        self.member, self.counted, self.limit, self.path = member, counted, limit, path

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.member.read(size if size is not None else -1)
        self.counted[0] += len(data)
        if self.limit is not None and self.counted[0] > self.limit:
            raise DataError(
                f"{self.path} inflates to more than the limit of {self.limit / 2**30:.2f} GiB; "
                f"if the file is genuine, raise ${MAX_BYTES_ENV}"
            )
        return data


def read_npz(path: Path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read every .npy array of an npz file (a regular file only), turning unreadable files into a clear DataError.

    With `max_bytes`, every member counts against it, before anything is allocated by the sizes its headers
    declare (`declared_bytes`) and while it is read by the bytes it actually inflates to. Members that are not
    .npy arrays are counted but never inflated.
    """
    handle = open_regular(path)
    with handle:
        if not zipfile.is_zipfile(handle):  # np.load would guess a pickle and suggest allow_pickle
            raise DataError(
                f"{path} is not a readable npz file: an npz is a zip archive of .npy arrays, and this file is not a zip archive"
            )
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                members = _members(archive, path)
                if max_bytes is not None:
                    declared = sum(_declared(archive, info) for info in members)
                    if declared > max_bytes:
                        raise DataError(
                            f"{path} declares {declared / 2**30:.2f} GiB in its members, more than the limit of "
                            f"{max_bytes / 2**30:.2f} GiB; if the file is genuine, raise ${MAX_BYTES_ENV}"
                        )
                counted = [0]
                arrays = {}
                for info in members:
                    if info.filename.endswith(".npy"):
                        with archive.open(info) as member:
                            arrays[info.filename[: -len(".npy")]] = _read_array(_Inflated(member, counted, max_bytes, path), info)
                return arrays
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError, RecursionError) as exc:
            raise DataError(
                f"{path} is not a readable npz file ({exc.__class__.__name__}: {' '.join(str(exc).split())[:200]})"
            ) from None
        except MemoryError:
            raise DataError(f"{path}: not enough memory to load its arrays") from None


def _read_array(handle: IO[bytes] | _Inflated, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member (header checked as `_npy_header` does), read in chunks."""
    shape, fortran_order, dtype = _npy_header(handle, info.filename)
    count = int(np.prod(shape, dtype=object))
    wanted = count * dtype.itemsize
    array = np.empty(count, dtype=dtype)
    target = array.view(np.uint8).reshape(-1)
    done = 0
    while done < wanted:
        chunk = handle.read(min(1 << 24, wanted - done))
        if not chunk:
            raise EOFError(f"{info.filename} ends after {done} of its {wanted} bytes")
        target[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        done += len(chunk)
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def split_arrays(arrays: dict[str, np.ndarray], path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pick the MedMNIST-named arrays (`train_images`, `train_labels`, ...) out of an npz."""
    needed = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise DataError(f"{path} lacks the MedMNIST array(s) {', '.join(missing)}")
    return {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SPLITS}


def load_medmnist(
    flag: str,
    *,
    size: int = 28,
    root: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str = "cpu",
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load an official MedMNIST 2D dataset (verified by MD5) into tensors on `device`."""
    info = dataset_info(flag)
    path = ensure_file(flag, size, root, download=download, progress=progress)
    arrays = split_arrays(read_npz(path), path)
    label_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    source = DataSource(kind="medmnist", name=flag, path=str(path), md5=url_and_md5(flag, size)[1], size=size)
    return build_dataset(
        name=flag,
        task=info["task"],
        label_names=label_names,
        arrays=arrays,
        source=source,
        channels=channels,
        image_size=image_size,
        device=device,
    )


def is_cached(flag: str, size: int = 28, root: str | Path | None = None) -> bool:
    """Whether the file of a dataset is present in the data root (not verified)."""
    return local_path(flag, size, root).exists()
