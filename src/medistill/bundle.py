"""Share and receive: a self-describing bundle of a synthetic set, and training on one at the receiving site.

A bundle folder holds `synthetic.safetensors` (the set in normalised space with its metadata),
`synthetic.npz` (MedMNIST-style uint8), `dataset_card.md` and `dataset_card.json` (source dataset
and MD5, method, hyperparameters, learned lr, seed, version, metrics, near-copy screen, audit
summary, the recommended training protocol and SHA-256 of every data file) and `grid.png`.

A bundle never holds a real image. The export gate is the list `EXPORT_RULES`; a set leaves only
when every rule passes. The rules do not trust the set's metadata to say what it is: besides the
method's kind, `export` runs the near-copy screen itself against the source training set (loaded
and MD5-checked like for `evaluate`), so a set whose header was edited, or a "distilled" set that
never moved away from its real initialisation, is refused. There is no override. A privacy
audit report is put into the card only when it was made for this exact file (its SHA-256).

A privacy record is verified, not trusted: only a registered private method's set may carry one,
and its ε is recomputed by the accountant from the recorded mechanism and the set's own settings
(`accounting.verify_record`). A set whose verified record states a finite ε leaves with nothing
else computed from its private training images: no training-set size, no MD5 of a local source
file, no timings, no near-copy or membership statistics (the screen still runs and must pass).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medistill import __version__
from medistill.artifact import ARTIFACT_NAME, BUNDLE_MARKER, SyntheticSet
from medistill.atomic import atomic_path, atomic_write
from medistill.audit.neighbours import CopyThresholds
from medistill.audit.report import file_sha256 as sha256
from medistill.audit.report import screen_near_copies
from medistill.audit.screen import refusal
from medistill.data import load_dataset
from medistill.data.dataset import Dataset, DataSource, Split
from medistill.dp.accounting import is_guarantee
from medistill.errors import ConfigError, DataError
from medistill.markdown import cell
from medistill.methods import get_method
from medistill.methods.privacy_check import verified_privacy
from medistill.models import create_model
from medistill.outputs import BUNDLE, output_file, output_folder, staged_folder
from medistill.progress import progress_bar
from medistill.train import TrainProtocol, scores_on, train_model

CARD_FORMAT = "medistill-bundle/1"
MODEL_FORMAT = "medistill-model/1"
NPZ_NAME = "synthetic.npz"
CARD_JSON = BUNDLE_MARKER
CARD_MD = "dataset_card.md"
GRID_NAME = "grid.png"
DATA_FILES = (ARTIFACT_NAME, NPZ_NAME, GRID_NAME)


@dataclass
class ExportEvidence:
    """What the export rules look at: the set, and (computed on first use) its near-copy screen."""

    synthetic: SyntheticSet
    data_root: str | Path | None = None
    device: torch.device | str = "cpu"
    thresholds: CopyThresholds = field(default_factory=CopyThresholds)

    @cached_property
    def privacy(self) -> dict[str, Any] | None:
        """The set's privacy record, verified against its method and settings (ConfigError when it does not hold)."""
        return verified_privacy(self.synthetic)

    @cached_property
    def screen(self) -> dict[str, Any]:
        """The near-copy screen of the set against the training split of the source it names (MD5-checked)."""
        dataset = self.synthetic.load_source(root=self.data_root, device=self.device, progress=False)
        return screen_near_copies(self.synthetic, dataset, self.thresholds)


ExportRule = Callable[[ExportEvidence], "str | None"]  # the reason to refuse, or None
EXPORT_RULES: list[ExportRule] = []


def export_rule(rule: ExportRule) -> ExportRule:
    """Add a rule every exported set must pass (rules run in the order they were added)."""
    EXPORT_RULES.append(rule)
    return rule


@export_rule
def method_outputs_synthetic_images(evidence: ExportEvidence) -> str | None:
    method = evidence.synthetic.method
    if not get_method(method).synthetic:
        return (
            f"refusing to export a '{method}' set: its images are real training images; "
            "only synthetic (distilled) sets can be shared"
        )
    return None


@export_rule
def privacy_record_holds(evidence: ExportEvidence) -> str | None:
    try:
        _ = evidence.privacy  # reading the property runs the privacy-record check
    except ConfigError as exc:
        return f"refusing to export: {exc}"
    return None


@export_rule
def no_near_copies_of_real_images(evidence: ExportEvidence) -> str | None:
    screen = evidence.screen  # every split; flips, shifts, zooms, scaled and tiled copies, inversion, channels
    return None if screen["passed"] else refusal(screen)


def check_export(evidence: ExportEvidence) -> None:
    """Raise a ConfigError with the first rule's reason to refuse the set."""
    for rule in EXPORT_RULES:
        reason = rule(evidence)
        if reason is not None:
            raise ConfigError(reason)


def bound_audit(report_path: str | Path, artifact_sha256: str) -> dict[str, Any]:
    """A passing audit report (audit.json, or its folder) made for the artifact with this SHA-256, summarised."""
    from medistill.audit.report import AUDIT_JSON, summarize_audit

    path = Path(report_path)
    path = path / AUDIT_JSON if path.is_dir() else path
    try:
        report = json.loads(path.read_text())
        made_for, passed = report["artifact"]["sha256"], report["passed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a readable medistill audit report ({type(exc).__name__})") from None
    if made_for != artifact_sha256:
        raise ConfigError(
            f"the audit report {path} was made for another file (SHA-256 {str(made_for)[:12]}..., this set "
            f"{artifact_sha256[:12]}...); audit this exact file"
        )
    if passed is not True:
        raise ConfigError(f"refusing to export: the audit report {path} did not pass")
    summary = summarize_audit(report)
    summary["neighbours"] = {k: v for k, v in summary["neighbours"].items() if k != "worst_cases_png"}
    return summary


def export_bundle(
    artifact: SyntheticSet | str | Path,
    out_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    device: torch.device | str = "cpu",
    audit_report: str | Path | None = None,
) -> Path:
    """Write a shareable bundle of a synthetic set to `out_dir` once every export rule passes.

    `out_dir` is checked before anything is read (`check_bundle_folder`), every metadata field the card uses
    before any byte is written (`check_card_metadata`); the bundle is assembled in a temporary folder beside
    `out_dir` and renamed into place, so a failure leaves no half-written bundle and an earlier one intact."""
    out = check_bundle_folder(out_dir)
    if isinstance(artifact, SyntheticSet):
        synthetic = artifact
        if audit_report is not None:
            raise ConfigError("an audit report can only be bound to a saved artifact file")
        audit = None
    else:
        path = Path(artifact)
        path = path / ARTIFACT_NAME if path.is_dir() else path
        synthetic = SyntheticSet.load(path)
        audit = bound_audit(audit_report, sha256(path)) if audit_report is not None else None
    refuse_malformed_metadata(synthetic)
    evidence = ExportEvidence(synthetic, data_root=data_root, device=device)
    check_export(evidence)
    private = is_guarantee(evidence.privacy)
    if private and audit is not None:
        raise ConfigError(
            "refusing to attach an audit report to a differentially private set: its statistics are computed "
            "from the private training images, which the guarantee does not cover; keep the report at the source"
        )
    shared = shareable(synthetic, evidence.privacy)
    screen = {"passed": True, "statistics": "withheld: computed from the private training images"} if private else evidence.screen
    check_card_metadata(shared, screen=screen, audit=audit)
    with staged_folder(out) as staging:
        shared.save(staging / ARTIFACT_NAME)
        shared.to_npz(staging / NPZ_NAME)
        shared.to_png_grid(staging / GRID_NAME)
        card = dataset_card(shared, {name: sha256(staging / name) for name in DATA_FILES}, screen=screen, audit=audit)
        atomic_write(staging / CARD_MD, card_markdown(card))
        atomic_write(staging / CARD_JSON, json.dumps(card, indent=2, allow_nan=True) + "\n")
    return Path(out_dir)


BUNDLE_FILES = (*DATA_FILES, CARD_MD, CARD_JSON)


def check_bundle_folder(out_dir: str | Path) -> Path:
    """The real path of a bundle's destination (`outputs.output_folder`): a new or empty folder, or an earlier bundle
    holding nothing but a bundle's files (replaced whole); never a set's folder or a folder inside a bundle."""
    return output_folder(
        out_dir,
        files=BUNDLE_FILES,
        replace=(Path(out_dir) / CARD_JSON).is_file(),
        empty=True,
        makes=BUNDLE,
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refuse_malformed_metadata(synthetic: SyntheticSet) -> None:
    """A one-line DataError for a wrong-typed metadata field the card reads (before the screen runs, before any write)."""
    origin = synthetic.source.get("source")
    if origin is not None and not isinstance(origin, dict):
        raise DataError(f"the set's 'source.source' must be a mapping, got {json.dumps(origin, default=str)[:60]}")
    metrics = synthetic.metrics
    if "test_acc_mean" in metrics:
        for key in ("test_acc_mean", "test_acc_std", "test_auc_mean", "test_auc_std"):
            if not _number(metrics.get(key)):
                raise DataError(
                    f"the set's metric '{key}' must be a number, got {json.dumps(metrics.get(key), default=str)[:60]}"
                )
    if not isinstance(metrics.get("eval_protocol", {}), dict):
        raise DataError("the set's metric 'eval_protocol' must be a mapping")


def check_card_metadata(shared: SyntheticSet, *, screen: dict[str, Any] | None, audit: dict[str, Any] | None) -> None:
    """Build and render the dataset card once before any byte of the bundle is written: a field of the wrong type in
    the set's metadata, its privacy record or an attached audit summary is a one-line DataError, not a traceback."""
    refuse_malformed_metadata(shared)
    privacy = shared.extra.get("privacy")
    if isinstance(privacy, dict) and is_guarantee(privacy):
        missing = [key for key in ("mechanism", "sampling") if not isinstance(privacy.get(key), str)]
        if missing:
            raise DataError(
                f"the set's privacy record has no valid '{missing[0]}' (a string); it is not a record medistill wrote"
            )
    placeholder = dict.fromkeys(DATA_FILES, "0" * 64)
    try:
        card = dataset_card(shared, placeholder, screen=screen, audit=audit)
        card_markdown(card)
        json.dumps(card, allow_nan=True)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise DataError(
            f"the dataset card cannot be made from this set's metadata ({type(exc).__name__}: {reason}); nothing was written"
        ) from None


def shareable(synthetic: SyntheticSet, privacy: dict[str, Any] | None = None) -> SyntheticSet:
    """The set as it leaves: no local paths of the source site, no unbound audit claim in its metadata, the privacy
    record as verified; for a differentially private set nothing else computed from its private training images."""
    source = dict(synthetic.source)
    origin = dict(source.get("source") or {})
    if origin.get("path"):
        origin["path"] = Path(str(origin["path"])).name
    extra = {k: v for k, v in synthetic.extra.items() if k not in ("audit", "privacy")}
    if privacy is not None:
        extra["privacy"] = privacy
    metrics = synthetic.metrics
    if is_guarantee(privacy):
        source.pop("num_train", None)
        if origin.get("kind") != "medmnist":  # the MD5 of an official MedMNIST file is public; a local file's identifies it
            origin.pop("md5", None)
        metrics = without_timings(metrics)
    source["source"] = origin
    return replace(synthetic, source=source, extra=extra, metrics=metrics)


def without_timings(value: Any) -> Any:
    """`value` with every field that measures time removed (at any depth): timings depend on the private data's size."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in str(k)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def dataset_card(
    synthetic: SyntheticSet, files: dict[str, str], *, screen: dict[str, Any] | None = None, audit: dict[str, Any] | None = None
) -> dict[str, Any]:
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
        "near_copy_screen": screen,
        "audit": audit,
        "privacy": synthetic.extra.get("privacy"),  # the verified (ε, δ) record of a private method, else None
        "files": files,
    }


def withheld(value: Any) -> str:
    """A card value, or 'withheld' where a differentially private set leaves it out."""
    return "withheld" if value is None else cell(value)


def card_markdown(card: dict[str, Any]) -> str:
    """The human-readable dataset card; every value from the set's metadata is escaped (`markdown.cell`)."""
    from medistill.audit.report import audit_markdown
    from medistill.dp.accounting import privacy_markdown

    src, rec, metrics = card["source"], card["recommended_training"], card["metrics"]
    learned = card["learned_lr"] if card["learned_lr"] is not None else "none (train with the protocol lr)"
    lines = [
        f"# Synthetic {cell(src['dataset'])}: {cell(card['method'])}, {card['images']} images",
        "",
        "Synthetic training images distilled from a real dataset; no real image is included.",
        "",
        "| | |",
        "|---|---|",
        f"| source dataset | {cell(src['dataset'])} ({cell(src['kind'])}, {withheld(src['train_images'])} training images, "
        f"MD5 {withheld(src['md5'])}) |",
        f"| task | {cell(card['task'])}: {cell('; '.join(map(str, card['label_names'])))} |",
        f"| images | {card['images']} of shape {tuple(card['shape'])} (ipc {cell(card['ipc'])}) |",
        f"| method | {cell(card['method'])}, seed {cell(card['seed'])} |",
        f"| hyperparameters | {cell(json.dumps(card['hyperparameters'], default=str))} |",
        f"| learned lr | {cell(learned)} |",
        f"| normalisation | mean {cell(card['normalization']['mean'])}, std {cell(card['normalization']['std'])} |",
        (
            f"| version | made with medistill {cell(card['made_with_version'])}, "
            f"exported with {cell(card['exported_with_version'])} |"
        ),
    ]
    if "test_acc_mean" in metrics:
        protocol = metrics.get("eval_protocol", {})
        lines.append(
            f"| test score at the source | ACC {metrics['test_acc_mean']:.3f} ± {metrics['test_acc_std']:.3f}, "
            f"AUC {metrics['test_auc_mean']:.3f} ± {metrics['test_auc_std']:.3f} "
            f"({cell(metrics.get('eval_models'))} x {cell(protocol.get('model'))}, {cell(protocol.get('epochs'))} epochs) |"
        )
    screen = card.get("near_copy_screen")
    if screen is not None and "statistics" in screen:
        lines.append(
            "| near-copy screen at export | passed; its statistics are withheld (computed from the private training images) |"
        )
    elif screen is not None:
        lines.append(
            f"| near-copy screen at export | passed: none of {screen['images']} images within the near-copy rule of any of "
            f"{screen['real_images_searched']} real images of every split (highest SSIM {screen['highest_ssim']:.3f}, lowest RMS "
            f"distance {screen['lowest_rms_distance']:.4f}, highest \\|NCC\\| under flips, shifts, zooms and scaled copies "
            f"{screen['highest_ncc']:.3f}) |"
        )
    lines += [
        "",
        "## Use",
        "",
        f"`medistill train BUNDLE --model resnet18 --out model.pt --eval-data your_data.npz` trains with the recommended "
        f"protocol: {rec['epochs']} epochs, SGD lr {rec['lr']:g} (x0.1 half-way), momentum {rec['momentum']}, weight decay "
        f"{rec['weight_decay']}, batch {rec['batch_size']}, augmentation {cell(rec['augment'] or 'none')}. "
        "Images must be normalised with the mean/std above; `medistill train` does that for your evaluation data. "
        f"`{NPZ_NAME}` holds the images as MedMNIST-style uint8 arrays (`train_images`, `train_labels`).",
        "",
    ]
    lines += privacy_markdown(card.get("privacy"))
    if is_guarantee(card.get("privacy")):
        lines += ["Nothing else in this bundle was computed from the private training images.", ""]
    if card["audit"] is not None:
        audit = card["audit"]  # the worst-case PNG shows real images and stays at the source: do not point to it
        lines += [
            audit_markdown(
                {
                    **audit,
                    "privacy": None,  # stated once, above
                    "neighbours": {k: v for k, v in audit["neighbours"].items() if k != "worst_cases_png"},
                }
            )
        ]
    else:
        lines += [
            "## Privacy audit",
            "",
            "Membership inference not attached: run `medistill audit` on the set and export it "
            "with `--audit REPORT` to include the report made for this file.",
            "",
        ]
    lines += ["## Files", "", *(f"- `{name}` sha256 {digest}" for name, digest in card["files"].items())]
    return "\n".join(lines) + "\n"


def load_bundle(bundle_dir: str | Path) -> tuple[SyntheticSet, dict[str, Any]]:
    """Read a bundle's set and card, checking the card's fields and the set's SHA-256 against the card."""
    folder = Path(bundle_dir)
    card_path = folder / CARD_JSON
    if not card_path.is_file():
        raise DataError(f"{folder} is not a medistill bundle (no {CARD_JSON})")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{card_path} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise DataError(f"{card_path} has format {found!r}; this version reads {CARD_FORMAT!r}")
    check_card(card, card_path)
    artifact = folder / ARTIFACT_NAME
    if not artifact.is_file():
        raise DataError(f"the bundle {folder} lacks {ARTIFACT_NAME}")
    if sha256(artifact) != card["files"].get(ARTIFACT_NAME):
        raise DataError(f"{artifact} does not match the SHA-256 in {CARD_JSON}: the bundle was altered or damaged")
    return SyntheticSet.load(artifact), card


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_positive(value: Any) -> bool:
    return _finite(value) and value > 0


def _finite_non_negative(value: Any) -> bool:
    return _finite(value) and value >= 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# What `train` reads from a card, with the check each value must pass.
CARD_FIELDS: dict[tuple[str, ...], tuple[Callable[[Any], bool], str]] = {
    ("files",): (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "a mapping of file name to SHA-256",
    ),
    ("source",): (lambda v: isinstance(v, dict), "a mapping"),
    ("source", "dataset"): (lambda v: isinstance(v, str), "a string"),
    ("method",): (lambda v: isinstance(v, str), "a string"),
    ("images",): (_count, "a whole number >= 1"),
    ("normalization", "mean"): (lambda v: isinstance(v, list) and all(_finite(x) for x in v), "a list of finite numbers"),
    ("normalization", "std"): (
        lambda v: isinstance(v, list) and all(_finite_positive(x) for x in v),
        "a list of finite numbers > 0",
    ),
    ("recommended_training", "epochs"): (_count, "a whole number >= 1"),
    ("recommended_training", "lr"): (_finite_positive, "a finite number > 0"),
    ("recommended_training", "momentum"): (_finite_non_negative, "a finite number >= 0"),
    ("recommended_training", "weight_decay"): (_finite_non_negative, "a finite number >= 0"),
    ("recommended_training", "batch_size"): (_count, "a whole number >= 1"),
    ("recommended_training", "augment"): (lambda v: v is None or isinstance(v, str), "null or a DSA strategy string"),
}


def check_card(card: dict[str, Any], path: Path) -> None:
    """One-line DataError for the first missing or wrong-typed field `train` relies on."""
    for keys, (valid, expected) in CARD_FIELDS.items():
        value: Any = card
        for key in keys:
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        name = ".".join(keys)
        if value is _MISSING:
            raise DataError(f"{path} lacks the field '{name}'")
        if not valid(value):
            raise DataError(f"{path}: '{name}' must be {expected}, got {json.dumps(value, default=str)[:60]}")


_MISSING = object()


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
    force: bool = False,
    ignore_label_names: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Train one `model` on a bundle with its recommended protocol, save it to `out`, and score it on
    the test split of `eval_data` (a MedMNIST flag, an npz with MedMNIST array names or an image folder) if given.

    `eval_data` whose class names differ from the bundle's is refused unless `ignore_label_names`."""
    out = output_file(out, force=force, what="model file")  # never into a bundle or a set's folder
    synthetic, card = load_bundle(bundle_dir)
    rec = card["recommended_training"]
    protocol = TrainProtocol(
        epochs=rec["epochs"] if epochs is None else epochs,
        lr=rec["lr"],
        momentum=rec["momentum"],
        weight_decay=rec["weight_decay"],
        batch_size=rec["batch_size"],
        augment=rec["augment"],
        model=model,
    )
    test = (
        receiving_test_split(synthetic, eval_data, data_root, device, ignore_label_names=ignore_label_names, log=log)
        if eval_data is not None
        else None
    )
    data = bundle_dataset(synthetic, card, device, test)
    labels = data.train.labels.float() if data.is_multilabel else data.train.labels
    with progress_bar(protocol.epochs, f"train {model} on the bundle", progress) as bar:
        network = train_model(data.train.images, labels, data, protocol, seed=seed, on_epoch=bar.advance)
    evaluation = None
    if test is not None:
        acc, auc = scores_on(network, data)
        evaluation = {"data": str(eval_data), "split": "test", "images": len(test), "test_acc": acc, "test_auc": auc}
    payload = {
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
    }
    with atomic_path(out) as partial:
        torch.save(payload, partial)
    return {
        "model_path": str(out),
        "model": model,
        "protocol": protocol.to_dict(),
        "train_images": len(synthetic),
        "eval": evaluation,
    }


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


def bundle_dataset(
    synthetic: SyntheticSet, card: dict[str, Any], device: torch.device | str, test: Split | None = None
) -> Dataset:
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


def receiving_test_split(
    synthetic: SyntheticSet,
    eval_data: str | Path,
    data_root: str | Path | None,
    device: torch.device | str,
    *,
    ignore_label_names: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Split:
    """The receiving site's test split at the bundle's shape, normalised with the BUNDLE's mean/std."""
    channels, size = int(synthetic.images.shape[1]), int(synthetic.images.shape[-1])
    local = load_dataset(eval_data, root=data_root, channels=channels, image_size=size, device=device, progress=False)
    if local.task != synthetic.task or local.num_classes != synthetic.num_classes:
        raise DataError(
            f"{eval_data} is a {local.task} dataset with {local.num_classes} classes, but the bundle is {synthetic.task} "
            f"with {synthetic.num_classes} ({', '.join(synthetic.label_names)})"
        )
    check_label_names(synthetic.label_names, local.label_names, eval_data, ignore=ignore_label_names, log=log)
    mean = torch.tensor(synthetic.mean, device=local.device).view(1, -1, 1, 1)
    std = torch.tensor(synthetic.std, device=local.device).view(1, -1, 1, 1)
    pixels = local.denormalize(local.test.images)
    labels = local.test.labels.float() if local.is_multilabel else local.test.labels
    return Split((pixels - mean) / std, labels)


def check_label_names(
    bundle_names: list[str], local_names: list[str], eval_data: str | Path, *, ignore: bool, log: Callable[[str], None]
) -> None:
    """Refuse scoring on data whose classes are named differently from the bundle's (the labels would mean other things).

    Data without class names (labels 0, 1, ... only) cannot be checked: that is said, not refused.
    """

    def canonical(names: list[str]) -> list[str]:
        return [" ".join(str(name).lower().split()) for name in names]

    if canonical(bundle_names) == canonical(local_names):
        return
    pairs = ", ".join(f"{i}={name!r}" for i, name in enumerate(bundle_names))
    if list(local_names) == [str(i) for i in range(len(local_names))]:
        log(
            f"warning: {eval_data} does not name its classes, so medistill cannot check that its labels mean what the "
            f"bundle's do ({pairs}); the score is only meaningful if they do"
        )
        return
    theirs = ", ".join(f"{i}={name!r}" for i, name in enumerate(local_names))
    if not ignore:
        raise ConfigError(
            f"{eval_data} names its classes {theirs}, but the bundle's are {pairs}: a score would compare "
            f"labels that mean different things (pass --ignore-label-names if they are the same classes under other names)"
        )
    log(f"warning: scoring on {eval_data} whose class names ({theirs}) differ from the bundle's ({pairs}), as asked")


__all__ = [
    "CARD_FORMAT",
    "MODEL_FORMAT",
    "bundle_dataset",
    "card_markdown",
    "check_label_names",
    "dataset_card",
    "export_bundle",
    "load_bundle",
    "load_trained_model",
    "receiving_test_split",
    "sha256",
    "train_on_bundle",
]
