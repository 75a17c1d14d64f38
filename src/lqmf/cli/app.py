"""The `lqmf` command: the root app and its verb groups.

Heavy libraries (torch, transformers, peft...) are imported inside command bodies only, so
`lqmf --help` and the registry verbs start fast.
"""

from __future__ import annotations

import os
import sys

import typer

from lqmf import __version__
from lqmf.cli import config_cmd, infer_cmd, models_cmd, serve_cmd, train_cmd
from lqmf.cli.common import WorkspaceOption
from lqmf.cli.output import DEBUG_ENV, App
from lqmf.core.errors import LqmfError

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
app.command("test")(infer_cmd.answer)
app.command("serve")(serve_cmd.serve)
app.add_typer(config_cmd.app, name="config")
app.add_typer(models_cmd.app, name="models")


def _pending(verb: str, issue: int, summary: str) -> None:
    def command(ctx: typer.Context) -> None:
        raise LqmfError(f"`lqmf {verb}` is not implemented yet (tracked in issue #{issue})")

    app.command(verb, help=f"{summary} (not implemented yet: issue #{issue})",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)


_pending("adapters", 3, "List, show, load, switch, verify, rename and remove adapters.")
_pending("export", 3, "Export an adapter as a PEFT folder, a merged model or an archive.")
_pending("bench", 5, "Benchmark speed, memory and quality of an adapter against its base.")
_pending("status", 6, "Show GPUs, memory, library versions and the adapter registry.")


def main() -> None:
    app(prog_name="lqmf")


if __name__ == "__main__":
    sys.exit(main())
