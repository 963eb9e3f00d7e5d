"""Options shared by several commands, and helpers that turn them into library objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medistill.configfile import check_value, parse_value, read_yaml
from medistill.data import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Dataset, check_image_size, load_dataset
from medistill.errors import ConfigError
from medistill.markdown import printable
from medistill.methods.base import MethodSpec
from medistill.presets import resolve_config_path
from medistill.runtime import MAX_SEED, check_seed, resolve_device

# The bounds on numbers typed on the command line, checked as the line is read (one line, exit 2, before any
# work): the library checks the same bounds where it accepts the values (runtime.check_seed,
# data.check_image_size, methods.base.check_ipc, which also bounds an IPC by the memory its set needs).
MAX_IPC = 1_000_000  # images per class: beyond any class of a MedMNIST dataset, whose largest holds about 50,000


def _seed(value: int) -> int:
    return check_seed(value, "--seed")


def _image_size(value: int | None) -> int | None:
    if value is not None:
        check_image_size(value, "--image-size")
    return value


def _ipc(value: int) -> int:
    if not 1 <= value <= MAX_IPC:
        raise ConfigError(
            f"--ipc {value} is outside 1..{MAX_IPC:,} images per class; "
            "a set is also bounded by the memory its images need, checked once the dataset is known"
        )
    return value


def seed_option(default: int = 0, help: str = "Seed of the run.") -> Any:
    """A `--seed` option, refused outside 0..2^32-1 as it is read."""
    return typer.Option(default, "--seed", help=f"{help} A whole number in 0..{MAX_SEED}.", callback=_seed)


def ipc_option(default: int | None = 10, help: str = "Images per class.") -> Any:
    """An `--ipc` option (`default` None: required), refused outside 1..MAX_IPC as it is read."""
    return typer.Option(... if default is None else default, "--ipc", help=f"{help} 1..{MAX_IPC:,}.", callback=_ipc)


DataRoot = typer.Option(None, "--data-root", help="Folder of MedMNIST files (default: $MEDISTILL_DATA, else ~/.medmnist).")
Device = typer.Option("auto", "--device", help="auto, cpu or cuda[:N].")
Seed = seed_option(help="Seed of the run; the same seed gives the same result on the same device with the same --threads.")
Ipc = ipc_option()
Size = typer.Option(28, "--size", help="MedMNIST file size: 28, 64, 128 or 224.")
ImageSize = typer.Option(
    None,
    "--image-size",
    help=f"Resize images to this size after loading (the study used 32); {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px.",
    callback=_image_size,
)
Force = typer.Option(False, "--force", help="Replace an existing output instead of refusing it.")
BF16 = typer.Option(
    None,
    "--bf16/--fp32",
    show_default=False,
    help="bf16 autocast (fp32 weights and sums) for the networks this command trains, or fp32 as the references. "
    "Default: bf16 on a CPU that computes it natively (AVX512-BF16 or AMX) when every network is the ConvNet, else fp32; "
    "the shipped method presets pin fp32.",
)
Compile = typer.Option(
    False,
    "--compile/--no-compile",
    help="torch.compile the networks' training passes (a first run compiles; later runs reuse torch's cache).",
)
Progress = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
# A method's settings, as `distill` and `privacy-audit` take them (gathered by `method_settings`).
MethodConfig = typer.Option(None, "--config", help="YAML file of method settings, or a preset's name (medistill presets).")
MethodSet = typer.Option([], "--set", help="Method setting KEY=VALUE (repeatable).")
Iterations = typer.Option(None, "--iterations", help="Distillation iterations (default: the method's reference).")
LrImg = typer.Option(None, "--lr-img", help="Learning rate of the synthetic images (default: the method's reference).")
Init = typer.Option(None, "--init", help="Initial synthetic images: noise or real (default: the method's reference).")
Epsilon = typer.Option(None, "--epsilon", help="Private methods: the ε budget; the noise is calibrated to it.")
Delta = typer.Option(None, "--delta", help="Private methods: δ of the (ε, δ) guarantee (default 1e-5).")
NoiseMultiplier = typer.Option(None, "--noise-multiplier", help="Private methods: σ given; reports the ε reached.")
PublicClassCounts = typer.Option(
    False, "--public-class-counts", help="Private methods: treat the per-class counts as public (else released with noise)."
)


def method_settings(config_file: Path | None, pairs: list[str], **options: Any) -> dict[str, Any]:
    """The settings a command line gives a method: the config file, then `--set`, then its own options (those given)."""
    given = {k: v for k, v in options.items() if v is not None and not (k == "public_class_counts" and v is False)}
    return {**parse_settings(config_file, pairs), **given}


def open_dataset(
    name: str,
    data_root: Path | None,
    device: str,
    size: int = 28,
    image_size: int | None = None,
    channels: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Resolve the device and load a dataset by flag or path onto it."""
    return load_dataset(
        name,
        root=data_root,
        size=size,
        image_size=image_size,
        channels=channels,
        device=resolve_device(device),
        progress=progress,
    )


def parse_settings(config_file: Path | None, pairs: list[str]) -> dict[str, Any]:
    """Method settings from a YAML file or a shipped preset by name, then `KEY=VALUE` pairs
    (values parsed as YAML scalars; 1e-6 is a number)."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        config_file = resolve_config_path(config_file)
        loaded = read_yaml(config_file) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of setting: value")
        settings.update(loaded)
    return {**settings, **parse_pairs(pairs, "--set")}


def parse_pairs(pairs: list[str], option: str) -> dict[str, Any]:
    """`KEY=VALUE` options as a mapping, values parsed as YAML scalars."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE, got '{pair}'")
        settings[key.strip()] = parse_value(value)
    return settings


def speed_settings(spec: MethodSpec, bf16: bool, compile: bool, given: dict[str, Any]) -> dict[str, Any]:
    """The method settings the precision choice and --compile set, where the method has them: bf16 always (the
    choice has already weighed a `bf16` the settings pin), compile only when asked and not set."""
    settings: dict[str, Any] = {"bf16": bf16} if "bf16" in spec.setting_names else {}
    if compile and "compile" in spec.setting_names and "compile" not in given:
        settings["compile"] = True
    return settings


def pinned_bf16(given: dict[str, Any]) -> bool | None:
    """The `bf16` method setting a preset, config file or --set gives (None when none does)."""
    value = given.get("bf16")
    return None if value is None else check_value(bool, value, "setting 'bf16'")


def announce_precision(bf16: bool, why: str) -> None:
    """Say which precision the command's networks train in, and why (stdout, as the thread count)."""
    typer.echo(printable(f"medistill: {'bf16' if bf16 else 'fp32'} networks ({why})"))
