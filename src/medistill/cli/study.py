"""Study commands: study (grid runner), simulate (datasets-as-classes set), predict, report."""

from __future__ import annotations

from pathlib import Path

import typer

from medistill.cli import app, on_interrupt, rerun_command, tell
from medistill.cli.options import DataRoot, Force, Seed, ipc_option
from medistill.data import load_dataset
from medistill.errors import ConfigError
from medistill.outputs import output_file, output_folder
from medistill.presets import resolve_config_path
from medistill.study.executors import list_executors
from medistill.study.predict import DEFAULT_LEVEL, DEFAULT_PROBE
from medistill.study.predict import predict as predict_accuracy
from medistill.study.report import console_summary, write_report
from medistill.study.runner import run_study
from medistill.study.simulation import SimulationRecipe, build_simulation
from medistill.study.spec import load_study, resolve_path_ref
from medistill.study.store import check_study_folder

DEFAULT_STUDY_DIR = Path("runs/study")
EXIT_RUNS_FAILED = 1


@app.command()
def study(
    config: Path = typer.Argument(
        ...,
        help="Study config (YAML), or a preset's name (medistill presets); relative paths inside it resolve against its folder.",
    ),
    out: Path = typer.Option(DEFAULT_STUDY_DIR, "--out", help="Study folder: results, artifacts, report."),
    executor: str = typer.Option("local", "--executor", help=f"How runs are executed: {', '.join(list_executors())}."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster address (default: start a local Ray instance)."
    ),
    data_root: Path | None = DataRoot,
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu or cuda[:N] (default: the config's `device`, else auto)."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed runs again (finished runs are always skipped)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.md, index.html, tables and plots afterwards."),
) -> None:
    # the docstring is the command's --help text, where Typer keeps line breaks: one line per paragraph
    """Run a study grid (datasets x methods x IPCs x seeds); a rerun skips finished runs and continues a killed one from its checkpoint."""  # noqa: E501
    spec = load_study(resolve_config_path(config))
    if ray_address and executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    check_study_folder(out)  # before anything is built or run (run_study checks again, holding the lock)
    options = {"address": ray_address} if executor == "ray" else {}
    on_interrupt(
        lambda: (
            f"Kept: every finished run in {out / 'runs'}, and the checkpoints of runs in flight in {out / 'work'}. "
            f"The same command skips the finished runs and continues the others: {rerun_command()}"
        )
    )
    if spec.threads:
        typer.echo(f"medistill: each run uses {spec.threads} torch CPU thread(s), as the study config sets")
    summary = run_study(
        spec,
        out,
        executor=executor,
        executor_options=options,
        data_root=data_root,
        device=device,
        retry_failed=retry_failed,
        log=tell,
    )
    if report:
        path = write_report(out)
        typer.echo(console_summary(out))
        typer.echo(f"report: {path} and {path.parent / 'index.html'}")
    failed = summary.failed + summary.previously_failed
    if failed:
        typer.echo(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; see runs/<key>.json in {out}"
            + ("" if retry_failed else " (rerun with --retry-failed to try them again)"),
            err=True,
        )
        raise typer.Exit(EXIT_RUNS_FAILED)


@app.command()
def simulate(
    datasets: str = typer.Option(..., "--datasets", help="Comma-separated MedMNIST flags and/or npz/folder paths (two or more)."),
    out: Path = typer.Option(..., "--out", help="The .npz file to write."),
    fraction: float = typer.Option(0.1, "--fraction", help="Share of each split of each dataset to take (stratified by class)."),
    size: int = typer.Option(28, "--size", help="Image size of the set (every source is resized to it)."),
    seed: int = Seed,
    data_root: Path | None = DataRoot,
    force: bool = Force,
) -> None:
    """Build the study's "distillation simulation" set: each source dataset becomes one class (3 channels, one size)."""
    out = output_file(out, force=force)  # before any data is loaded: never into a bundle or a set's folder
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    recipe = SimulationRecipe(
        datasets=tuple(resolve_path_ref(n, Path.cwd()) for n in names), fraction=fraction, size=size, seed=seed
    )
    path = build_simulation(recipe, out, root=data_root, progress=True)
    classes = load_dataset(path).label_names  # each source's dataset name, not the path it was given by
    typer.echo(f"wrote {path}: {len(classes)} classes ({', '.join(classes)}), fraction {fraction}, {size}x{size}x3, seed {seed}")


@app.command()
def predict(
    dataset: str = typer.Argument(
        ..., help="MedMNIST flag, bundled set (digits), npz/folder path, or a simulation set of the study."
    ),
    ipc: int = ipc_option(None),
    study_dir: Path = typer.Option(DEFAULT_STUDY_DIR, "--study", help="Study folder whose fitted predictor is used."),
    probe: str = typer.Option(
        DEFAULT_PROBE,
        "--probe",
        help="The cheap run whose score predicts the methods': random, herding or kcenter (the study must hold its runs).",
    ),
    level: float = typer.Option(DEFAULT_LEVEL, "--level", help="Level of the conformal interval over the study's datasets."),
    data_root: Path | None = DataRoot,
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda[:N] (default: the study's)."),
) -> None:
    """Run the cheap probe on a dataset and predict each distillation method's test ACC, with an interval over datasets."""
    result = predict_accuracy(dataset, ipc, study_dir, probe=probe, level=level, data_root=data_root, device=device, log=tell)
    typer.echo(f"study: {result.study}; fitted on {len(result.study_datasets)} datasets: {', '.join(result.study_datasets)}")
    f = result.facts
    typer.echo(
        f"{result.dataset} ({f.num_classes} classes, {f.channels} channel(s), {'medical' if f.medical else 'not medical'}) "
        f"IPC {ipc}: {probe} test ACC {result.probe_acc_mean:.3f} ± {result.probe_acc_std:.3f} "
        f"(seeds {', '.join(map(str, result.seeds))})"
    )
    for reason in result.extrapolated:
        typer.echo(f"  WARNING extrapolating: {reason}; the interval is widened to span every candidate model")
    for m in result.methods:
        typer.echo(
            f"  {m.method}: predicted test ACC {m.predicted_acc:.3f}, {m.level:.0%} interval [{m.lower:.3f}, {m.upper:.3f}]; "
            f"model {m.model}, chosen over {m.n_datasets} datasets, leave-one-dataset-out MAE {m.lodo_mae:.3f}"
        )
    for note in result.notes:
        typer.echo(f"  note: {note}")


@app.command()
def report(study_dir: Path = typer.Argument(..., help="Study folder.")) -> None:
    """(Re)write a study folder's report.md, index.html, tables, analysis.json and plots."""
    output_folder(
        study_dir,
        option="study folder",
        files=("report.md", "index.html", "analysis.json"),
        folders=("tables", "plots"),
        replace=True,
    )
    path = write_report(study_dir)
    typer.echo(f"report: {path} and {path.parent / 'index.html'}")
