"""`lqmf config`: create, show, validate and edit saved training configs (configs/NAME.yaml)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import App, info, print_json
from lqmf.core import config as cfg
from lqmf.core.errors import ConflictError, InputError
from lqmf.core.fsutil import atomic_write_text

app = App(help="Create, show, validate and edit training configs (configs/NAME.yaml).")


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Config name; written to configs/NAME.yaml."),
    task: str | None = typer.Option(None, "--task", "-t", help="Task type to fill in."),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model to fill in."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing config."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Write a commented template with every key at its default."""
    ws = workspace(ctx, workspace_dir)
    path = cfg.new_config_path(ws.configs_dir, name)
    if path.exists() and not force:
        raise ConflictError(f"config '{path}' already exists; use --force to overwrite it")
    atomic_write_text(path, cfg.template(task=task, model=model))
    if json_output:
        print_json({"name": name, "path": str(path)})
        return
    info(f"wrote {path}; edit it, then: lqmf train --config {path.stem}")
    typer.echo(str(path))


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Config name or path."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Print the config as training would resolve it: defaults filled in, the task's learning rates too;
    the keys that wait for the data set (epochs, gradient accumulation) stay empty, and a comment says why."""
    ws = workspace(ctx, workspace_dir)
    resolved = cfg.resolve_config(cfg.read_config_file(cfg.config_path(ws.configs_dir, name)), {})
    cfg.fill_task_defaults(resolved)
    if json_output:
        print_json(resolved.to_dict())
        return
    typer.echo(cfg.dump_config(resolved), nl=False)
    note = cfg.unfilled_note(resolved)
    if note:
        typer.echo(note)


@app.command("validate")
def validate(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Config name or path."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Check every key and value; exit 2 naming the first bad one."""
    ws = workspace(ctx, workspace_dir)
    path = cfg.config_path(ws.configs_dir, name)
    values = cfg.read_config_file(path)
    cfg.resolve_config(values, {})
    if json_output:
        print_json({"path": str(path), "valid": True, "keys": sorted(values)})
    else:
        typer.echo(f"{path}: valid ({len(values)} keys set, the rest default)")


USUAL_EDITORS = ("editor", "sensible-editor", "nano", "vim", "vi", "notepad")


def usual_editor() -> str | None:
    """Without $VISUAL and $EDITOR: the system's editor, as git and crontab pick one."""
    return next((name for name in USUAL_EDITORS if shutil.which(name)), None)


@app.command("edit")
def edit(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Config name or path."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Open the config in $VISUAL or $EDITOR (else the system's: editor, nano, vi), creating it from the template
    first if needed, then validate it."""
    ws = workspace(ctx, workspace_dir)
    path = cfg.config_path(ws.configs_dir, name)
    created = not path.exists()
    if created:
        atomic_write_text(path, cfg.template())
        info(f"created {path} from the template")
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or usual_editor()
    if not editor:
        raise InputError(f"no editor found: set $EDITOR to edit configs (the file is {path})")
    result = subprocess.run([*shlex.split(editor), str(path)], check=False)
    if result.returncode != 0:
        raise InputError(f"editor '{editor}' exited with status {result.returncode}")
    cfg.read_config_file(path)
    if json_output:
        print_json({"path": str(path), "created": created, "valid": True})
        return
    typer.echo(f"{path}: valid")
