"""`lqmf report`: Markdown and HTML reports with plots, built from saved files (no model loads)."""

from __future__ import annotations

from pathlib import Path

import typer

from lqmf.cli.common import DefaultCommandGroup, JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import App, info, print_json

app = App(
    cls=DefaultCommandGroup,
    subcommand_metavar="ADAPTER [OPTIONS] | COMMAND [ARGS]...",
    help="Write reports/ADAPTER.md and .html (training curves, held-out metrics, the latest benchmark and "
    "the comparison with the base, as PNG plots in reports/ADAPTER/): `lqmf report ADAPTER` (short for "
    "`report adapter`), or compare adapters side by side: `lqmf report compare 'finance*'`.",
)


def _print(written: dict, json_output: bool) -> None:
    if json_output:
        print_json(written)
        return
    if written["images"]:
        info(f"{len(written['images'])} plot(s) in {Path(written['images'][0]).parent}")
    typer.echo(written["markdown"])
    typer.echo(written["html"])


@app.command("adapter")
def adapter_report(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="Adapter name."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Report one adapter: training and validation curves, quality, the latest benchmark, the base."""
    from lqmf.core.report import write_adapter_report

    _print(write_adapter_report(workspace(ctx, workspace_dir), adapter), json_output)


@app.command("compare")
def compare_report(
    ctx: typer.Context,
    patterns: list[str] = typer.Argument(..., help="Adapter names or quoted globs, e.g. 'finance*'."),
    name: str = typer.Option("compare", "--name", help="Write reports/NAME.md, reports/NAME.html, reports/NAME/."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Compare adapters side by side: loss curves overlaid, key figures as bars, the benchmark table."""
    from lqmf.core.report import write_comparison_report

    _print(write_comparison_report(workspace(ctx, workspace_dir), patterns, name), json_output)
