"""`audit`: is a synthetic set safe to share? Nearest-neighbour copy screen plus membership inference.

The result is a JSON-serialisable dict and a short Markdown section; `run_audit` writes them
(audit.json, audit.md, worst_cases.png) to a report folder beside the set's folder, never into it:
the artifact is not modified. The report records the SHA-256 of the artifact file it was made for,
so `medistill export --audit` can put it into the dataset card only for that exact file.
`screen_near_copies` is the cheap part on its own: `export` runs it on every set it shares.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medistill import __version__
from medistill.artifact import ARTIFACT_NAME, SyntheticSet, renormalize
from medistill.atomic import atomic_write
from medistill.audit.membership import membership_audit
from medistill.audit.neighbours import (
    DEFAULT_BATCH_ELEMENTS,
    NCC_SMOOTHED_THRESHOLD,
    NCC_THRESHOLD,
    CopyThresholds,
    find_neighbours,
    neighbour_summary,
    save_worst_cases,
)
from medistill.audit.screen import screen_set
from medistill.data.dataset import SPLITS, Dataset
from medistill.dp.accounting import privacy_markdown
from medistill.errors import ConfigError
from medistill.markdown import cell
from medistill.methods.privacy_check import verified_privacy
from medistill.outputs import output_folder
from medistill.train import TrainProtocol
from medistill.train.features import embed, feature_network

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
WORST_PNG = "worst_cases.png"


@dataclass
class AuditConfig:
    """What the audit computes. Thresholds: see `medistill.audit.neighbours` for their meaning."""

    ssim_threshold: float = 0.95
    l2_threshold: float = 0.02  # RMS pixel distance in [0, 1], i.e. L2 / sqrt(C*H*W)
    ncc_threshold: float = NCC_THRESHOLD  # highest |NCC| over the screen's transformation family (audit/screen.py)
    ncc_smoothed_threshold: float = NCC_SMOOTHED_THRESHOLD  # the same, whole frame, both sides blurred
    feature_model: str = "convnet"
    feature_epochs: int = 5  # epochs of the feature network trained on the real training set; 0 = no cosine
    reference_images: int = 200  # held-out test images screened the same way, for scale; 0 = none
    worst: int = 8  # rows of worst_cases.png
    mia: bool = True
    mia_model: str = "convnet"
    mia_epochs: int | None = None  # None = each target's reference protocol
    lira_shadows: int = 8  # 0 = skip the shadow-model attack
    seed: int = 0
    batch_elements: int = DEFAULT_BATCH_ELEMENTS

    def __post_init__(self) -> None:
        self.thresholds()
        for name in ("feature_epochs", "reference_images", "worst", "lira_shadows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 0, got {getattr(self, name)}")
        if self.lira_shadows % 2:
            raise ConfigError(
                f"LiRA shadow models come in pairs on complementary halves: give an even number, got {self.lira_shadows}"
            )
        if self.mia_epochs is not None and self.mia_epochs < 1:
            raise ConfigError(f"membership-inference epochs must be at least 1, got {self.mia_epochs}")
        if self.batch_elements < 1:
            raise ConfigError(f"batch elements must be at least 1, got {self.batch_elements}")

    def thresholds(self) -> CopyThresholds:
        return CopyThresholds(
            ssim=self.ssim_threshold, l2_rms=self.l2_threshold, ncc=self.ncc_threshold, ncc_smoothed=self.ncc_smoothed_threshold
        )


def audit(
    synthetic: SyntheticSet,
    dataset: Dataset,
    config: AuditConfig | None = None,
    *,
    worst_cases_png: str | Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Screen every synthetic image against the whole training set and run membership inference; return the report."""
    config = config or AuditConfig()
    start = time.perf_counter()
    device = dataset.device
    thresholds = config.thresholds()
    synthetic_normalized = renormalize(synthetic, dataset).to(device)
    synthetic_pixels = dataset.denormalize(synthetic_normalized)
    real_pixels = dataset.denormalize(dataset.train.images)

    network = None
    feature_info = None
    real_features = None
    if config.feature_epochs:
        protocol = TrainProtocol(epochs=config.feature_epochs, model=config.feature_model)
        trained = feature_network(dataset, protocol, config.seed, log=log)
        network, real_features = trained.model, trained.train_features
        feature_info = {
            "model": config.feature_model,
            "epochs": config.feature_epochs,
            "test_acc": trained.info["test_acc"],
            "test_auc": trained.info["test_auc"],
        }

    log(f"audit: nearest real neighbours of {len(synthetic)} synthetic images among {len(dataset.train)} training images")
    features = (
        (embed(network, synthetic_normalized), real_features) if network is not None and real_features is not None else None
    )
    neighbours = find_neighbours(synthetic_pixels, real_pixels, features=features, batch_elements=config.batch_elements)
    flags = thresholds.flags(neighbours.ssim, neighbours.l2_rms)
    order = torch.argsort(neighbours.ssim, descending=True)[: config.worst]
    summary = neighbour_summary(neighbours, thresholds)
    summary.update(
        {
            "real_images_searched": len(dataset.train),
            "feature_network": feature_info,
            "flagged": torch.nonzero(flags).flatten().tolist(),
            "worst": order.tolist(),
            "images": _per_image(neighbours, flags, synthetic.labels),
        }
    )
    if worst_cases_png is not None and config.worst:
        save_worst_cases(synthetic_pixels, real_pixels, neighbours, order, worst_cases_png)
        summary["worst_cases_png"] = Path(worst_cases_png).name

    reference = _held_out_reference(dataset, network, real_pixels, real_features, config)
    membership = None
    if config.mia:
        membership = membership_audit(
            synthetic,
            dataset,
            model=config.mia_model,
            epochs=config.mia_epochs,
            shadows=config.lira_shadows,
            seed=config.seed,
            log=log,
        )
    log(f"audit: near-copy screen under transforms against all {sum(len(dataset.split(s)) for s in SPLITS)} real images")
    screen = screen_set(synthetic, dataset, thresholds, batch_elements=config.batch_elements)
    near = summary["near_copies"]
    try:
        privacy, privacy_refused = verified_privacy(synthetic), None
    except ConfigError as exc:
        privacy, privacy_refused = None, str(exc)
    return {
        "kind": "medistill-audit",
        "version": __version__,
        "artifact": {"method": synthetic.method, "ipc": synthetic.ipc, "images": len(synthetic), "seed": synthetic.seed},
        "source": {"name": dataset.name, "md5": dataset.source.md5, "train_images": len(dataset.train)},
        "device": str(device),
        "config": asdict(config),
        "privacy": privacy,  # the set's (ε, δ) record, verified, when a private method made it
        "privacy_refused": privacy_refused,  # why a record the set carries does not hold
        "passed": near == 0 and screen["passed"],
        "verdict": _verdict(near, screen, len(synthetic)),
        "neighbours": summary,
        "near_copy_screen": screen,  # every split, transform-aware (flips, shifts, zooms, scaled copies, inversion)
        "reference_held_out": reference,
        "membership": membership,
        "seconds": time.perf_counter() - start,
    }


def screen_near_copies(
    synthetic: SyntheticSet,
    dataset: Dataset,
    thresholds: CopyThresholds | None = None,
    *,
    batch_elements: int = DEFAULT_BATCH_ELEMENTS,
) -> dict[str, Any]:
    """Every synthetic image against every real image of every split, by SSIM, pixel L2 and the highest |NCC| over the
    screen's transformation family (`medistill.audit.screen`); `passed` when none is a near-copy."""
    return screen_set(synthetic, dataset, thresholds, batch_elements=batch_elements)


def _verdict(near: int, screen: dict[str, Any], images: int) -> str:
    parts = []
    if near:
        parts.append(f"{near} of {images} synthetic images are near-copies of a real training image")
    if not screen["passed"]:
        parts.append(
            f"{screen['near_copies']} of {images} are near-copies of a real image of some split under the screen's "
            f"transforms (highest |NCC| {screen['highest_ncc']:.3f})"
        )
    return "; ".join(parts) if parts else f"no near-copies among {images} synthetic images"


def summarize_audit(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-image table: what is stored in the artifact and the dataset card."""
    neighbours = {k: v for k, v in report["neighbours"].items() if k != "images"}
    return {**report, "neighbours": neighbours}


def default_report_dir(artifact: str | Path) -> Path:
    """Where an audit report goes by default: `<folder>-audit/` beside the set's folder, never inside it."""
    path = Path(artifact)
    folder = path if path.is_dir() else path.parent
    folder = folder.resolve()
    return folder.parent / f"{folder.name}-audit"


def run_audit(
    artifact: str | Path,
    report_dir: str | Path | None = None,
    config: AuditConfig | None = None,
    *,
    data_root: str | Path | None = None,
    device: torch.device | str = "cpu",
    force: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, Any], Path]:
    """Audit a saved set against its source dataset (MD5-checked) and write audit.json, audit.md and
    worst_cases.png to `report_dir` (default: `default_report_dir`). The artifact is only read."""
    path = Path(artifact)
    path = path / ARTIFACT_NAME if path.is_dir() else path
    synthetic = SyntheticSet.load(path)
    out = Path(report_dir) if report_dir is not None else default_report_dir(path)
    if out.resolve() == path.parent.resolve():
        raise ConfigError(
            f"the audit report folder {out} is the set's folder; audit never writes there: give --report a folder of its own"
        )
    # never a bundle, a set's folder or a folder inside one; a report there already only with --force
    out = output_folder(out, option="--report", files=(AUDIT_JSON, AUDIT_MD, WORST_PNG), replace=force)
    dataset = synthetic.load_source(root=data_root, device=device)
    report = audit(synthetic, dataset, config, worst_cases_png=out / WORST_PNG, log=log)
    report["artifact"]["sha256"] = file_sha256(path)
    atomic_write(out / AUDIT_JSON, json.dumps(report, indent=2, allow_nan=True) + "\n")
    atomic_write(out / AUDIT_MD, audit_markdown(report))
    return report, out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def audit_markdown(report: dict[str, Any]) -> str:
    """A short Markdown section for a report (or its summary)."""
    n = report["neighbours"]
    art, src, cfg = report["artifact"], report["source"], report["config"]
    lines = [
        f"## Privacy audit: {cell(art['method'])} (ipc {cell(art['ipc'])}, {art['images']} images) from {cell(src['name'])}",
        "",
        f"**{'PASS' if report['passed'] else 'FAIL'}: {report['verdict']}** (near-copy rule: SSIM >= {cfg['ssim_threshold']} "
        f"or RMS pixel distance <= {cfg['l2_threshold']}, against all {n['real_images_searched']} training images).",
        "",
        "| nearest real image, per synthetic image | min | p5 | median | p95 | max |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("L2 distance (pixels in [0,1])", n["l2"]), ("RMS pixel distance", n["l2_rms"]), ("SSIM (highest)", n["ssim"])]
    if n.get("cosine"):
        f = n["feature_network"]
        rows.append((f"feature cosine ({cell(f['model'])}, {f['epochs']} epochs, test ACC {f['test_acc']:.3f})", n["cosine"]))
    lines += [f"| {name} | {_row(stats)} |" for name, stats in rows]
    screen = report.get("near_copy_screen")
    if screen:
        nearest = screen["nearest"]
        lines += [
            "",
            f"Screen under transforms (flips, shifts, zooms, scaled and tiled copies, inversion, channels) against all "
            f"{screen['real_images_searched']} real images of every split: highest |NCC| {screen['highest_ncc']:.3f} "
            f"({cell(nearest['split'])} split: {cell(nearest['transform'])}), blurred {screen['highest_ncc_smoothed']:.3f}; "
            f"refused at {screen['rule']['ncc_at_least']} and {screen['rule']['ncc_smoothed_at_least']} blurred; "
            f"{screen['near_copies']} near-copies.",
        ]
    ref = report.get("reference_held_out")
    if ref:
        lines += [
            "",
            f"For scale, {ref['images']} held-out real test images (not in the training split) against the same "
            f"training set: median SSIM {ref['ssim']['median']:.3f}, median RMS distance {ref['l2_rms']['median']:.3f}; "
            f"{ref['near_copies']} of them ({ref['near_copy_fraction']:.1%}) meet the near-copy rule.",
        ]
        if ref["near_copies"]:
            lines[-1] += (
                " The dataset's own splits share near-duplicate images, so the membership attacks' non-members "
                "include near-copies of members (which lowers every attack's AUC)."
            )
    if n.get("worst_cases_png"):
        lines += [
            "",
            f"Worst cases: `{n['worst_cases_png']}` (rows by SSIM, highest first; columns: synthetic | "
            "nearest real by SSIM | nearest real by L2). It shows real images: keep it at the source site.",
        ]
    lines += ["", *_membership_markdown(report.get("membership"))]
    if report.get("privacy") is not None:
        lines += ["", *privacy_markdown(report["privacy"])]
    elif report.get("privacy_refused"):
        lines += ["", "## Differential privacy", "", f"No guarantee: {cell(report['privacy_refused'])}."]
    return "\n".join(lines).rstrip() + "\n"


def _membership_markdown(membership: dict[str, Any] | None) -> list[str]:
    if membership is None:
        return ["Membership inference: not run."]
    lines = [
        f"Membership inference ({cell(membership['attack_model'])}; members: {membership['members']} real training images, "
        f"non-members: {membership['non_members']} real test images):",
        "",
        (
            "| target | training images | test ACC | loss attack AUC | TPR@1% FPR | TPR@0.1% FPR "
            "| LiRA AUC | TPR@1% FPR | TPR@0.1% FPR |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for name, target in membership["targets"].items():
        loss = target["loss_attack"]
        lira = target.get("lira")
        cells = [name, str(target["train_images"]), f"{target['test_acc']:.3f}", *_attack_cells(loss)]
        cells += _attack_cells(lira) if lira else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
        notes += loss["notes"]
    lira_info = membership["lira"]
    if "skipped" in lira_info:
        lines += ["", f"LiRA (offline shadow-model attack) skipped: {lira_info['skipped']}."]
    else:
        lines += [
            "",
            f"LiRA: offline, {lira_info['shadows']} shadow models ({lira_info['shadow_protocol']['epochs']} epochs each) "
            "on complementary halves of train+test; shadows imitate real-data training, so the synthetic row is a lower bound.",
        ]
    for note in dict.fromkeys(notes):
        lines.append(f"- {note}.")
    return lines


def _attack_cells(result: dict[str, Any]) -> list[str]:
    tprs = [result["tpr_at_fpr"][k] for k in ("0.01", "0.001")]
    return [f"{result['auc']:.3f}", *("n/m" if t is None else f"{t:.3f}" for t in tprs)]


def _row(stats: dict[str, float]) -> str:
    return " | ".join(f"{stats[k]:.4g}" for k in ("min", "p5", "median", "p95", "max"))


def _per_image(neighbours: Any, flags: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(flags)):
        row = {
            "index": i,
            "label": labels[i].tolist(),
            "near_copy": bool(flags[i]),
            "l2": float(neighbours.l2[i]),
            "l2_rms": float(neighbours.l2_rms[i]),
            "l2_nearest": int(neighbours.l2_index[i]),
            "ssim": float(neighbours.ssim[i]),
            "ssim_nearest": int(neighbours.ssim_index[i]),
        }
        if neighbours.cosine is not None:
            row.update({"cosine": float(neighbours.cosine[i]), "cosine_nearest": int(neighbours.cosine_index[i])})
        rows.append(row)
    return rows


def _held_out_reference(
    dataset: Dataset, network: Any, real_pixels: torch.Tensor, real_features: torch.Tensor | None, config: AuditConfig
) -> dict[str, Any] | None:
    """The same screen for held-out real test images: how close other patients' images come by nature."""
    if not config.reference_images:
        return None
    count = min(config.reference_images, len(dataset.test))
    pick = torch.randperm(len(dataset.test), generator=torch.Generator().manual_seed(config.seed))[:count].to(dataset.device)
    images = dataset.test.images[pick]
    features = (embed(network, images), real_features) if network is not None and real_features is not None else None
    neighbours = find_neighbours(
        dataset.denormalize(images), real_pixels, features=features, batch_elements=config.batch_elements
    )
    return {"images": count, **neighbour_summary(neighbours, config.thresholds())}


__all__ = [
    "AUDIT_JSON",
    "AUDIT_MD",
    "WORST_PNG",
    "AuditConfig",
    "audit",
    "audit_markdown",
    "default_report_dir",
    "file_sha256",
    "run_audit",
    "screen_near_copies",
    "summarize_audit",
]
