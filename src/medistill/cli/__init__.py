"""The `medistill` command: a thin typer front end over the library.

Every command module registers itself on `app`; `main()` turns library errors into one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from medistill.errors import MedistillError

app = typer.Typer(
    name="medistill",
    help="Dataset distillation for medical imaging: distil, evaluate and share small synthetic MedMNIST-style sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    """Import every module of this package: each one adds its commands to `app`."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_commands()

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main() -> None:
    """Entry point of the `medistill` console script."""
    try:
        app()
    except MedistillError as exc:
        print(f"medistill: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("medistill: interrupted; finished work is kept on disk (rerun with --resume where the command has it)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
