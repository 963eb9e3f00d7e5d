"""Core commands: datasets, distill, evaluate, methods, models, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medistill.artifact import SyntheticSet
from medistill.atomic import atomic_write
from medistill.cli import app, on_interrupt, rerun_command, tell
from medistill.cli.options import (
    BF16,
    Compile,
    DataRoot,
    Delta,
    Device,
    Epsilon,
    Force,
    ImageSize,
    Init,
    Ipc,
    Iterations,
    LrImg,
    MethodConfig,
    MethodSet,
    NoiseMultiplier,
    Progress,
    PublicClassCounts,
    Seed,
    Size,
    announce_precision,
    method_settings,
    open_dataset,
    pinned_bf16,
    speed_settings,
)
from medistill.data import FLAGS, SIZES, dataset_info, is_cached, resolve_data_root
from medistill.demo import DEMO_DATASET, DEMO_IPC, demo_networks, run_demo
from medistill.errors import ConfigError
from medistill.methods import get_method
from medistill.models import list_models, model_summary
from medistill.outputs import output_file, output_folder
from medistill.pipeline import CHECKPOINTS_NAME, EvalSettings, check_job_folder, has_checkpoint, run_job, score_set
from medistill.runtime import choose_bf16, resolve_device
from medistill.scoretext import mean_std, record_score

# plain text: `main` guards stdout (markdown.PrintableStream), which would show colour codes as escapes
console = Console(width=None if sys.stdout.isatty() else 160, color_system=None)


@app.command()
def datasets(data_root: Path | None = DataRoot) -> None:
    """List the MedMNIST 2D datasets and whether their files are in the data root."""
    root = resolve_data_root(data_root)
    table = Table(
        "flag",
        "task",
        "classes",
        "channels",
        "train/val/test",
        "sizes",
        "license",
        "cached",
        title=f"MedMNIST 2D datasets (data root: {root})",
    )
    for flag in FLAGS:
        info = dataset_info(flag)
        n = info["n_samples"]
        cached = ",".join(str(s) for s in SIZES if is_cached(flag, s, root)) or "-"
        table.add_row(
            flag,
            info["task"],
            str(len(info["label"])),
            str(info["n_channels"]),
            f"{n['train']}/{n['val']}/{n['test']}",
            ",".join(map(str, SIZES)),
            info["license"],
            cached,
        )
    console.print(table)


@app.command()
def distill(
    dataset: str = typer.Argument(..., help="MedMNIST flag, an .npz with MedMNIST array names, or an image folder."),
    method: str = typer.Option(..., "--method", "-m", help="random, full, or a distillation method (see `medistill methods`)."),
    ipc: int = Ipc,
    out: Path = typer.Option(..., "--out", help="Output folder for the artifact, grid.png and result.json."),
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = Seed,
    eval_models: int = typer.Option(5, "--eval-models", help="Networks trained to score the set."),
    eval_epochs: int | None = typer.Option(
        None, "--eval-epochs", help="Training epochs per network (default: 300, or 1000 with DSA)."
    ),
    eval_model: str = typer.Option("convnet", "--eval-model", help="Architecture used for scoring."),
    config: Path | None = MethodConfig,
    settings: list[str] = MethodSet,
    iterations: int | None = Iterations,
    lr_img: float | None = LrImg,
    init: str | None = Init,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT."),
    force: bool = Force,
    epsilon: float | None = Epsilon,
    delta: float | None = Delta,
    noise_multiplier: float | None = NoiseMultiplier,
    public_class_counts: bool = PublicClassCounts,
    max_expert_minutes: float | None = typer.Option(
        None,
        "--max-expert-minutes",
        help="MTT: refuse (exit 2, nothing trained) when the expert buffer still to train is estimated "
        "to take longer than this; the estimate is printed before any expert is trained either way.",
    ),
    size: int = Size,
    image_size: int | None = ImageSize,
    bf16: bool | None = BF16,
    compile: bool = Compile,
    progress: bool = Progress,
) -> None:
    """Distil a dataset (or draw a baseline) and score it; writes the artifact, grid.png and result.json."""
    on_interrupt(lambda: _distill_interrupted(out))
    check_job_folder(out, resume=resume, force=force)  # before any data is loaded: a refusal costs nothing
    data = open_dataset(dataset, data_root, device, size, image_size, progress=progress)
    given = method_settings(
        config,
        settings,
        iterations=iterations,
        lr_img=lr_img,
        init=init,
        epsilon=epsilon,
        delta=delta,
        noise_multiplier=noise_multiplier,
        public_class_counts=public_class_counts,
        max_expert_minutes=max_expert_minutes,
    )
    spec = get_method(method)
    use_bf16, why = choose_bf16(bf16, pinned_bf16(given), data.device, [eval_model, *spec.networks(given)])
    evaluation = EvalSettings(num_models=eval_models, epochs=eval_epochs, model=eval_model, bf16=use_bf16, compile=compile)
    announce_precision(use_bf16, why)  # after the settings are checked: an unknown model gets its error line alone
    given.update(speed_settings(spec, use_bf16, compile, given))
    result = run_job(
        data,
        method,
        ipc,
        config=given,
        evaluation=evaluation,
        seed=seed,
        out_dir=out,
        progress=progress,
        resume=resume,
        force=force,
    )
    r = result.record
    console.print(
        f"{r['dataset']} {r['method']} {'full set' if r['ipc'] is None else 'ipc=' + str(r['ipc'])}: "
        f"test ACC {record_score(r, 'acc')}, AUC {record_score(r, 'auc')} ({r['wall_seconds']:.1f} s) -> {out}"
    )


def _distill_interrupted(out: Path) -> str:
    if has_checkpoint(out):
        return (
            f"Kept: the distillation's last checkpoint in {out / CHECKPOINTS_NAME}. "
            f"Continue from it with: {rerun_command('--resume')}"
        )
    return f"Nothing was kept: no checkpoint had been written to {out} yet. Start again with: {rerun_command()}"


@app.command()
def evaluate(
    artifact: Path = typer.Argument(..., help="A synthetic.safetensors file or the folder holding it."),
    models: str = typer.Option("convnet", "--models", help="Comma-separated architectures (cross-architecture evaluation)."),
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = Seed,
    eval_models: int = typer.Option(5, "--eval-models", help="Networks per architecture."),
    eval_epochs: int | None = typer.Option(None, "--eval-epochs", help="Epochs (default: the method's reference)."),
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment", help="DSA augmentation (default: the method's reference)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the scores as JSON here."),
    force: bool = Force,
    bf16: bool | None = BF16,
    compile: bool = Compile,
    progress: bool = Progress,
) -> None:
    """Score a saved set on its source dataset's test split, with one or more architectures."""
    if out is not None:  # a scores file may go beside the set it scores
        out = output_file(out, force=force, into_set=True)
    synthetic = SyntheticSet.load(artifact)
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m.lower() not in list_models()]
    if unknown or not names:
        raise ConfigError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(list_models())}")
    data = synthetic.load_source(root=data_root, device=resolve_device(device), progress=progress)
    use_bf16, why = choose_bf16(bf16, None, data.device, names)
    announce_precision(use_bf16, why)
    table = Table(
        "model", "ACC", "AUC", "epochs", "augment", title=f"{synthetic.method} ipc={synthetic.ipc} on {data.name} (test split)"
    )
    report = {}
    for name in names:
        protocol = EvalSettings(
            num_models=eval_models, epochs=eval_epochs, model=name, augment=augment, bf16=use_bf16, compile=compile
        ).protocol_for(synthetic.method)
        scores = score_set(synthetic, data, protocol, num_models=eval_models, seed=seed, progress=progress)
        report[name] = {**scores.summary(), "eval_protocol": protocol.to_dict()}
        n = len(scores.acc)
        table.add_row(
            name,
            mean_std(scores.acc_mean, scores.acc_std, n),
            mean_std(scores.auc_mean, scores.auc_std, n),
            str(protocol.epochs),
            protocol.augment or "-",
        )
    console.print(table)
    if out is not None:
        atomic_write(out, json.dumps(report, indent=2) + "\n")


@app.command()
def methods() -> None:
    """List the registered methods."""
    from medistill.methods import get_method, list_methods

    table = Table("name", "output", "evaluated with", "summary", title="methods")
    for name in list_methods():
        spec = get_method(name)
        protocol = spec.default_protocol()
        table.add_row(
            name,
            "synthetic" if spec.synthetic else "real images",
            f"{protocol.epochs} epochs, {protocol.augment or 'no augmentation'}",
            spec.summary,
        )
    console.print(table)


@app.command()
def presets() -> None:
    """List the presets that ship with medistill (--config NAME for method settings, medistill study NAME for grids)."""
    from medistill.presets import list_presets

    table = Table(title="presets")
    for column in ("name", "kind", "what"):
        table.add_column(column)
    for preset in list_presets():
        table.add_row(preset.name, preset.kind, preset.summary)
    console.print(table)


@app.command()
def models() -> None:
    """List the model architectures (for --eval-model, --models, --attack-model, train --model)."""
    table = Table(title="models")
    for column in ("name", "architecture"):
        table.add_column(column)
    for name in list_models():
        table.add_row(name, model_summary(name))
    console.print(table)


@app.command()
def demo(
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = Seed,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo's runs are written."),
    bf16: bool | None = BF16,
    progress: bool = Progress,
) -> None:
    """The main job on its default: BreastMNIST, random vs the best available distillation method at IPC 10, vs full.

    It states its plan and expected time first; finished runs in OUT are reused by the next demo.
    """
    on_interrupt(
        lambda: (
            f"Kept: finished runs in {out} and the distillation's last checkpoint. "
            f"Continue with: {rerun_command()} (finished runs are reused)"
        )
    )
    output_folder(out)  # each run's own folder inside it is checked again as a job folder
    data = open_dataset(DEMO_DATASET, data_root, device, progress=progress)
    use_bf16, why = choose_bf16(bf16, None, data.device, demo_networks())
    announce_precision(use_bf16, why)
    rows = run_demo(data, out=out, seed=seed, progress=progress, estimate=True, bf16=use_bf16, say=tell)
    table = Table(title=f"{DEMO_DATASET}, IPC {DEMO_IPC} (test split; mean ± std over evaluation networks)")
    for column in ("method", "images", "ACC", "AUC", "evaluation", "seconds"):
        table.add_column(column)
    for r in rows:
        p = r["eval_protocol"]
        seconds = f"{r['wall_seconds']:.0f}" + (" (earlier run)" if r["reused"] else "")
        table.add_row(
            r["method"],
            str(r["num_images"]),
            record_score(r, "acc"),
            record_score(r, "auc"),
            f"{r['eval_models']} x {p['model']}, {p['epochs']} ep{', DSA' if p['augment'] else ''}",
            seconds,
        )
    console.print(table)
    console.print(f"runs written to {out}")
