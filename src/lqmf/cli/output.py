"""Printing for every command: tables (tabulate) or JSON, errors as one line, progress on stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

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
    encode = json.JSONEncoder(default=str).encode
    typer.echo("[\n" + ",\n".join(encode(row) for row in rows) + "\n]")


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Text columns in tabulate's "simple" layout, without importing tabulate (~40 ms per command)."""
    head = [str(h) for h in headers]
    cells = [["" if value is None else str(value).strip() for value in row] for row in rows]
    widths = [max([len(h) + 2, *(len(row[i]) for row in cells)]) for i, h in enumerate(head)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(head), "  ".join("-" * width for width in widths), *(line(row) for row in cells)])


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    typer.echo(format_table(rows, headers))


def info(message: str) -> None:
    """A human-facing line on stderr (stdout stays clean for --json and pipes)."""
    typer.echo(message, err=True)


_json_errors = False


@contextmanager
def errors_as_json(enabled: bool) -> Iterator[None]:
    """While enabled, `fail` prints errors as a JSON object on stdout (the --json contract)."""
    global _json_errors
    before, _json_errors = _json_errors, enabled
    try:
        yield
    finally:
        _json_errors = before


def fail(message: str, code: int) -> typer.Exit:
    """Print an error as one line on stderr, or with --json as {"error", "exit_code"} on stdout."""
    if _json_errors:
        typer.echo(json.dumps({"error": message, "exit_code": code}))
    else:
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LqmfError (and any other failure) into one line on stderr and an exit code
    (with --json: a JSON object on stdout). With --debug (or LQMF_DEBUG=1) the traceback is printed too.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with errors_as_json(_json_errors or bool(kwargs.get("json_output"))):
            return _run_reporting_errors(fn, *args, **kwargs)

    return wrapper


def _run_reporting_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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


class LazySubcommands(TyperGroup):
    """A verb's group whose subcommands are built (Typer reading their parameters) only when named:
    `lqmf adapters list` builds `list` alone, not all 13 (a few ms of every start; docs/cli.md).
    `lqmf.cli.app.load_verb` hands it the builders; without them it is a plain TyperGroup."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.builders: dict[str, Callable[[], Any]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.builders, *(name for name in self.commands if name not in self.builders)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in self.builders:
            self.commands[cmd_name] = self.builders[cmd_name]()
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.builders:  # a typo: Typer suggests names from the built commands
            for name in self.builders:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


class App(typer.Typer):
    """A Typer app whose commands all report errors the same way (and a group of them, LazySubcommands)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("cls", LazySubcommands)
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("add_completion", False)  # only the root offers --install-completion
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("rich_markup_mode", None)  # plain help: rich costs ~0.1 s of imports per call
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
