"""How the CLI fails: one line and exit code 2 for what a user can get wrong, one line and 130 on Ctrl-C.

``on_interrupt(text)`` lets a command say, as it goes, what an interruption leaves behind.
"""
from __future__ import annotations

from functools import wraps
from typing import Callable

import typer

from analysis.errors import NeuroglotError

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
_interrupt_note = {"text": ""}


def on_interrupt(text: str) -> None:
    """What the one line printed on Ctrl-C says about the command's output (set as the command goes)."""
    _interrupt_note["text"] = text


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_errors(fn: Callable) -> Callable:
    """Turn NeuroglotError (and OSError) into a one-line message and exit code 2; Ctrl-C into one line and 130."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        on_interrupt("nothing was written; earlier run folders and saved edits are as they were.")
        try:
            return fn(*args, **kwargs)
        except NeuroglotError as exc:
            typer.secho(f"error: {one_line(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        except OSError as exc:  # the disk, permissions, a file that vanished: the environment, not a bug
            where = f"{exc.filename}: " if exc.filename else ""
            typer.secho(f"error: {where}{exc.strerror or one_line(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        except KeyboardInterrupt:
            typer.secho(f"\ninterrupted: {_interrupt_note['text']}", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(code=INTERRUPTED)

    return wrapper
