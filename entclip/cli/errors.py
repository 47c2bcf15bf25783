"""Errors as the user sees them: one red line and its exit code, or with `entclip --debug` the traceback.

Domain code raises EntclipError; only the CLI turns it into a line and an exit code (2 = bad input,
1 = the run failed, the others in entclip.contracts.errors).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import typer

from entclip.contracts.errors import INTERRUPTED, EntclipError


def stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class _Options:
    debug = False  # the app's callback sets it on every invocation: entclip --debug COMMAND ...


def set_debug(on: bool) -> None:
    _Options.debug = on


def debugging() -> bool:
    """Whether this invocation asked for tracebacks (the app's --debug)."""
    return _Options.debug


def warn(line: str) -> None:
    stderr().print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """EntclipError -> one line and its exit code; anything else -> one line and exit 1; with
    --debug both raise, traceback and all."""
    try:
        yield
    except EntclipError as exc:
        if debugging():
            raise
        from rich.markup import escape  # a message may hold brackets: pip install 'entclip[wandb]'

        label = "[yellow]stopped:[/yellow]" if exc.exit_code == INTERRUPTED else "[red]error:[/red]"
        stderr().print(f"{label} {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr().print("[yellow]stopped:[/yellow] interrupted (nothing half-written is kept)", soft_wrap=True)
        raise typer.Exit(INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug or an environment failure: still one line unless --debug
        if debugging():
            raise
        stderr().print(f"[red]error:[/red] {type(exc).__name__}: {exc} (rerun as `entclip --debug ...` for "
                       "the traceback)", soft_wrap=True)
        raise typer.Exit(1) from None
