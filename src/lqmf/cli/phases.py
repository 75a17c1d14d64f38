"""Show the engine's loading phases on stderr while a command starts: `[   2.1s] loading base model ...`."""

from __future__ import annotations

import sys

import typer

from lqmf.core.progress import phase, reporting


def _print_phase(message: str, elapsed: float) -> None:
    typer.echo(f"[{elapsed:6.1f}s] {message}", err=True)


def show_phases(ctx: typer.Context, enabled: bool = True) -> None:
    """Print phases on stderr until this command ends (never on stdout; nothing when not enabled)."""
    ctx.with_resource(reporting(_print_phase if enabled else None))


def importing() -> None:
    """Report the import of the model libraries, before a command's first engine import."""
    if "torch" not in sys.modules:
        phase("importing torch and transformers")
