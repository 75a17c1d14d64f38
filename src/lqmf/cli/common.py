"""Options and lookups shared by the commands."""

from __future__ import annotations

from typing import Any

import typer

from lqmf.cli.output import LazySubcommands, info
from lqmf.core.workspace import WORKSPACE_ENV, Workspace

WorkspaceOption = typer.Option(
    None, "--workspace", "-w", envvar=WORKSPACE_ENV, show_envvar=True,
    help="Workspace folder (configs/, adapters/, benchmarks/, reports/); default: the current directory.",
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def workspace(ctx: typer.Context | None, option: str | None = None) -> Workspace:
    """The workspace from this command's option, else the root --workspace, else $LQMF_HOME / cwd."""
    root_option = None
    if ctx is not None:
        root = ctx.find_root()
        root_option = (root.obj or {}).get("workspace") if isinstance(root.obj, dict) else None
    return Workspace.resolve(option or root_option)


LocalOption = typer.Option(
    False, "--local", help="Load the model in this process even when a running `lqmf serve` of this workspace "
    "holds the adapter.")


def running_server_for(ws: Workspace, adapter: str, local: bool, doing: str) -> dict[str, Any] | None:
    """The running `lqmf serve` of the workspace that holds adapter (None with --local or when none does).

    Says on stderr that the server is used, e.g. doing="answering": what `lqmf test` and `lqmf bench` share.
    """
    if local:
        return None
    from lqmf.core.serving import server_with_adapter

    served = server_with_adapter(ws, adapter)
    if served is not None:
        info(f"{doing} with the running server {served['url']} (--local loads the model here instead)")
    return served


class DefaultCommandGroup(LazySubcommands):
    """A command group that runs its first command when the first argument names no subcommand.

    So `lqmf bench ADAPTER` is `lqmf bench run ADAPTER`, while `lqmf bench compare ...` still works.
    """

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        help_options = set(ctx.help_option_names)
        names = self.list_commands(ctx)
        if args and args[0] not in names and args[0] not in help_options and names:
            args = [names[0], *args]
        return super().parse_args(ctx, args)
