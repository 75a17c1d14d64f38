"""Printing for every command: tables (tabulate) or JSON, errors as one line, progress on stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import typer

from lqmf.core.errors import LqmfError

DEBUG_ENV = "LQMF_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def print_json_rows(rows: Sequence[Any]) -> None:
    """A JSON array with one compact object per line: fast for thousands of rows, still greppable."""
    if not rows:
        typer.echo("[]")
        return
    typer.echo("[\n" + ",\n".join(json.dumps(row, default=str) for row in rows) + "\n]")


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    from tabulate import tabulate

    typer.echo(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))


def info(message: str) -> None:
    """A human-facing line on stderr (stdout stays clean for --json and pipes)."""
    typer.echo(message, err=True)


def fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LqmfError (and any other failure) into one line on stderr and an exit code.

    With --debug (or LQMF_DEBUG=1) the traceback is printed too.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LqmfError as err:
            if debug_enabled():
                traceback.print_exc()
            raise fail(err.message, err.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(1) from None
        except Exception as err:  # noqa: BLE001 - the last line of defence for a CLI
            if debug_enabled():
                traceback.print_exc()
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise fail(f"{type(err).__name__}: {detail} (run with --debug for the traceback)", 1) from None

    return wrapper


class App(typer.Typer):
    """A Typer app whose commands all report errors the same way."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(handle_errors(fn))
            return fn

        return decorator


def human_size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
