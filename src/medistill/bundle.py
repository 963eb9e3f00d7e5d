"""Share and receive: a self-describing bundle of a synthetic set, and training on one at the receiving site.

A bundle folder holds `synthetic.safetensors` (the set in normalised space with its metadata),
`synthetic.npz` (MedMNIST-style uint8), `dataset_card.md` and `dataset_card.json` (source dataset
and MD5, method, hyperparameters, learned lr, seed, version, metrics, audit summary, the
recommended training protocol and SHA-256 of every data file) and `grid.png`.

A bundle never holds a real image: sets whose method outputs real images (`random`, `full`) are
refused, and so is a set whose stored privacy audit found near-copies. There is no override.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medistill import __version__
from medistill.artifact import ARTIFACT_NAME, SyntheticSet
from medistill.data import load_dataset
from medistill.data.dataset import DataSource, Dataset, Split
from medistill.errors import ConfigError, DataError
from medistill.methods import get_method
from medistill.models import create_model
from medistill.progress import progress_bar
from medistill.train import TrainProtocol, test_scores, train_model

CARD_FORMAT = "medistill-bundle/1"
MODEL_FORMAT = "medistill-model/1"
NPZ_NAME = "synthetic.npz"
CARD_JSON = "dataset_card.json"
CARD_MD = "dataset_card.md"
GRID_NAME = "grid.png"
DATA_FILES = (ARTIFACT_NAME, NPZ_NAME, GRID_NAME)


def export_bundle(artifact: SyntheticSet | str | Path, out_dir: str | Path) -> Path:
    """Write a shareable bundle of a synthetic set to `out_dir`; refuse sets that hold real images."""
    synthetic = artifact if isinstance(artifact, SyntheticSet) else SyntheticSet.load(artifact)
    spec = get_method(synthetic.method)
    if not spec.synthetic:
        raise ConfigError(
            f"refusing to export a '{synthetic.method}' set: its images are real training images; "
            "only synthetic (distilled) sets can be shared"
        )
    audit = synthetic.extra.get("audit")
    if audit is not None and not audit.get("passed", False):
        raise ConfigError(f"refusing to export: the privacy audit stored in the set says {audit.get('verdict', 'it failed')}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CARD_JSON).is_file())):
        raise ConfigError(f"{out} exists and is not an empty folder or an earlier bundle; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    synthetic.save(out / ARTIFACT_NAME)
    synthetic.to_npz(out / NPZ_NAME)
    synthetic.to_png_grid(out / GRID_NAME)
    card = dataset_card(synthetic, {name: sha256(out / name) for name in DATA_FILES})
    (out / CARD_JSON).write_text(json.dumps(card, indent=2, allow_nan=True) + "\n")
    (out / CARD_MD).write_text(card_markdown(card))
    return out


def dataset_card(synthetic: SyntheticSet, files: dict[str, str]) -> dict[str, Any]:
    """The machine-readable dataset card of a set (JSON-serialisable)."""
    source = synthetic.source
    origin = source.get("source", {})
    protocol = get_method(synthetic.method).default_protocol()
    return {
        "format": CARD_FORMAT,
        "source": {
            "dataset": source.get("name"),
            "kind": origin.get("kind"),
            "md5": origin.get("md5"),
            "file_image_size": origin.get("size"),
            "train_images": source.get("num_train"),
        },
        "task": synthetic.task,
        "label_names": synthetic.label_names,
        "images": len(synthetic),
        "shape": list(synthetic.images.shape[1:]),
        "normalization": {"mean": list(synthetic.mean), "std": list(synthetic.std)},
        "method": synthetic.method,
        "ipc": synthetic.ipc,
        "hyperparameters": synthetic.hyperparameters,
        "learned_lr": synthetic.learned_lr,
        "seed": synthetic.seed,
        "made_with_version": synthetic.version,
        "exported_with_version": __version__,
        "metrics": synthetic.metrics,
        "recommended_training": {**protocol.to_dict(), "lr": synthetic.learned_lr or protocol.lr},
        "audit": synthetic.extra.get("audit"),
        "privacy": synthetic.extra.get("privacy"),  # the (ε, δ) guarantee of a private method, else None
        "files": files,
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The human-readable dataset card."""
    from medistill.accounting import privacy_markdown
    from medistill.privacy.audit import audit_markdown

    src, rec, metrics = card["source"], card["recommended_training"], card["metrics"]
    lines = [
        f"# Synthetic {src['dataset']}: {card['method']}, {card['images']} images",
        "",
        "Synthetic training images distilled from a real dataset; no real image is included.",
        "",
        "| | |",
        "|---|---|",
        f"| source dataset | {src['dataset']} ({src['kind']}, {src['train_images']} training images, MD5 {src['md5']}) |",
        f"| task | {card['task']}: {'; '.join(card['label_names'])} |",
        f"| images | {card['images']} of shape {tuple(card['shape'])} (ipc {card['ipc']}) |",
        f"| method | {card['method']}, seed {card['seed']} |",
        f"| hyperparameters | {json.dumps(card['hyperparameters'])} |",
        f"| learned lr | {card['learned_lr'] if card['learned_lr'] is not None else 'none (train with the protocol lr)'} |",
        f"| normalisation | mean {card['normalization']['mean']}, std {card['normalization']['std']} |",
        f"| version | made with medistill {card['made_with_version']}, exported with {card['exported_with_version']} |",
    ]
    if "test_acc_mean" in metrics:
        protocol = metrics.get("eval_protocol", {})
        lines.append(f"| test score at the source | ACC {metrics['test_acc_mean']:.3f} ± {metrics['test_acc_std']:.3f}, "
                     f"AUC {metrics['test_auc_mean']:.3f} ± {metrics['test_auc_std']:.3f} "
                     f"({metrics.get('eval_models')} x {protocol.get('model')}, {protocol.get('epochs')} epochs) |")
    lines += [
        "",
        "## Use",
        "",
        f"`medistill train BUNDLE --model resnet18 --out model.pt --eval-data your_data.npz` trains with the recommended "
        f"protocol: {rec['epochs']} epochs, SGD lr {rec['lr']:g} (x0.1 half-way), momentum {rec['momentum']}, weight decay "
        f"{rec['weight_decay']}, batch {rec['batch_size']}, augmentation {rec['augment'] or 'none'}. "
        "Images must be normalised with the mean/std above; `medistill train` does that for your evaluation data. "
        f"`{NPZ_NAME}` holds the images as MedMNIST-style uint8 arrays (`train_images`, `train_labels`).",
        "",
    ]
    lines += privacy_markdown(card.get("privacy"))
    if card["audit"] is not None:
        audit = card["audit"]  # the worst-case PNG shows real images and stays at the source: do not point to it
        lines += [audit_markdown({**audit, "privacy": None,  # stated once, above
                                  "neighbours": {k: v for k, v in audit["neighbours"].items() if k != "worst_cases_png"}})]
    else:
        lines += ["## Privacy audit", "", "Not audited: run `medistill audit` on the set before sharing it.", ""]
    lines += ["## Files", "", *(f"- `{name}` sha256 {digest}" for name, digest in card["files"].items())]
    return "\n".join(lines) + "\n"


def load_bundle(bundle_dir: str | Path) -> tuple[SyntheticSet, dict[str, Any]]:
    """Read a bundle's set and card, checking the set's SHA-256 against the card."""
    folder = Path(bundle_dir)
    card_path = folder / CARD_JSON
    if not card_path.is_file():
        raise DataError(f"{folder} is not a medistill bundle (no {CARD_JSON})")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{card_path} is not valid JSON ({exc})") from None
    if card.get("format") != CARD_FORMAT:
        raise DataError(f"{card_path} has format {card.get('format')!r}; this version reads {CARD_FORMAT!r}")
    artifact = folder / ARTIFACT_NAME
    if not artifact.is_file():
        raise DataError(f"the bundle {folder} lacks {ARTIFACT_NAME}")
    if sha256(artifact) != card["files"].get(ARTIFACT_NAME):
        raise DataError(f"{artifact} does not match the SHA-256 in {CARD_JSON}: the bundle was altered or damaged")
    return SyntheticSet.load(artifact), card


def train_on_bundle(
    bundle_dir: str | Path,
    model: str = "convnet",
    out: str | Path = "model.pt",
    eval_data: str | Path | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    data_root: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one `model` on a bundle with its recommended protocol, save it to `out`, and score it on
    the test split of `eval_data` (a MedMNIST flag, an npz with MedMNIST array names or an image folder) if given."""
    synthetic, card = load_bundle(bundle_dir)
    rec = card["recommended_training"]
    protocol = TrainProtocol(epochs=rec["epochs"] if epochs is None else epochs, lr=rec["lr"], momentum=rec["momentum"], weight_decay=rec["weight_decay"],
                             batch_size=rec["batch_size"], augment=rec["augment"], model=model)
    test = receiving_test_split(synthetic, eval_data, data_root, device) if eval_data is not None else None
    data = bundle_dataset(synthetic, card, device, test)
    labels = data.train.labels.float() if data.is_multilabel else data.train.labels
    with progress_bar(protocol.epochs, f"train {model} on the bundle", progress) as bar:
        network = train_model(data.train.images, labels, data, protocol, seed=seed, on_epoch=bar.advance)
    evaluation = None
    if test is not None:
        acc, auc = test_scores(network, data)
        evaluation = {"data": str(eval_data), "split": "test", "images": len(test), "test_acc": acc, "test_auc": auc}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "model": model,
        "in_channels": data.channels,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
        "task": data.task,
        "label_names": list(data.label_names),
        "normalization": card["normalization"],
        "protocol": protocol.to_dict(),
        "seed": seed,
        "bundle": {"source": card["source"], "method": card["method"], "images": card["images"], "files": card["files"]},
        "eval": evaluation,
        "version": __version__,
    }, out)
    return {"model_path": str(out), "model": model, "protocol": protocol.to_dict(), "train_images": len(synthetic), "eval": evaluation}


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network saved by `train_on_bundle`; returns it (in eval mode) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no model file at {path}")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise DataError(f"{path} is not a readable model file ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise DataError(f"{path} is not a model written by `medistill train`")
    network = create_model(saved["model"], saved["in_channels"], saved["num_classes"], saved["image_size"]).to(device)
    network.load_state_dict(saved["state_dict"])
    network.eval()
    return network, {k: v for k, v in saved.items() if k != "state_dict"}


def bundle_dataset(synthetic: SyntheticSet, card: dict[str, Any], device: torch.device | str, test: Split | None = None) -> Dataset:
    """A `Dataset` whose training split is the bundle's set (the receiving site has no validation split)."""
    train = Split(synthetic.images.to(device), synthetic.labels.to(device))
    return Dataset(
        name=f"bundle of {card['source']['dataset']}",
        task=synthetic.task,
        label_names=list(synthetic.label_names),
        train=train,
        val=train,
        test=test if test is not None else train,
        mean=tuple(synthetic.mean),
        std=tuple(synthetic.std),
        source=DataSource(kind="bundle", name=str(card["source"]["dataset"]), path="", md5=card["files"].get(ARTIFACT_NAME)),
    )


def receiving_test_split(synthetic: SyntheticSet, eval_data: str | Path, data_root: str | Path | None,
                          device: torch.device | str) -> Split:
    """The receiving site's test split at the bundle's shape, normalised with the BUNDLE's mean/std."""
    channels, size = int(synthetic.images.shape[1]), int(synthetic.images.shape[-1])
    local = load_dataset(eval_data, root=data_root, channels=channels, image_size=size, device=device, progress=False)
    if local.task != synthetic.task or local.num_classes != synthetic.num_classes:
        raise DataError(
            f"{eval_data} is a {local.task} dataset with {local.num_classes} classes, but the bundle is {synthetic.task} "
            f"with {synthetic.num_classes} ({', '.join(synthetic.label_names)})"
        )
    mean = torch.tensor(synthetic.mean, device=local.device).view(1, -1, 1, 1)
    std = torch.tensor(synthetic.std, device=local.device).view(1, -1, 1, 1)
    pixels = local.denormalize(local.test.images)
    labels = local.test.labels.float() if local.is_multilabel else local.test.labels
    return Split((pixels - mean) / std, labels)


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "CARD_FORMAT", "MODEL_FORMAT", "bundle_dataset", "card_markdown", "dataset_card", "export_bundle", "load_bundle",
    "load_trained_model", "receiving_test_split", "sha256", "train_on_bundle",
]
