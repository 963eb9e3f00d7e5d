"""Try hostile and careless inputs on the real `medistill` executable and print what happened.

Each case builds its input in a fresh folder, runs `python -m medistill ...` and checks the promise:
the expected exit code (2 for a bad input), exactly one line on stderr and no traceback, every file
that existed before unchanged, and the case's own check (no code ran, nothing written, ...).

    python scripts/hostile_inputs.py                 # all cases, Markdown table on stdout
    python scripts/hostile_inputs.py --json          # the same as JSON
    python scripts/hostile_inputs.py --topic export  # only the cases of one topic
    python scripts/hostile_inputs.py --skip bomb     # leave some out (e.g. on a version without the limits)

Needs the official breastmnist.npz in $MEDISTILL_DATA (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One hostile input: `prepare(folder)` builds it and returns the medistill arguments."""

    topic: str
    name: str
    prepare: Callable[[Path], list[str]]
    exit_code: int = 2
    check: Callable[[Path, subprocess.CompletedProcess], str | None] = lambda folder, done: None  # a failure, or None
    env: dict[str, str] = field(default_factory=dict)
    max_file_bytes: int | None = None  # simulate a full disk: writes beyond this many bytes per file fail
    cleanup: Callable[[Path], None] = lambda folder: None
    executable: bool = False  # the test suite runs it through the real executable (else in-process through cli.main)
    timeout: float = 600.0  # seconds the command may run: a case that could hang (a FIFO) gets a shorter one


CASES: list[Case] = []


def case(topic: str, name: str, **options) -> Callable:
    def register(prepare: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        CASES.append(Case(topic, name, prepare, **options))
        return prepare
    return register


# --- inputs --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def breast():
    from medistill.data import load_dataset

    return load_dataset("breastmnist", progress=False)


def tiny_npz(path: Path, images=None, labels=None, **extra) -> Path:
    """A small MedMNIST-style npz of random pixels, two classes; any array can be replaced."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (8, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([0, 1] * 4, dtype=np.uint8).reshape(-1, 1)
    if images is not None:
        arrays["train_images"] = images
    if labels is not None:
        arrays["train_labels"] = labels
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def noise_set(method: str = "dc"):
    """A set of random pixels on BreastMNIST: far from every real image, so the near-copy screen passes."""
    import torch

    from medistill.methods import new_set

    data = breast()
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return new_set(data, images, torch.tensor([0, 0, 1, 1]), method=method, ipc=2, seed=0)


def bundle(folder: Path) -> Path:
    from medistill.bundle import export_bundle

    return export_bundle(noise_set(), folder / "bundle")


def edited_artifact(folder: Path, **metadata) -> Path:
    """A saved set whose JSON header was edited (keys set to the given values, None removes a key)."""
    from safetensors.torch import load_file, save_file

    path = noise_set().save(folder / "set")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["medistill"])
    tensors = load_file(str(path))
    for key, value in metadata.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata={"medistill": json.dumps(meta)})
    return path


def no_file(name: str) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    return lambda folder, done: f"{name} exists" if (folder / name).exists() else None


class Payload:
    """Unpickling this creates the file `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


PAYLOAD_MARKER = "code-ran"


# --- no code from files ---------------------------------------------------------------------------

@case("no code from files", "pickle payload as the checkpoint of `distill --resume`", check=no_file(PAYLOAD_MARKER))
def _(folder: Path) -> list[str]:
    npz = tiny_npz(folder / "tiny.npz")
    (folder / "out" / "checkpoints").mkdir(parents=True)
    (folder / "out" / "checkpoints" / "state.safetensors").write_bytes(pickle.dumps(Payload(folder / PAYLOAD_MARKER)))
    return ["distill", str(npz), "-m", "dm", "--ipc", "1", "--out", str(folder / "out"), "--resume", "--device", "cpu", "--no-progress"]


@case("no code from files", "pickle payload under the old checkpoint name state.pt", check=no_file(PAYLOAD_MARKER))
def _(folder: Path) -> list[str]:
    npz = tiny_npz(folder / "tiny.npz")
    (folder / "out" / "checkpoints").mkdir(parents=True)
    import torch

    torch.save({"state": Payload(folder / PAYLOAD_MARKER)}, folder / "out" / "checkpoints" / "state.pt")
    return ["distill", str(npz), "-m", "dm", "--ipc", "1", "--out", str(folder / "out"), "--resume", "--device", "cpu", "--no-progress"]


# --- no real images out of the door ---------------------------------------------------------------

@case("export gate", "random subset relabelled `dc` in its header", check=no_file("bundle"))
def _(folder: Path) -> list[str]:
    from medistill.methods import distill

    synthetic = distill("random", breast(), 2)
    synthetic.method = "dc"
    return ["export", str(synthetic.save(folder / "set")), "--out", str(folder / "bundle"), "--device", "cpu"]


@case("export gate", "DM initialised from real images, 1 iteration at lr 1e-12", check=no_file("bundle"))
def _(folder: Path) -> list[str]:
    from medistill.methods import distill

    synthetic = distill("dm", breast(), 1, {"iterations": 1, "lr_img": 1e-12, "init": "real", "batch_real": 8})
    return ["export", str(synthetic.save(folder / "set")), "--out", str(folder / "bundle"), "--device", "cpu"]


@case("export gate", "audit report made for another file given to `export --audit`", check=no_file("bundle"))
def _(folder: Path) -> list[str]:
    path = noise_set().save(folder / "set")
    (folder / "audit.json").write_text(json.dumps({"artifact": {"sha256": "0" * 64}, "passed": True}))
    return ["export", str(path), "--out", str(folder / "bundle"), "--audit", str(folder / "audit.json"), "--device", "cpu"]


# --- audit never writes into what is shared -------------------------------------------------------

def bundle_intact(folder: Path, done: subprocess.CompletedProcess) -> str | None:
    from medistill.bundle import load_bundle

    load_bundle(folder / "bundle")  # raises if the set no longer matches its card's SHA-256
    extra = sorted({p.name for p in (folder / "bundle").iterdir()} - {"synthetic.safetensors", "synthetic.npz", "grid.png",
                                                                     "dataset_card.json", "dataset_card.md"})
    return f"the bundle gained {extra}" if extra else None


@case("audit never writes into a bundle", "`audit BUNDLE --report BUNDLE/audit`", check=bundle_intact)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["audit", str(path), "--report", str(path / "audit"), "--no-mia", "--feature-epochs", "0", "--device", "cpu", "--no-progress"]


@case("audit never writes into a bundle", "`audit BUNDLE` (report goes beside it)", exit_code=0,
      check=lambda folder, done: bundle_intact(folder, done) or (None if (folder / "bundle-audit" / "audit.json").is_file()
                                                                else "no report beside the bundle"))
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["audit", str(path), "--no-mia", "--feature-epochs", "0", "--device", "cpu", "--no-progress"]


# --- memory bombs ---------------------------------------------------------------------------------

@case("memory bombs", "one label value of 2^40 in an own npz")
def _(folder: Path) -> list[str]:
    labels = np.array([0, 1] * 3 + [0, 2**40], dtype=np.int64).reshape(-1, 1)
    return ["distill", str(tiny_npz(folder / "labels.npz", labels=labels)), "-m", "random", "--out", str(folder / "out")]


@case("memory bombs", "1 KB npz whose header declares 8 GiB")
def _(folder: Path) -> list[str]:
    from numpy.lib import format as npy_format

    path = tiny_npz(folder / "declared.npz")
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**21, 64, 64)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("huge.npy", header.getvalue() + b"\0" * 64)
    return ["distill", str(path), "-m", "random", "--out", str(folder / "out")]


@case("memory bombs", "deflate bomb: 200 MB of zeros in a 200 KB npz (limit set to 64 MB)",
      env={"MEDISTILL_MAX_NPZ_BYTES": str(64 << 20)})
def _(folder: Path) -> list[str]:
    path = folder / "deflate.npz"
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (np.zeros((200_000, 32, 32), np.uint8) if (s, k) == ("train", "images") else
                           rng.integers(0, 256, (8, 32, 32), dtype=np.uint8) if k == "images" else np.zeros((8, 1), np.uint8))
              for s in ("train", "val", "test") for k in ("images", "labels")}
    arrays["train_labels"] = np.zeros((200_000, 1), np.uint8)
    np.savez_compressed(path, **arrays)
    return ["distill", str(path), "-m", "random", "--out", str(folder / "out")]


@case("memory bombs", "PNG decompression bomb (10000x10000) in an image folder")
def _(folder: Path) -> list[str]:
    from PIL import Image

    root = image_folder(folder)
    Image.new("1", (10_000, 10_000)).save(root / "a" / "bomb.png")
    return ["distill", str(root), "-m", "random", "--out", str(folder / "out")]


def image_folder(folder: Path, per_class: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = folder / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# --- atomic, non-clobbering outputs ---------------------------------------------------------------

@case("atomic, non-clobbering outputs", "`train --out` into a bundle's own artifact", check=bundle_intact)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["train", str(path), "--out", str(path / "synthetic.safetensors"), "--epochs", "1", "--device", "cpu", "--no-progress"]


@case("atomic, non-clobbering outputs", "`distill --out BUNDLE` (a bundle as job folder)", check=bundle_intact)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["distill", "breastmnist", "-m", "random", "--ipc", "2", "--out", str(path), "--device", "cpu", "--no-progress"]


@case("atomic, non-clobbering outputs", "`simulate --out` onto an existing file")
def _(folder: Path) -> list[str]:
    (folder / "mine.npz").write_bytes(b"my own work")
    return ["simulate", "--datasets", f"breastmnist,{tiny_npz(folder / 'tiny.npz')}", "--out", str(folder / "mine.npz")]


@case("atomic, non-clobbering outputs", "`distill --out` onto a finished run")
def _(folder: Path) -> list[str]:
    (folder / "run").mkdir()
    (folder / "run" / "result.json").write_text('{"mine": true}\n')
    return ["distill", "breastmnist", "-m", "random", "--ipc", "2", "--out", str(folder / "run"), "--device", "cpu", "--no-progress"]


@case("atomic, non-clobbering outputs", "disk full while `distill` writes its outputs", max_file_bytes=4096,
      check=no_file("run/result.json"))
def _(folder: Path) -> list[str]:
    return ["distill", "breastmnist", "-m", "random", "--ipc", "2", "--out", str(folder / "run"), "--eval-models", "1",
            "--eval-epochs", "1", "--device", "cpu", "--no-progress"]


# --- one runner per study -------------------------------------------------------------------------

def study_config(folder: Path, method: str = "random") -> Path:
    config = folder / "study.yaml"
    config.write_text(f"datasets: [breastmnist]\nmethods: [{method}]\nipcs: [1]\neval: {{num_models: 1, epochs: 1}}\n")
    return config


def hold_lock(folder: Path) -> list[str]:
    code = ("import sys, time; from pathlib import Path; from medistill.study.store import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / "study")], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    (folder / "holder.pid").write_text(str(holder.pid))
    return ["study", str(study_config(folder)), "--out", str(folder / "study"), "--no-report"]


def release_lock(folder: Path) -> None:
    pid = int((folder / "holder.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


@case("one runner per study", "a second runner on a study folder in use", cleanup=release_lock,
      check=lambda folder, done: None if f"pid {(folder / 'holder.pid').read_text()}" in done.stderr else "the holder is not named")
def _(folder: Path) -> list[str]:
    return hold_lock(folder)


@case("one runner per study", "a study whose runs fail", exit_code=1,
      check=lambda folder, done: None if "1 run(s) failed: " in done.stderr else "the failed run is not named")
def _(folder: Path) -> list[str]:
    return ["study", str(study_config(folder, "nosuchmethod")), "--out", str(folder / "study"), "--no-report"]


# --- one line for every bad input -----------------------------------------------------------------

def distill_npz(name: str, **arrays) -> Callable[[Path], list[str]]:
    def prepare(folder: Path) -> list[str]:
        return ["distill", str(tiny_npz(folder / "bad.npz", **arrays)), "-m", "random", "--out", str(folder / "out")]
    return prepare


BAD_ARRAYS = {
    "1-D image array": {"images": np.zeros(8, np.uint8)},
    "0-D image array": {"images": np.array(3, np.uint8)},
    "non-square images (16x20)": {"images": np.zeros((8, 16, 20), np.uint8)},
    "splits of different image sizes": {"images": np.zeros((8, 20, 20), np.uint8)},
    "NaN in the images": {"images": np.full((8, 16, 16), np.nan, np.float32)},
    "images as strings": {"images": np.array([["a"] * 16] * 8)},
    "NaN labels": {"labels": np.full((8, 1), np.nan)},
    "labels as strings": {"labels": np.array([["x"]] * 8)},
    "empty labels": {"labels": np.zeros((0, 1), np.uint8)},
    "a single-class training split": {"labels": np.zeros((8, 1), np.uint8)},
}
for _name, _arrays in BAD_ARRAYS.items():
    case("one line for every bad input", _name)(distill_npz(_name, **_arrays))


@case("one line for every bad input", "a truncated PNG in an image folder")
def _(folder: Path) -> list[str]:
    root = image_folder(folder)
    data = (root / "a" / "0.png").read_bytes()
    (root / "a" / "0.png").write_bytes(data[: len(data) // 2])
    return ["distill", str(root), "-m", "random", "--out", str(folder / "out")]


ARTIFACT_EDITS = {
    "artifact without `source`": {"source": None},
    "artifact whose `mean` is a string": {"mean": "grey"},
    "artifact whose labels exceed its classes": {"label_names": ["only one"]},
    "artifact whose `source` names another file": {"source": {"source": {"kind": "medmnist", "name": "pathmnist", "md5": "0" * 32}}},
}
for _name, _edit in ARTIFACT_EDITS.items():
    case("one line for every bad input", f"`evaluate` an {_name}", check=no_file("data/pathmnist.npz"))(
        lambda folder, _edit=_edit: ["evaluate", str(edited_artifact(folder, **_edit)), "--data-root", str(folder / "data"),
                                     "--eval-models", "1", "--eval-epochs", "1", "--device", "cpu", "--no-progress"])


def edited_card(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def prepare(folder: Path) -> list[str]:
        path = bundle(folder)
        card = json.loads((path / "dataset_card.json").read_text())
        edit(card)
        (path / "dataset_card.json").write_text(json.dumps(card))
        return ["train", str(path), "--out", str(folder / "model.pt"), "--epochs", "1", "--device", "cpu", "--no-progress"]
    return prepare


case("one line for every bad input", "bundle card without `recommended_training`", check=no_file("model.pt"))(
    edited_card(lambda card: card.pop("recommended_training")))
case("one line for every bad input", "bundle card with `lr: NaN`", check=no_file("model.pt"))(
    edited_card(lambda card: card["recommended_training"].update(lr=float("nan"))))
case("one line for every bad input", "bundle card with `epochs: \"many\"`", check=no_file("model.pt"))(
    edited_card(lambda card: card["recommended_training"].update(epochs="many")))


@case("one line for every bad input", "study config with `data: {size: big}`")
def _(folder: Path) -> list[str]:
    (folder / "s.yaml").write_text("datasets: [breastmnist]\nmethods: [random]\ndata: {size: big}\n")
    return ["study", str(folder / "s.yaml"), "--out", str(folder / "study"), "--no-report"]


@case("one line for every bad input", "YAML alias bomb (billion laughs) as a study config")
def _(folder: Path) -> list[str]:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    (folder / "bomb.yaml").write_text("\n".join(lines) + "\ndatasets: *i\nmethods: [random]\n")
    return ["study", str(folder / "bomb.yaml"), "--out", str(folder / "study"), "--no-report"]


@case("one line for every bad input", "a broken study.json given to `report`")
def _(folder: Path) -> list[str]:
    (folder / "study").mkdir()
    (folder / "study" / "study.json").write_text('{"runs": [')
    return ["report", str(folder / "study")]


@case("one line for every bad input", "`--set iterations=abc`")
def _(folder: Path) -> list[str]:
    return ["distill", str(tiny_npz(folder / "tiny.npz")), "-m", "dm", "--ipc", "1", "--set", "iterations=abc", "--out", str(folder / "out")]


# --- downloads ------------------------------------------------------------------------------------

@case("downloads", "a link out of an image folder")
def _(folder: Path) -> list[str]:
    root = image_folder(folder)
    (folder / "secret.png").write_bytes((root / "a" / "0.png").read_bytes())
    (root / "a" / "9.png").symlink_to(folder / "secret.png")
    return ["distill", str(root), "-m", "random", "--ipc", "1", "--eval-models", "1", "--eval-epochs", "1", "--out", str(folder / "out"),
            "--device", "cpu", "--no-progress"]


# --- values as users type them --------------------------------------------------------------------

@case("values as users type them", "`--set lr_img=1e-6` (read as a number: the run works)", exit_code=0,
      check=lambda folder, done: None if json.loads((folder / "out" / "result.json").read_text())["hyperparameters"]["lr_img"] == 1e-6
      else "lr_img was not 1e-6")
def _(folder: Path) -> list[str]:
    return ["distill", str(tiny_npz(folder / "tiny.npz")), "-m", "dm", "--ipc", "1", "--set", "iterations=1", "--set", "lr_img=1e-6",
            "--set", "batch_real=2", "--eval-models", "1", "--eval-epochs", "1", "--out", str(folder / "out"), "--device", "cpu",
            "--no-progress"]


# --- writes confined to their place ---------------------------------------------------------------

PLACES = "writes confined to their place"
MISSING_DATA = "missing.npz"  # a dataset that is not there: a refusal naming the output place came before any data


def place_refused(*needles: str, intact: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None):
    """The one line names the output place (each needle), not the data that was never loaded; `intact` checks more."""
    def check(folder: Path, done: subprocess.CompletedProcess) -> str | None:
        line = (done.stderr.strip().splitlines() or [""])[-1]
        if MISSING_DATA in line:
            return "the data was loaded before the output place was checked"
        missing = [needle for needle in needles if needle not in line]
        if missing:
            return f"the line does not say {missing}"
        return intact(folder, done) if intact is not None else None
    return check


def only_the_set(folder: Path, done: subprocess.CompletedProcess) -> str | None:
    names = sorted(p.name for p in (folder / "set").iterdir())
    return None if names == ["synthetic.safetensors"] else f"the set's folder holds {names}"


def nothing_hidden(folder: Path, done: subprocess.CompletedProcess) -> str | None:
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    return f"temporary folders left: {left}" if left else None


def make_unwritable(path: Path) -> None:
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere but into an immutable folder
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)


def writable_again(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder / "readonly")], capture_output=True)
    (folder / "readonly").chmod(0o755)


def hold_job_lock(folder: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from medistill.outputs import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / "run")], stdout=subprocess.PIPE, text=True, env=env)
    holder.stdout.readline()
    (folder / "holder.pid").write_text(str(holder.pid))


def private_set(folder: Path, drop: str) -> Path:
    """A dp-dm set whose verified privacy record lost one field the dataset card states."""
    from medistill.methods import distill

    synthetic = distill("dp-dm", breast(), 1, {"iterations": 1, "epsilon": 8.0, "batch_real": 8})
    synthetic.extra["privacy"].pop(drop)
    return synthetic.save(folder / "set")


@case(PLACES, "`audit SET --report LINK` (a link to a bundle)", check=place_refused("a shared bundle", intact=bundle_intact),
      executable=True)
def _(folder: Path) -> list[str]:
    bundle(folder)
    (folder / "link").symlink_to(folder / "bundle")
    path = noise_set().save(folder / "set")
    return ["audit", str(path), "--report", str(folder / "link"), "--no-mia", "--feature-epochs", "0", "--device", "cpu",
            "--no-progress"]


@case(PLACES, "`audit SET --report OTHER_SET` (another set's folder)",
      check=lambda folder, done: None if sorted(p.name for p in (folder / "other").iterdir()) == ["synthetic.safetensors"]
      else "the other set's folder gained files", executable=True)
def _(folder: Path) -> list[str]:
    noise_set().save(folder / "other")
    path = noise_set().save(folder / "set")
    return ["audit", str(path), "--report", str(folder / "other"), "--no-mia", "--feature-epochs", "0", "--device", "cpu",
            "--no-progress"]


@case(PLACES, "`audit SET --report R` whose audit.json is a link to a file outside R", check=place_refused("link"),
      executable=True)
def _(folder: Path) -> list[str]:
    path = noise_set().save(folder / "set")
    (folder / "report").mkdir()
    (folder / "mine.json").write_text('{"my": "own"}\n')
    (folder / "report" / "audit.json").symlink_to(folder / "mine.json")
    return ["audit", str(path), "--report", str(folder / "report"), "--force", "--no-mia", "--feature-epochs", "0",
            "--device", "cpu", "--no-progress"]


@case(PLACES, "`train BUNDLE --out SET/model.pt` (into a set's folder)", check=place_refused("set's folder", intact=only_the_set),
      executable=True)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    noise_set().save(folder / "set")
    return ["train", str(path), "--out", str(folder / "set" / "model.pt"), "--epochs", "1", "--device", "cpu", "--no-progress"]


@case(PLACES, "`train BUNDLE --out x/../bundle/model.pt` (a `..` path into the bundle)",
      check=place_refused("a shared bundle", intact=bundle_intact), executable=True)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    (folder / "x").mkdir()
    return ["train", str(path), "--out", str(folder / "x" / ".." / "bundle" / "model.pt"), "--epochs", "1", "--device", "cpu",
            "--no-progress"]


@case(PLACES, "`distill --out LINK` (a link to a bundle)", check=place_refused("a shared bundle", intact=bundle_intact),
      executable=True)
def _(folder: Path) -> list[str]:
    bundle(folder)
    (folder / "link").symlink_to(folder / "bundle")
    return ["distill", str(folder / MISSING_DATA), "-m", "random", "--out", str(folder / "link"), "--device", "cpu"]


@case(PLACES, "`distill --out SET` (a set's folder, no --force)", check=place_refused("already exists", intact=only_the_set),
      executable=True)
def _(folder: Path) -> list[str]:
    noise_set().save(folder / "set")
    return ["distill", str(folder / MISSING_DATA), "-m", "random", "--out", str(folder / "set"), "--device", "cpu"]


@case(PLACES, "`distill --out RUN` where RUN holds the user's own grid.png (no --force)", check=place_refused("grid.png"),
      executable=True)
def _(folder: Path) -> list[str]:
    (folder / "run").mkdir()
    (folder / "run" / "grid.png").write_bytes(b"my own picture")
    return ["distill", str(folder / MISSING_DATA), "-m", "random", "--out", str(folder / "run"), "--device", "cpu"]


@case(PLACES, "`distill --out RUN --resume` where RUN/checkpoints is a link out of RUN",
      check=place_refused("link", intact=lambda folder, done: "written through the link" if any((folder / "outside").iterdir())
                          else None), executable=True)
def _(folder: Path) -> list[str]:
    (folder / "outside").mkdir()
    (folder / "run").mkdir()
    (folder / "run" / "checkpoints").symlink_to(folder / "outside")
    return ["distill", str(folder / MISSING_DATA), "-m", "dm", "--out", str(folder / "run"), "--resume", "--device", "cpu"]


@case(PLACES, "`distill --out FILE/run` (under a file)", check=place_refused("file, not a folder"), executable=True)
def _(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("mine\n")
    return ["distill", str(folder / MISSING_DATA), "-m", "random", "--out", str(folder / "notes.txt" / "run"), "--device", "cpu"]


@case(PLACES, "`distill --out` into a read-only folder", check=place_refused("cannot write to"), cleanup=writable_again,
      executable=True)
def _(folder: Path) -> list[str]:
    make_unwritable(folder / "readonly")
    return ["distill", str(folder / MISSING_DATA), "-m", "random", "--out", str(folder / "readonly" / "run"), "--device", "cpu"]


@case(PLACES, "a second `distill` into a folder in use", cleanup=release_lock,
      check=lambda folder, done: None if f"pid {(folder / 'holder.pid').read_text()}" in done.stderr else "the holder is not named",
      executable=True)
def _(folder: Path) -> list[str]:
    hold_job_lock(folder)
    return ["distill", str(tiny_npz(folder / "tiny.npz")), "-m", "random", "--ipc", "1", "--out", str(folder / "run"),
            "--eval-models", "1", "--eval-epochs", "1", "--device", "cpu", "--no-progress"]


@case(PLACES, "a study folder whose .lock is a link to the user's file", check=place_refused("symbolic link"), executable=True)
def _(folder: Path) -> list[str]:
    (folder / "thesis.tex").write_text("three years of work\n")
    (folder / "study").mkdir()
    (folder / "study" / ".lock").symlink_to(folder / "thesis.tex")
    return ["study", str(study_config(folder)), "--out", str(folder / "study"), "--no-report"]


@case(PLACES, "a study config whose simulation is named `../../x`", check=place_refused(
      "simulation name", intact=lambda folder, done: "a simulation was written outside" if list(folder.rglob("x-*.npz")) else None),
      executable=True)
def _(folder: Path) -> list[str]:
    (folder / "s.yaml").write_text('datasets: [x]\nmethods: [random]\nipcs: [1]\n'
                                  'simulations:\n  "../../x": {datasets: [breastmnist, pneumoniamnist], fraction: 0.01}\n')
    return ["study", str(folder / "s.yaml"), "--out", str(folder / "a" / "study"), "--no-report"]


@case(PLACES, "`simulate --out BUNDLE/sim.npz`", check=place_refused("a shared bundle", intact=bundle_intact), executable=True)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["simulate", "--datasets", f"{folder / MISSING_DATA},{folder / 'missing2.npz'}", "--out", str(path / "sim.npz")]


@case(PLACES, "`evaluate SET --out FILE/scores.json` (under a file)", check=place_refused("file, not a folder"), executable=True)
def _(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("mine\n")
    return ["evaluate", str(folder / MISSING_DATA), "--out", str(folder / "notes.txt" / "scores.json"), "--device", "cpu"]


@case(PLACES, "`privacy-audit --out SET` (a set's folder)", check=place_refused("set's folder", intact=only_the_set),
      executable=True)
def _(folder: Path) -> list[str]:
    noise_set().save(folder / "set")
    return ["privacy-audit", str(folder / MISSING_DATA), "-m", "dm", "--out", str(folder / "set"), "--device", "cpu"]


@case(PLACES, "`dp-sgd --out BUNDLE`", check=place_refused("a shared bundle", intact=bundle_intact), executable=True)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["dp-sgd", str(folder / MISSING_DATA), "--epsilon", "1", "--out", str(path), "--device", "cpu"]


@case(PLACES, "`experts --out BUNDLE/experts`", check=place_refused("a shared bundle", intact=bundle_intact), executable=True)
def _(folder: Path) -> list[str]:
    path = bundle(folder)
    return ["experts", str(folder / MISSING_DATA), "--out", str(path / "experts"), "--device", "cpu"]


@case(PLACES, "`export` a set whose metric `test_acc_mean` is a string",
      check=lambda folder, done: no_file("bundle")(folder, done) or nothing_hidden(folder, done), executable=True)
def _(folder: Path) -> list[str]:
    path = edited_artifact(folder, metrics={"test_acc_mean": "high", "test_acc_std": 0.1, "test_auc_mean": 0.5,
                                            "test_auc_std": 0.1})
    return ["export", str(path), "--out", str(folder / "bundle"), "--device", "cpu"]


@case(PLACES, "`export` a private set whose privacy record lost its `mechanism`",
      check=lambda folder, done: no_file("bundle")(folder, done) or nothing_hidden(folder, done), executable=True)
def _(folder: Path) -> list[str]:
    return ["export", str(private_set(folder, "mechanism")), "--out", str(folder / "bundle"), "--device", "cpu"]


@case(PLACES, "`export` over an earlier bundle, of a set whose `eval_protocol` is a string",
      check=lambda folder, done: bundle_intact(folder, done) or nothing_hidden(folder, done), executable=True)
def _(folder: Path) -> list[str]:
    bundle(folder)
    path = edited_artifact(folder, metrics={"eval_protocol": "convnet"})
    return ["export", str(path), "--out", str(folder / "bundle"), "--device", "cpu"]


# (end of writes confined to their place)


# --- bounded before allocation --------------------------------------------------------------------

def medistill_cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the real executable while preparing a case (its output is not judged)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "medistill", *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600, check=True)


def mentions(*texts: str) -> Callable[[Path, subprocess.CompletedProcess], str | None]:
    """A check that the error line says each of `texts` (what was refused, and the bound)."""
    return lambda folder, done: next((f"the error does not say {text!r}" for text in texts if text not in done.stderr), None)


def distill_folder(root: Path, folder: Path, *extra: str) -> list[str]:
    return ["distill", str(root), "-m", "random", "--ipc", "1", "--eval-models", "1", "--eval-epochs", "1",
            "--out", str(folder / "out"), "--device", "cpu", "--no-progress", *extra]


@case("bounded before allocation", "a FIFO named x.png in an image folder (never opened)", timeout=120,
      check=mentions("FIFO", "not a regular file"), executable=True)
def _(folder: Path) -> list[str]:
    root = image_folder(folder)
    os.mkfifo(root / "a" / "x.png")
    return distill_folder(root, folder)


@case("bounded before allocation", "a symbolic-link loop named x.png in an image folder", timeout=120,
      check=mentions("symbolic-link loop"), executable=True)
def _(folder: Path) -> list[str]:
    root = image_folder(folder)
    (root / "a" / "x.png").symlink_to("y.png")
    (root / "a" / "y.png").symlink_to("x.png")
    return distill_folder(root, folder)


@case("bounded before allocation", "`train/` is a link to a folder outside the image folder",
      check=mentions("outside the image folder"), executable=True)
def _(folder: Path) -> list[str]:
    elsewhere = image_folder(folder / "elsewhere")
    root = folder / "split"
    for split in ("val", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                (root / split / name / f"{i}.png").write_bytes((elsewhere / name / f"{i}.png").read_bytes())
    (root / "train").symlink_to(elsewhere)
    return distill_folder(root, folder)


@case("bounded before allocation", "a class folder that is a link to a folder outside the image folder",
      check=mentions("outside the image folder"))
def _(folder: Path) -> list[str]:
    elsewhere = image_folder(folder / "elsewhere")
    root = image_folder(folder)
    (root / "c").symlink_to(elsewhere / "a")
    return distill_folder(root, folder)


@case("bounded before allocation", "a FIFO in the data root in place of breastmnist.npz", timeout=120,
      check=mentions("FIFO"), executable=True)
def _(folder: Path) -> list[str]:
    (folder / "data").mkdir()
    os.mkfifo(folder / "data" / "breastmnist.npz")
    return ["distill", "breastmnist", "-m", "random", "--out", str(folder / "out"), "--data-root", str(folder / "data")]


@case("bounded before allocation", "a FIFO named own.npz given as the dataset", timeout=120, check=mentions("FIFO"),
      executable=True)
def _(folder: Path) -> list[str]:
    os.mkfifo(folder / "own.npz")
    return ["distill", str(folder / "own.npz"), "-m", "random", "--out", str(folder / "out")]


@case("bounded before allocation", "npz whose non-.npy member inflates to 200 MB (limit set to 64 MB)",
      env={"MEDISTILL_MAX_NPZ_BYTES": str(64 << 20)}, check=mentions("in its members", "MEDISTILL_MAX_NPZ_BYTES"),
      executable=True)
def _(folder: Path) -> list[str]:
    path = tiny_npz(folder / "member.npz")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("notes.bin", "w", force_zip64=True) as member:
        for _ in range(200):
            member.write(bytes(1 << 20))
    return ["distill", str(path), "-m", "random", "--out", str(folder / "out")]


@case("bounded before allocation", "npz metadata JSON nested 5000 levels deep", check=mentions("nests deeper"))
def _(folder: Path) -> list[str]:
    path = tiny_npz(folder / "nested.npz", medistill_meta=np.array("[" * 5000 + "]" * 5000))
    return ["distill", str(path), "-m", "random", "--out", str(folder / "out")]


@case("bounded before allocation", "npz array of a nested structured dtype", check=mentions("only arrays of numbers"))
def _(folder: Path) -> list[str]:
    nested = np.zeros(4, np.dtype([("a", [("b", [("c", "u1")])])]))
    return ["distill", str(tiny_npz(folder / "dtype.npz", extra=nested)), "-m", "random", "--out", str(folder / "out")]


@case("bounded before allocation", "`export` of a set of 2048x2048 images (its source would be resized to 2048)",
      check=lambda folder, done: no_file("bundle")(folder, done) or mentions("2048", "8..1024")(folder, done), executable=True)
def _(folder: Path) -> list[str]:
    import torch

    from medistill.methods import new_set

    images = torch.randn(2, 1, 2048, 2048, generator=torch.Generator().manual_seed(0))
    synthetic = new_set(breast(), images, torch.tensor([0, 1]), method="dc", ipc=1, seed=0)
    return ["export", str(synthetic.save(folder / "set")), "--out", str(folder / "bundle"), "--device", "cpu"]


@case("bounded before allocation", "an image folder of 2048x2048 images without --image-size", check=mentions("2048", "--image-size"))
def _(folder: Path) -> list[str]:
    from PIL import Image

    root = image_folder(folder)
    for path in root.rglob("*.png"):
        Image.new("L", (2048, 2048)).save(path)
    return distill_folder(root, folder)


@case("bounded before allocation", "`--ipc 100000000000`", check=mentions("1..1,000,000"), executable=True)
def _(folder: Path) -> list[str]:
    return ["distill", "breastmnist", "-m", "random", "--ipc", str(10**11), "--out", str(folder / "out")]


@case("bounded before allocation", "`dm --ipc 900000` from noise (the set alone would need over 1 TB)",
      check=mentions("too large", "largest IPC within it"), executable=True)
def _(folder: Path) -> list[str]:
    return ["distill", "breastmnist", "-m", "dm", "--ipc", "900000", "--set", "init=noise", "--out", str(folder / "out"),
            "--device", "cpu", "--no-progress"]


@case("bounded before allocation", "`--image-size 100000`", check=mentions("8..1024"), executable=True)
def _(folder: Path) -> list[str]:
    return ["distill", "breastmnist", "-m", "random", "--image-size", "100000", "--out", str(folder / "out")]


for _seed in (2**32, 2**63, -1):
    case("bounded before allocation", f"`--seed {_seed}`", check=mentions("0..4294967295"), executable=True)(
        lambda folder, _seed=_seed: ["distill", "breastmnist", "-m", "random", "--ipc", "1", "--seed", str(_seed),
                                     "--out", str(folder / "out")])
case("bounded before allocation", "`privacy-audit --seed -1`", check=mentions("0..4294967295"))(
    lambda folder: ["privacy-audit", "breastmnist", "-m", "dm", "--seed", "-1", "--out", str(folder / "out")])


@case("bounded before allocation", "study config with `seeds: [4294967296]`", check=mentions("0..4294967295"))
def _(folder: Path) -> list[str]:
    (folder / "s.yaml").write_text("datasets: [breastmnist]\nmethods: [random]\nseeds: [4294967296]\n")
    return ["study", str(folder / "s.yaml"), "--out", str(folder / "study"), "--no-report"]


def edited_checkpoint(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    """A run whose checkpoint carries the run's own fingerprint but a state edited by `edit`, resumed."""
    def prepare(folder: Path) -> list[str]:
        from medistill.methods.checkpoint import read_state, write_state

        args = ["distill", str(tiny_npz(folder / "tiny.npz")), "-m", "dm", "--ipc", "1", "--set", "iterations=4",
                "--set", "checkpoint_every=2", "--set", "batch_real=2", "--eval-models", "1", "--eval-epochs", "1",
                "--out", str(folder / "out"), "--device", "cpu", "--no-progress"]
        medistill_cli(folder, *args)
        for name in ("result.json", "synthetic.safetensors", "grid.png"):
            (folder / "out" / name).unlink(missing_ok=True)
        path = folder / "out" / "checkpoints" / "state.safetensors"
        saved = read_state(path)
        edit(saved["state"])
        write_state(path, saved)
        return [*args, "--resume"]
    return prepare


def _wrong_images(state: dict) -> None:
    import torch

    state["distiller"]["images"] = torch.zeros(3, 1, 16, 16)


def _wrong_momentum(state: dict) -> None:
    import torch

    state["distiller"]["optimizers"]["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(5)


CHECKPOINT_EDITS = {
    "a wrong-shaped image tensor": _wrong_images,
    "a negative iteration": lambda state: state.update(iteration=-3),
    "a momentum buffer shaped unlike its images": _wrong_momentum,
    "an iteration past the run's budget": lambda state: state.update(iteration=10**9),
}
for _name, _edit in CHECKPOINT_EDITS.items():
    case("bounded before allocation", f"`distill --resume` from a checkpoint of the run with {_name}",
         check=mentions("does not fit this run", "not used"), executable=_name in ("a wrong-shaped image tensor",
                                                                               "a negative iteration"))(edited_checkpoint(_edit))

# (end of bounded before allocation)


# --- text from files never reaches a terminal or a page raw ---------------------------------------

CONTROL_NAME = "a\nb\x1b[31m"  # a newline and a terminal escape sequence (red text)


def shown_escaped(folder: Path, done: subprocess.CompletedProcess) -> str | None:
    """No control character but the newline reaches stdout or stderr, and the name is shown with visible escapes."""
    for stream, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        raw = sorted({hex(ord(c)) for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F})
        if raw:
            return f"{stream} carries raw control characters {', '.join(raw)}"
    return None if "a\\nb\\x1b[31m" in done.stdout + done.stderr else "the name is not shown escaped (a\\nb\\x1b[31m)"


@case("text from files is escaped", "an unreadable image named `a\\nb\\x1b[31m.png` in an image folder", check=shown_escaped,
      executable=True)
def _(folder: Path) -> list[str]:
    root = image_folder(folder)
    (root / "a" / f"{CONTROL_NAME}.png").write_bytes(b"not an image")
    return distill_folder(root, folder)


@case("text from files is escaped", "a set path `a\\nb\\x1b[31m` holding a damaged set given to `evaluate`",
      check=shown_escaped, executable=True)
def _(folder: Path) -> list[str]:
    (folder / CONTROL_NAME).mkdir()
    (folder / CONTROL_NAME / "synthetic.safetensors").write_bytes(b"\0" * 64)
    return ["evaluate", str(folder / CONTROL_NAME), "--device", "cpu", "--no-progress"]


@case("text from files is escaped", "a FIFO named `a\\nb\\x1b[31m.png` in an image folder", timeout=120,
      check=shown_escaped, executable=True)
def _(folder: Path) -> list[str]:
    root = image_folder(folder)
    os.mkfifo(root / "b" / f"{CONTROL_NAME}.png")
    return distill_folder(root, folder)


def clean_report(folder: Path, done: subprocess.CompletedProcess) -> str | None:
    """report.md and index.html carry no raw control character, show the name escaped, and every Markdown table row
    has its header's number of cells (a name cannot add a line or a cell)."""
    import re

    for name in ("report.md", "index.html", "tables/acc.md", "tables/acc.tex"):
        text = (folder / "study" / name).read_text()
        raw = sorted({hex(ord(c)) for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F})
        if raw:
            return f"{name} carries raw control characters {', '.join(raw)}"
        if "x1b" not in text:
            return f"{name} does not show the dataset's name"
    cells = 0
    for line in (folder / "study" / "report.md").read_text().splitlines():
        if not line.startswith("|"):
            cells = 0
            continue
        count = len(re.split(r"(?<!\\)\|", line)) - 2
        if cells and count != cells:
            return f"a table row has {count} cells under a header of {cells}: {line[:80]}"
        cells = cells or count
    return None


@case("text from files is escaped", "`report` of a study whose dataset folder is named `a\\nb\\x1b[31m|x`", exit_code=0,
      check=clean_report, executable=True)
def _(folder: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = ["plain", f"{CONTROL_NAME}|x", "third"]  # three datasets: the predictor's held-out tables are written too
    for name in names:
        for label in ("a", "b"):
            (folder / name / label).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name / label / f"{i}.png")
    config = {"datasets": [str(folder / name) for name in names], "ipcs": [1], "eval": {"num_models": 1, "epochs": 1},
              "methods": {"random": {}, "dm": {"settings": {"iterations": 2, "batch_real": 2}}}}
    (folder / "study.yaml").write_text(json.dumps(config))
    medistill_cli(folder, "study", str(folder / "study.yaml"), "--out", str(folder / "study"), "--device", "cpu", "--no-report")
    return ["report", str(folder / "study")]

# (end of text from files)


# --- near-copies under the screen's transformation family -----------------------------------------

def pixel_set(folder: Path, pixels, channels: int = 1) -> list[str]:
    """`export` arguments for a `dc` set whose images are these [0, 1] pixels of BreastMNIST (gray or as RGB)."""
    import torch

    from medistill.data import load_dataset
    from medistill.methods import new_set

    data = breast() if channels == 1 else load_dataset("breastmnist", channels=channels, progress=False)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    labels = torch.arange(len(pixels)) % 2
    synthetic = new_set(data, (pixels - mean) / std, labels, method="dc", ipc=len(pixels) // 2, seed=0)
    return ["export", str(synthetic.save(folder / "set")), "--out", str(folder / "bundle"), "--device", "cpu"]


def real(split: str, *indices: int):
    """BreastMNIST images of one split as [0, 1] pixels (N, 1, 28, 28)."""
    data = breast()
    return data.denormalize(data.split(split).images[list(indices)])


@case("export gate", "two test-split images relabelled `dc`", check=no_file("bundle"), executable=True)
def _(folder: Path) -> list[str]:
    return pixel_set(folder, real("test", 4, 90))


@case("export gate", "training images flipped left-right and shifted by 2 px", check=no_file("bundle"), executable=True)
def _(folder: Path) -> list[str]:
    import torch

    return pixel_set(folder, torch.roll(real("train", 10, 300).flip(-1), 2, dims=-1))


@case("export gate", "validation images inverted (1 - x)", check=no_file("bundle"), executable=True)
def _(folder: Path) -> list[str]:
    return pixel_set(folder, 1 - real("val", 7, 40))


@case("export gate", "one channel of an RGB set holds a real test image, the others noise", check=no_file("bundle"),
      executable=True)
def _(folder: Path) -> list[str]:
    import torch

    pixels = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    pixels[:, 1] = real("test", 20, 21)[:, 0]
    return pixel_set(folder, pixels, channels=3)


@case("export gate", "four real images (train, val, test) tiled at half size into one", check=no_file("bundle"),
      executable=True)
def _(folder: Path) -> list[str]:
    import torch
    import torch.nn.functional as F

    pieces = torch.cat([real("train", 1), real("val", 2), real("test", 3), real("train", 4)])
    small = F.interpolate(pieces, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    tiled = torch.cat([torch.cat([small[0], small[1]], -1), torch.cat([small[2], small[3]], -1)], -2)
    return pixel_set(folder, torch.stack([tiled, tiled.flip(-1)]))

# (end of near-copies under transforms)


# --- running a case -------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def run_case(item: Case, folder: Path) -> dict:
    """Prepare, run and judge one case; returns its row."""
    folder.mkdir(parents=True, exist_ok=True)
    args = item.prepare(folder)
    before = snapshot(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **item.env}

    def limit_files() -> None:
        if item.max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (item.max_file_bytes, item.max_file_bytes))

    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "medistill", *args], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=item.timeout, preexec_fn=limit_files)
    finally:
        item.cleanup(folder)
    seconds = time.perf_counter() - start
    stderr = done.stderr.strip().splitlines()
    problems, lost = judge(item, folder, before, done)
    return {"topic": item.topic, "input": item.name, "exit": done.returncode, "stderr": stderr[-1] if stderr else "",
            "stderr_lines": len(stderr), "nothing_lost": not lost, "ok": not problems, "problems": problems, "seconds": round(seconds, 1)}


def judge(item: Case, folder: Path, before: dict[str, str], done: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """What went wrong with a finished case (empty when it kept its promise), and the files it changed or lost."""
    after = snapshot(folder)
    lost = [name for name, digest in before.items() if after.get(name) != digest]
    problems = []
    if done.returncode != item.exit_code:
        problems.append(f"exit {done.returncode}, expected {item.exit_code}")
    if "Traceback" in done.stderr:
        problems.append("traceback")
    if item.exit_code != 0 and len(done.stderr.strip().splitlines()) != 1:
        problems.append(f"{len(done.stderr.strip().splitlines())} lines on stderr")
    if lost:
        problems.append(f"changed or lost: {', '.join(lost)}")
    try:
        extra = item.check(folder, done)
    except Exception as exc:  # a check that cannot even read the result has found a broken promise
        extra = f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    if extra:
        problems.append(extra)
    return problems, lost


def markdown(rows: list[dict], root: str) -> str:
    lines = ["| promise | hostile input | exit | stderr (one line) | nothing lost | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        message = r["stderr"].replace(root, "TMP").replace("|", "\\|")
        message = message if len(message) <= 150 else message[:147] + "..."
        lines.append(f"| {r['topic']} | {r['input'].replace('|', '/')} | {r['exit']} | {message or '(none)'} | "
                     f"{'yes' if r['nothing_lost'] else 'NO'} | {'ok' if r['ok'] else 'FAIL: ' + '; '.join(r['problems'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    parser.add_argument("--topic", help="only the cases whose topic contains this text")
    parser.add_argument("--skip", action="append", default=[], help="leave out cases whose topic or input contains this text (repeatable)")
    options = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    chosen = [c for c in CASES if (options.topic is None or options.topic in c.topic)
              and not any(text in c.topic or text in c.name for text in options.skip)]
    with tempfile.TemporaryDirectory(prefix="medistill-hostile-") as tmp:
        rows = [run_case(c, Path(tmp) / f"case{i:02d}") for i, c in enumerate(chosen)]
        print(json.dumps(rows, indent=2) if options.json else markdown(rows, tmp))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
