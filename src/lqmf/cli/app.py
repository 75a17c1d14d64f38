"""The `lqmf` command: the root app and its verb groups.

Heavy libraries (torch, transformers, peft...) are imported inside command bodies only, so
`lqmf --help` and the registry verbs start fast.
"""

from __future__ import annotations

import os
import sys

import typer

from lqmf import __version__
from lqmf.cli import (
    adapters_cmd,
    bench_cmd,
    config_cmd,
    export_cmd,
    infer_cmd,
    models_cmd,
    plan_cmd,
    report_cmd,
    serve_cmd,
    status_cmd,
    train_cmd,
    tune_cmd,
)
from lqmf.cli.common import WorkspaceOption
from lqmf.cli.output import DEBUG_ENV, App

app = App(
    name="lqmf",
    help="LQMF, the Local Quantized Model Factory: LoRA/QLoRA fine-tuning on small GPUs, "
    "and the adapters it makes: manage, serve, test, benchmark, export.",
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lqmf {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    workspace: str | None = WorkspaceOption,
    debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV, help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    ctx.obj = {"workspace": workspace}
    if debug:
        os.environ[DEBUG_ENV] = "1"


app.command("train", help=train_cmd.__doc__)(train_cmd.train)
app.command("plan", help=plan_cmd.__doc__)(plan_cmd.plan)
app.command("status", help=status_cmd.__doc__)(status_cmd.status)
app.command("test")(infer_cmd.answer)
app.command("serve")(serve_cmd.serve)
app.add_typer(config_cmd.app, name="config")
app.add_typer(models_cmd.app, name="models")
app.add_typer(bench_cmd.app, name="bench")
app.add_typer(report_cmd.app, name="report")
app.add_typer(adapters_cmd.app, name="adapters")
app.command("export")(export_cmd.export)
app.command("tune")(tune_cmd.tune)


def main() -> None:
    app(prog_name="lqmf")


if __name__ == "__main__":
    sys.exit(main())
