"""Share commands: audit a set before sending it, export it as a bundle, train on a bundle where it arrives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from medistill.artifact import SyntheticSet
from medistill.audit.report import AUDIT_JSON, AUDIT_MD, AuditConfig, audit_markdown, run_audit
from medistill.bundle import export_bundle, train_on_bundle
from medistill.cli import app, say
from medistill.cli.options import DataRoot, Device, Force, Progress, Seed
from medistill.dp.accounting import is_guarantee
from medistill.runtime import resolve_device

EXIT_AUDIT_FAILED = 1


def _say(enabled: bool) -> Callable[[str], None]:
    return say if enabled else (lambda message: None)


@app.command()
def audit(
    artifact: Path = typer.Argument(..., help="A synthetic.safetensors file or the folder holding it."),
    report_dir: Path | None = typer.Option(
        None,
        "--report",
        help="Folder for audit.json, audit.md, worst_cases.png "
        "(default: FOLDER-audit/ beside the set's folder; never inside it or a bundle).",
    ),
    data_root: Path | None = DataRoot,
    device: str = Device,
    ssim_threshold: float = typer.Option(
        AuditConfig.ssim_threshold,
        "--ssim-threshold",
        help="Flag a synthetic image whose most similar real image has at least this SSIM.",
    ),
    l2_threshold: float = typer.Option(
        AuditConfig.l2_threshold,
        "--l2-threshold",
        help="Flag a synthetic image within this RMS pixel distance (L2 / sqrt(pixels), pixels in [0,1]) of a real one.",
    ),
    mia: bool = typer.Option(True, "--mia/--no-mia", help="Run membership inference (trains target and shadow networks)."),
    mia_epochs: int | None = typer.Option(
        None, "--mia-epochs", help="Epochs for every attacked and shadow network (default: each one's reference protocol)."
    ),
    lira_shadows: int = typer.Option(
        AuditConfig.lira_shadows, "--lira-shadows", help="Shadow models of the offline LiRA attack (even; 0 skips it)."
    ),
    attack_model: str = typer.Option(
        AuditConfig.mia_model, "--attack-model", help="Architecture of the attacked and shadow networks."
    ),
    feature_epochs: int = typer.Option(
        AuditConfig.feature_epochs, "--feature-epochs", help="Epochs of the feature network for cosine similarity (0 skips it)."
    ),
    seed: int = Seed,
    force: bool = Force,
    progress: bool = Progress,
) -> None:
    """Check a set before sharing: nearest real neighbours (L2, SSIM, features) and membership inference.

    Exits 1 when near-copies of real images are found, so scripts can stop an export. The set is only read.
    """
    config = AuditConfig(
        ssim_threshold=ssim_threshold,
        l2_threshold=l2_threshold,
        mia=mia,
        mia_epochs=mia_epochs,
        lira_shadows=lira_shadows,
        mia_model=attack_model,
        feature_epochs=feature_epochs,
        seed=seed,
    )
    report, folder = run_audit(
        artifact, report_dir, config, data_root=data_root, device=resolve_device(device), force=force, log=_say(progress)
    )
    typer.echo(audit_markdown(report))
    typer.echo(
        f"written: {folder / AUDIT_JSON}, {folder / AUDIT_MD} (bound to this file by its SHA-256: "
        f"`medistill export --audit {folder}` puts it into the dataset card)"
    )
    if not report["passed"]:
        raise typer.Exit(EXIT_AUDIT_FAILED)


@app.command()
def export(
    artifact: Path = typer.Argument(..., help="A synthetic.safetensors file or the folder holding it."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write (new, empty, or an earlier bundle)."),
    audit_report: Path | None = typer.Option(
        None, "--audit", help="A passing `medistill audit` report made for this exact file, to include in the card."
    ),
    data_root: Path | None = DataRoot,
    device: str = Device,
) -> None:
    """Write a shareable bundle: the set (safetensors + MedMNIST-style npz), a dataset card and a PNG grid.

    Refused unless the method outputs synthetic images AND the near-copy screen, run here against the
    source training set, finds no near-copy of a real image.
    """
    folder = export_bundle(artifact, out, data_root=data_root, device=resolve_device(device), audit_report=audit_report)
    synthetic = SyntheticSet.load(folder)
    privacy = synthetic.extra.get("privacy")
    claim = ""
    if privacy is not None:
        claim = (
            f"; (ε = {privacy['epsilon']:.4g}, δ = {privacy['delta']:g})-differential privacy verified by the accountant"
            if is_guarantee(privacy)
            else "; no differential-privacy guarantee (ε = ∞)"
        )
    typer.echo(
        f"bundle of {len(synthetic)} synthetic images ({synthetic.method}) written to {folder}; near-copy screen passed{claim}"
    )
    if audit_report is None and not is_guarantee(privacy):
        typer.echo(
            "note: no membership-inference audit attached; run `medistill audit` and export with --audit to include one", err=True
        )


@app.command()
def train(
    bundle: Path = typer.Argument(..., help="A bundle folder written by `medistill export`."),
    model: str = typer.Option("convnet", "--model", help="Architecture to train (`medistill models` lists them)."),
    out: Path = typer.Option(Path("model.pt"), "--out", help="Where to save the trained model (state_dict + metadata)."),
    eval_data: str | None = typer.Option(
        None,
        "--eval-data",
        help="Your labelled data (npz with MedMNIST array names, MedMNIST flag or image folder); scored on its test split.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the bundle's recommended epochs."),
    ignore_label_names: bool = typer.Option(
        False, "--ignore-label-names", help="Score on --eval-data even though its class names differ from the bundle's."
    ),
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = Seed,
    force: bool = Force,
    progress: bool = Progress,
) -> None:
    """Train a model on a received bundle with its recommended protocol; score it on your own data if given."""
    result = train_on_bundle(
        bundle,
        model,
        out,
        eval_data,
        epochs=epochs,
        seed=seed,
        device=resolve_device(device),
        data_root=data_root,
        progress=progress,
        force=force,
        ignore_label_names=ignore_label_names,
        log=say,
    )
    protocol = result["protocol"]
    typer.echo(
        f"{result['model_path']}: {model} trained on {result['train_images']} synthetic images "
        f"({protocol['epochs']} epochs, lr {protocol['lr']:g}, augmentation {protocol['augment'] or 'none'})"
    )
    evaluation = result["eval"]
    if evaluation is not None:
        typer.echo(
            f"test ACC {evaluation['test_acc']:.4f} AUC {evaluation['test_auc']:.4f} on {evaluation['data']} "
            f"({evaluation['images']} test images)"
        )
