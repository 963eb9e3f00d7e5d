"""`privacy-audit`: an empirical lower bound on the ε a method spends, from canaries and one run of it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from medistill.audit.canary import (
    CANARY_AUDIT_JSON,
    CanaryAuditConfig,
    canary_summary,
    require_single_label,
    run_canary_audit,
    write_canary_report,
)
from medistill.cli import app, say
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
    Iterations,
    LrImg,
    MethodConfig,
    MethodSet,
    NoiseMultiplier,
    Progress,
    PublicClassCounts,
    Size,
    announce_precision,
    ipc_option,
    method_settings,
    open_dataset,
    pinned_bf16,
    seed_option,
    speed_settings,
)
from medistill.methods import get_method
from medistill.outputs import output_folder
from medistill.runtime import choose_bf16


def _say(enabled: bool) -> Callable[[str], None]:
    return (lambda message: say(f"medistill: {message}")) if enabled else (lambda message: None)


@app.command("privacy-audit")
def privacy_audit(
    dataset: str = typer.Argument(
        ..., help="MedMNIST flag, an .npz with MedMNIST array names, or an image folder (single-label)."
    ),
    method: str = typer.Option(..., "--method", "-m", help="The method to audit (see `medistill methods`)."),
    ipc: int = ipc_option(),
    out: Path = typer.Option(..., "--out", help=f"Folder for {CANARY_AUDIT_JSON} (created; the released set is not written)."),
    canaries: int = typer.Option(
        CanaryAuditConfig.canaries, "--canaries", help="Canaries drawn; each joins the training split with probability 1/2."
    ),
    real_per_class: int = typer.Option(
        CanaryAuditConfig.real_per_class,
        "--real-per-class",
        help="Real training images kept per class beside the canaries (0: all; fewer give the attack more power).",
    ),
    canary_resolution: int = typer.Option(
        CanaryAuditConfig.canary_resolution,
        "--canary-resolution",
        help="Side of the random pattern each canary is upsampled from.",
    ),
    confidence: float = typer.Option(CanaryAuditConfig.confidence, "--confidence", help="Confidence of the lower bound."),
    data_root: Path | None = DataRoot,
    device: str = Device,
    seed: int = seed_option(help="Seed of the run and of the canary designs (public); the inclusion coins never come from it."),
    config: Path | None = MethodConfig,
    settings: list[str] = MethodSet,
    iterations: int | None = Iterations,
    lr_img: float | None = LrImg,
    init: str | None = Init,
    epsilon: float | None = Epsilon,
    delta: float | None = Delta,
    noise_multiplier: float | None = NoiseMultiplier,
    public_class_counts: bool = PublicClassCounts,
    force: bool = Force,
    size: int = Size,
    image_size: int | None = ImageSize,
    bf16: bool | None = BF16,
    compile: bool = Compile,
    progress: bool = Progress,
) -> None:
    # the docstring is the command's --help text, where Typer keeps line breaks: one line per paragraph
    """Audit a method empirically: train it once with canaries, guess which were in, and bound ε from below.

    Canary designs follow --seed (publishable); which canaries join the training split is decided by the operating system's entropy. Writes OUT/canary_audit.json (the bound per number of guesses, the claimed ε if any, and, the experiment being over, the inclusion bits); the released set itself is not kept.
    """  # noqa: E501
    spec = get_method(method)
    audit_config = CanaryAuditConfig(
        canaries=canaries, real_per_class=real_per_class, canary_resolution=canary_resolution, confidence=confidence
    )
    audit_config.check()
    out = output_folder(out, files=(CANARY_AUDIT_JSON,), replace=force)  # before any data is loaded
    data = open_dataset(dataset, data_root, device, size, image_size, progress=progress)
    require_single_label(data)  # before the precision line: the refusal is the only line
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
    )
    use_bf16, why = choose_bf16(bf16, pinned_bf16(given), data.device, spec.networks(given))
    announce_precision(use_bf16, why)
    given.update(speed_settings(spec, use_bf16, compile, given))
    report = run_canary_audit(data, spec.name, ipc, given, seed=seed, config=audit_config, progress=progress, log=_say(progress))
    path = write_canary_report(report, out)
    typer.echo(f"{canary_summary(report)} -> {path}")
