"""The `medistill` command: a thin typer front end over the library.

Every command module registers itself on `app`; `main()` turns library errors into one line
on stderr and a non-zero exit, never a traceback, and Ctrl-C into a line saying what was kept
and how to continue. Everything a command prints passes through `markdown.PrintableStream`: no
control character from a file name or a file's contents reaches the terminal raw, and the lines
that carry such text (the error line, log lines through `say`) show it as one line of escapes.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from collections.abc import Callable

import typer

from medistill import __version__
from medistill.errors import MedistillError
from medistill.markdown import PrintableStream, printable
from medistill.runtime import DEFAULT_THREADS, THREADS_ENV, set_threads, torch_build

app = typer.Typer(
    name="medistill",
    help="Dataset distillation for medical imaging: distil, evaluate and share small synthetic MedMNIST-style sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# Commands that only list or format: they do no torch work, so the thread choice is not announced for them.
LISTING_COMMANDS = frozenset({"datasets", "methods", "models", "presets", "predict", "report", "export"})


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"medistill {__version__}; {torch_build()}")
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    threads: int = typer.Option(
        DEFAULT_THREADS,
        "--threads",
        envvar=THREADS_ENV,
        min=1,
        help="torch CPU threads. 1 is fastest on a small or busy machine; results are reproducible "
        "for the same seed, device and thread count.",
    ),
    version: bool | None = typer.Option(
        None,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print medistill's version and the torch build, then exit.",
    ),
) -> None:
    """Dataset distillation for medical imaging: distil, evaluate and share small synthetic MedMNIST-style sets."""
    count = set_threads(threads)
    if ctx.invoked_subcommand not in LISTING_COMMANDS and "--help" not in sys.argv[1:]:
        # stdout: stderr is kept for progress and for the one line a bad input gets
        typer.echo(
            f"medistill: {count} torch CPU thread{'s' if count > 1 else ''} (--threads N or {THREADS_ENV}=N to change; "
            f"results are reproducible for the same seed, device and thread count)"
        )


class Interrupted(BaseException):
    """Ctrl-C. Raised by `main`'s SIGINT handler so it reaches `main` (typer turns KeyboardInterrupt into a silent exit)."""


_interrupt_note: Callable[[], str] | None = None


def on_interrupt(note: Callable[[], str]) -> None:
    """Register what the running command says after Ctrl-C: what it kept and how to continue."""
    global _interrupt_note
    _interrupt_note = note


def say(message: object) -> None:
    """Print one log line on stderr: control characters in it, a newline included, shown as escapes."""
    typer.echo(printable(message), err=True)


def tell(message: object) -> None:
    """Print one line on stdout, control characters in it shown as escapes (as `say`)."""
    typer.echo(printable(message))


def rerun_command(*extra: str) -> str:
    """The command line of this process as the user can type it again, with `extra` options added when absent."""
    args = sys.argv[1:] + [option for option in extra if option not in sys.argv[1:]]
    return shlex.join(["medistill", *args])


def _register_commands() -> None:
    """Import every module of this package: each one adds its commands to `app`."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_commands()


def _raise_interrupted(signum: int, frame: object) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    raise Interrupted()


def main() -> None:
    """Entry point of the `medistill` console script."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored (`cmd &`)
        signal.signal(signal.SIGINT, _raise_interrupted)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(sys.stdout), PrintableStream(sys.stderr)
    try:
        app()
    except MedistillError as exc:
        print(f"medistill: error: {printable(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except (Interrupted, KeyboardInterrupt):
        note = (
            _interrupt_note()
            if _interrupt_note is not None
            else f"This command keeps no partial work; start again with: {rerun_command()}"
        )
        print(f"medistill: interrupted. {printable(note)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be shown anyway
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = streams
