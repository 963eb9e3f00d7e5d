"""`medistill experts`: build (or extend, or reuse) the MTT expert buffer of a dataset."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from medistill.atomic import atomic_write
from medistill.augment import DEFAULT_STRATEGY
from medistill.cli import app, on_interrupt, rerun_command, say
from medistill.cli.options import DataRoot, Device, ImageSize, Progress, Seed, Size, open_dataset, parse_pairs
from medistill.methods.experts import ExpertSettings, buffer_dir, build_buffer, experts_root
from medistill.outputs import output_file, output_folder

# plain text: `main` guards stdout (markdown.PrintableStream), which would show colour codes as escapes
console = Console(width=None if sys.stdout.isatty() else 160, color_system=None)


@app.command()
def experts(
    dataset: str = typer.Argument(..., help="MedMNIST flag, an .npz with MedMNIST array names, or an image folder."),
    num_experts: int = typer.Option(10, "--num-experts", "-e", help="Experts the buffer must hold."),
    epochs: int = typer.Option(30, "--epochs", "-t", help="Training epochs per expert (T+1 snapshots are kept)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Buffer root (default: $MEDISTILL_CACHE/experts or ~/.cache/medistill/experts); "
        "give the same folder to MTT as buffer_root.",
    ),
    lr_teacher: float = typer.Option(0.01, "--lr-teacher", help="Experts' SGD learning rate (no momentum, no weight decay)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Experts' minibatch size."),
    augment: str = typer.Option(DEFAULT_STRATEGY, "--augment", help="DSA strategy for the experts, or 'none'."),
    model: str = typer.Option("convnet", "--model", help="Expert architecture (one without batch norm)."),
    model_args: list[str] = typer.Option([], "--model-arg", help="Architecture setting KEY=VALUE, e.g. width=64 (repeatable)."),
    zca: bool = typer.Option(False, "--zca", help="Train on ZCA-whitened images (kornia ZCA, eps 0.1, fitted on [0, 1] pixels)."),
    fp16: bool = typer.Option(False, "--fp16", help="Store trajectories in fp16 (half the disk)."),
    parallel: int | None = typer.Option(
        None,
        "--parallel",
        help="Experts trained at once (stacked; default: 1 on the CPU, as many as the free memory holds on CUDA).",
    ),
    max_minutes: float | None = typer.Option(
        None,
        "--max-expert-minutes",
        help="Refuse (exit 2, nothing trained) when the missing experts are estimated to take longer than this.",
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the buffer summary (folder, size, time, accuracy) as JSON here."
    ),
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = Seed,
    size: int = Size,
    image_size: int | None = ImageSize,
    progress: bool = Progress,
) -> None:
    """Train MTT expert trajectories into a reusable, resumable buffer; the work and its estimated time are stated first."""
    output_folder(experts_root(out))  # before any data is loaded; the buffer inside it is this command's own
    if json_out is not None:
        json_out = output_file(json_out, option="--json", force=True)
    data = open_dataset(dataset, data_root, device, size, image_size, progress=progress)
    settings = ExpertSettings(
        epochs=epochs,
        lr_teacher=lr_teacher,
        batch_size=batch_size,
        augment=None if augment.lower() == "none" else augment,
        model=model,
        model_kwargs=parse_pairs(model_args, "--model-arg"),
        zca=zca,
        seed=seed,
        fp16=fp16,
    )
    folder = buffer_dir(data, settings, out)
    on_interrupt(
        lambda: f"Kept: every finished expert in {folder}. The same command trains only the missing ones: {rerun_command()}"
    )
    start = time.perf_counter()
    buffer = build_buffer(
        data,
        settings,
        num_experts,
        root=out,
        parallel=parallel,
        max_minutes=max_minutes,
        smaller_buffer_hint="for a smaller buffer: --num-experts N or --epochs T",
        progress=progress,
        log=say,
    )
    summary = {**buffer.summary(), "wall_seconds": time.perf_counter() - start, "device": str(data.device)}
    if json_out is not None:
        atomic_write(json_out, json.dumps(summary, indent=2) + "\n")
    acc = summary["expert_test_acc_mean"]
    console.print(
        f"{data.name}: {summary['num_experts']} experts x {summary['epochs']} epochs, "
        f"{summary['size_bytes'] / 2**20:.1f} MiB on disk, mean expert test ACC {acc:.3f}, "
        f"{summary['wall_seconds']:.1f} s -> {buffer.directory}"
    )
