"""Core commands: datasets, distill, evaluate, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from medistill.artifact import SyntheticSet
from medistill.cli import app
from medistill.cli.options import DataRoot, Device, ImageSize, Progress, Seed, Size, open_dataset, parse_settings
from medistill.data import FLAGS, SIZES, dataset_info, is_cached, resolve_data_root
from medistill.demo import DEMO_DATASET, run_demo
from medistill.errors import ConfigError
from medistill.models import list_models
from medistill.pipeline import EvalSettings, load_source_dataset, run_job, score_set
from medistill.runtime import resolve_device
from medistill.train import TrainProtocol

console = Console(width=None if sys.stdout.isatty() else 160)


@app.command()
def datasets(data_root: Optional[Path] = DataRoot) -> None:
    """List the MedMNIST 2D datasets and whether their files are in the data root."""
    root = resolve_data_root(data_root)
    table = Table("flag", "task", "classes", "channels", "train/val/test", "sizes", "license", "cached",
                  title=f"MedMNIST 2D datasets (data root: {root})")
    for flag in FLAGS:
        info = dataset_info(flag)
        n = info["n_samples"]
        cached = ",".join(str(s) for s in SIZES if is_cached(flag, s, root)) or "-"
        table.add_row(flag, info["task"], str(len(info["label"])), str(info["n_channels"]),
                      f"{n['train']}/{n['val']}/{n['test']}", ",".join(map(str, SIZES)), info["license"], cached)
    console.print(table)


@app.command()
def distill(
    dataset: str = typer.Argument(..., help="MedMNIST flag, an .npz with MedMNIST array names, or an image folder."),
    method: str = typer.Option(..., "--method", "-m", help="random, full, or a distillation method (see `medistill methods`)."),
    ipc: int = typer.Option(10, "--ipc", help="Images per class."),
    out: Path = typer.Option(..., "--out", help="Output folder for the artifact, grid.png and result.json."),
    data_root: Optional[Path] = DataRoot,
    device: str = Device,
    seed: int = Seed,
    eval_models: int = typer.Option(5, "--eval-models", help="Networks trained to score the set."),
    eval_epochs: Optional[int] = typer.Option(None, "--eval-epochs", help="Training epochs per network (default: 300, or 1000 with DSA)."),
    eval_model: str = typer.Option("convnet", "--eval-model", help="Architecture used for scoring."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of method settings."),
    settings: list[str] = typer.Option([], "--set", help="Method setting KEY=VALUE (repeatable)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Distillation iterations (default: the method's reference)."),
    lr_img: Optional[float] = typer.Option(None, "--lr-img", help="Learning rate of the synthetic images (default: the method's reference)."),
    init: Optional[str] = typer.Option(None, "--init", help="Initial synthetic images: noise or real (default: the method's reference)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT."),
    size: int = Size,
    image_size: Optional[int] = ImageSize,
    progress: bool = Progress,
) -> None:
    """Distil a dataset (or draw a baseline) and score it; writes the artifact, grid.png and result.json."""
    data = open_dataset(dataset, data_root, device, size, image_size, progress=progress)
    evaluation = EvalSettings(num_models=eval_models, epochs=eval_epochs, model=eval_model)
    overrides = {k: v for k, v in {"iterations": iterations, "lr_img": lr_img, "init": init}.items() if v is not None}
    result = run_job(data, method, ipc, config={**parse_settings(config, settings), **overrides}, evaluation=evaluation, seed=seed,
                     out_dir=out, progress=progress, resume=resume)
    r = result.record
    console.print(
        f"{r['dataset']} {r['method']} ipc={r['ipc']}: test ACC {r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f}, "
        f"AUC {r['test_auc_mean']:.3f} ± {r['test_auc_std']:.3f} ({r['wall_seconds']:.1f} s) -> {out}"
    )


@app.command()
def evaluate(
    artifact: Path = typer.Argument(..., help="A synthetic.safetensors file or the folder holding it."),
    models: str = typer.Option("convnet", "--models", help="Comma-separated architectures (cross-architecture evaluation)."),
    data_root: Optional[Path] = DataRoot,
    device: str = Device,
    seed: int = Seed,
    eval_models: int = typer.Option(5, "--eval-models", help="Networks per architecture."),
    eval_epochs: Optional[int] = typer.Option(None, "--eval-epochs", help="Epochs (default: the method's reference)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="DSA augmentation (default: the method's reference)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores as JSON here."),
    progress: bool = Progress,
) -> None:
    """Score a saved set on its source dataset's test split, with one or more architectures."""
    synthetic = SyntheticSet.load(artifact)
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m.lower() not in list_models()]
    if unknown or not names:
        raise ConfigError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(list_models())}")
    data = load_source_dataset(synthetic, root=data_root, device=resolve_device(device), progress=progress)
    table = Table("model", "ACC", "AUC", "epochs", "augment", title=f"{synthetic.method} ipc={synthetic.ipc} on {data.name} (test split)")
    report = {}
    for name in names:
        protocol = EvalSettings(num_models=eval_models, epochs=eval_epochs, model=name, augment=augment).protocol_for(synthetic.method)
        scores = score_set(synthetic, data, protocol, num_models=eval_models, seed=seed, progress=progress)
        report[name] = {**scores.summary(), "eval_protocol": protocol.to_dict()}
        table.add_row(name, f"{scores.acc_mean:.3f} ± {scores.acc_std:.3f}", f"{scores.auc_mean:.3f} ± {scores.auc_std:.3f}",
                      str(protocol.epochs), protocol.augment or "-")
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


@app.command()
def methods() -> None:
    """List the registered methods."""
    from medistill.methods import get_method, list_methods

    table = Table("name", "output", "evaluated with", "summary", title="methods")
    for name in list_methods():
        spec = get_method(name)
        protocol = spec.default_protocol()
        table.add_row(name, "synthetic" if spec.synthetic else "real images", f"{protocol.epochs} epochs, {protocol.augment or 'no augmentation'}", spec.summary)
    console.print(table)


@app.command()
def demo(
    data_root: Optional[Path] = DataRoot,
    device: str = Device,
    seed: int = Seed,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo's runs are written."),
    progress: bool = Progress,
) -> None:
    """The main job on its default: BreastMNIST, random vs the best available distillation method at IPC 10, vs full."""
    data = open_dataset(DEMO_DATASET, data_root, device, progress=progress)
    rows = run_demo(data, out=out, seed=seed, progress=progress)
    table = Table("method", "images", "ACC", "AUC", "evaluation", "seconds",
                  title=f"{DEMO_DATASET}, IPC 10 (test split; mean ± std over evaluation networks)")
    for r in rows:
        p = r["eval_protocol"]
        table.add_row(r["method"], str(r["num_images"]), f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f}",
                      f"{r['test_auc_mean']:.3f} ± {r['test_auc_std']:.3f}",
                      f"{r['eval_models']} x {p['model']}, {p['epochs']} ep{', DSA' if p['augment'] else ''}", f"{r['wall_seconds']:.0f}")
    console.print(table)
    console.print(f"runs written to {out}")
