"""Export an adapter: a PEFT folder, a merged model, or either as one .tar.gz."""

from __future__ import annotations

from pathlib import Path

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import info, print_json
from lqmf.cli.phases import importing, show_phases


def export(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Adapter name (lqmf adapters list)."),
    path: str = typer.Argument(..., help="Where to write the export. A PATH ending in / is a folder to export "
                               "into, as NAME (NAME-merged with --merge; .tar.gz added with --archive)."),
    merge: bool = typer.Option(False, "--merge", help="Write the base model with the adapter merged into its "
                               "weights: it loads with transformers alone, without peft."),
    archive: bool = typer.Option(False, "--archive", help="Write one .tar.gz (with a SHA256SUMS list inside) "
                                 "instead of a folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export at PATH."),
    device: str = typer.Option("cpu", "--device", help="Where --merge runs: cpu | cuda | mps | auto. The base "
                               "loads unquantized, in the dtype its weights are stored in."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Export an adapter as a PEFT folder, a merged model (--merge) or one .tar.gz (--archive).

    The PEFT folder loads unchanged with peft.PeftModel.from_pretrained and PEFT-compatible servers;
    the manifest (lqmf.json), a README and SHA256SUMS sit beside the weights. Nothing is written
    until PATH has been checked, and the export appears at PATH only when complete.
    """
    from lqmf.core.config import DEVICES  # imported here: `lqmf adapters list` loads this module too
    from lqmf.core.errors import InputError
    from lqmf.core.exporting import plan_export, write_export
    from lqmf.core.registry import Registry

    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    registry = Registry(workspace(ctx, workspace_dir))
    plan = plan_export(registry, name, path, merge=merge, archive=archive, force=force)
    merge_into = None
    if merge:
        base = registry.resolve_base(plan.entry)
        if not json_output:
            info(f"merging '{name}' into {plan.entry.base_model.get('reference') or base.reference} on {device}...")

        show_phases(ctx, not json_output)

        def merge_into(folder: Path) -> dict:
            importing()
            from lqmf.engine.export import merge_adapter

            return merge_adapter(plan.entry, base, folder, device)

    result = write_export(plan, merge_into)
    if json_output:
        print_json(result)
        return
    if result.get("note"):
        info(f"note: {result['note']}")
    if result["stale_removed"]:
        info(f"removed {len(result['stale_removed'])} temporary file(s) left beside it by killed exports: "
             + ", ".join(result["stale_removed"]))
    what = "merged model" if merge else "PEFT adapter"
    info(f"exported {what} '{name}' to {plan.target}" + (f" (sha256 {result['sha256']})" if archive else ""))
    typer.echo(str(plan.target))
