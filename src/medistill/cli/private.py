"""Private-baseline command: `dp-sgd` trains and scores a classifier with DP-SGD (Opacus) on the real data."""

from __future__ import annotations

from pathlib import Path

import typer

from medistill.cli import app
from medistill.cli.options import DataRoot, Device, ImageSize, Progress, Seed, Size, open_dataset
from medistill.dp.dpsgd import RESULT_NAME, DPSGDSettings, run_dpsgd
from medistill.outputs import output_folder

DEFAULTS = DPSGDSettings()


@app.command("dp-sgd")
def dp_sgd(
    dataset: str = typer.Argument(..., help="MedMNIST flag, an .npz with MedMNIST array names, or an image folder."),
    epsilon: float = typer.Option(..., "--epsilon", help="ε of the model's (ε, δ) guarantee (inf: clipping only, no noise)."),
    delta: float = typer.Option(DEFAULTS.delta, "--delta", help="δ of the guarantee."),
    out: Path = typer.Option(..., "--out", help="Folder for result.json."),
    epochs: int = typer.Option(DEFAULTS.epochs, "--epochs", help="Training epochs (the noise is calibrated to them)."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help="Expected Poisson batch size."),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", help="SGD learning rate."),
    clip_norm: float = typer.Option(DEFAULTS.clip_norm, "--clip-norm", help="Per-example gradient clip norm C."),
    model: str = typer.Option(DEFAULTS.model, "--model", help="Architecture (no batch norm)."),
    eval_models: int = typer.Option(2, "--eval-models", help="Networks trained, each with its own seed, and scored."),
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = Seed,
    size: int = Size,
    image_size: int | None = ImageSize,
    progress: bool = Progress,
) -> None:
    # the docstring is the command's --help text, where Typer keeps line breaks: one line per paragraph
    """Train a classifier with DP-SGD on the real training split and score it on the test split (the baseline to a private set)."""  # noqa: E501
    settings = DPSGDSettings(
        epsilon=epsilon, delta=delta, epochs=epochs, batch_size=batch_size, lr=lr, clip_norm=clip_norm, model=model
    )
    output_folder(out, files=(RESULT_NAME,))  # before any data is loaded
    data = open_dataset(dataset, data_root, device, size, image_size, progress=progress)
    r = run_dpsgd(data, settings, num_models=eval_models, seed=seed, out_dir=out)
    p = r["privacy"]
    typer.echo(
        f"{r['dataset']} dp-sgd (ε = {p['epsilon']:.4g}, δ = {p['delta']:g}, σ = {p['noise_multiplier']:.4g}, "
        f"q = {p['sample_rate']:.4g}, "
        f"{p['steps']} steps): test ACC {r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f}, "
        f"AUC {r['test_auc_mean']:.3f} ± {r['test_auc_std']:.3f} ({r['wall_seconds']:.1f} s) -> {out}"
    )
