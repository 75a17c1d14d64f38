"""Export an adapter: a PEFT folder, a merged model, a GGUF adapter for llama.cpp / Ollama, a vLLM folder;
or any of them as one .tar.gz."""

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
                               "into, as NAME (NAME-merged with --merge; NAME-gguf, NAME-ollama, NAME-vllm "
                               "with --format; .tar.gz added with --archive)."),
    fmt: str = typer.Option("peft", "--format", help="peft: the PEFT folder | gguf: an adapter-only GGUF for "
                            "llama.cpp --lora | ollama: that GGUF plus a Modelfile | vllm: a PEFT folder checked "
                            "for vLLM plus its `vllm serve` line."),
    outtype: str | None = typer.Option(None, "--outtype", help="GGUF tensor type (gguf, ollama): f16 (default) | "
                                       "bf16 | f32 | q8_0."),
    merge: bool = typer.Option(False, "--merge", help="Write the base model with the adapter merged into its "
                               "weights: it loads with transformers alone, without peft (with --format ollama "
                               "or vllm: a merged model for that runtime)."),
    archive: bool = typer.Option(False, "--archive", help="Write one .tar.gz (with a SHA256SUMS list inside) "
                                 "instead of a folder."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export at PATH (only a folder an export "
                               "wrote, as its lqmf-export.json records, with nothing added since)."),
    device: str = typer.Option("cpu", "--device", help="Where --merge runs: cpu | cuda | mps | auto. The base "
                               "loads unquantized, in the dtype its weights are stored in."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Export an adapter as a PEFT folder, a merged model (--merge), a GGUF adapter for llama.cpp or Ollama,
    or a folder for vLLM (--format); any of them as one .tar.gz (--archive).

    The PEFT folder loads unchanged with peft.PeftModel.from_pretrained and PEFT-compatible servers;
    the manifest (lqmf.json), a README, SHA256SUMS and the export's record (lqmf-export.json) sit
    beside the weights. What a runtime cannot take (DoRA, saved full weights, other targets, an
    unknown architecture) is refused in one line before anything is written; the export appears at
    PATH only when complete, and --json names its files and the command that uses it.
    """
    from lqmf.core.config import DEVICES  # imported here: `lqmf adapters list` loads this module too
    from lqmf.core.errors import InputError
    from lqmf.core.export_formats import merged_spec, runtime_spec
    from lqmf.core.exporting import base_reference, plan_export, write_export
    from lqmf.core.registry import Registry

    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    registry = Registry(workspace(ctx, workspace_dir))
    plan = plan_export(registry, name, path, merge=merge, archive=archive, force=force, runtime=fmt,
                       outtype=outtype)
    build_into = None
    if merge or fmt != "peft":
        base = registry.resolve_base(plan.entry) if merge or fmt in ("gguf", "ollama") else None
        spec = merged_spec(fmt, plan.entry, base_reference(plan.entry)) if merge else \
            runtime_spec(fmt, plan.entry, base.config if base else None, base_reference(plan.entry))
        if merge and not json_output:
            info(f"merging '{name}' into {plan.entry.base_model.get('reference') or base.reference} on {device}...")
        show_phases(ctx, not json_output)

        def build_into(folder: Path) -> dict:
            if merge or fmt != "vllm":
                importing()
            from lqmf.engine.export import build_runtime_export, merge_adapter

            if fmt == "peft":
                return merge_adapter(plan.entry, base, folder, device)
            return build_runtime_export(plan, spec, base, folder, device)

    result = write_export(plan, build_into)
    if json_output:
        print_json(result)
        return
    if result.get("note"):
        info(f"note: {result['note']}")
    if result["stale_removed"]:
        info(f"removed {len(result['stale_removed'])} temporary file(s) left beside it by killed exports: "
             + ", ".join(result["stale_removed"]))
    what = {"peft": "PEFT adapter", "merged": "merged model", "gguf": "GGUF adapter", "ollama": "Ollama adapter",
            "vllm": "vLLM adapter"}.get(plan.format, plan.format.replace("-", " ") + " model")
    info(f"exported {what} '{name}' to {plan.target}" + (f" (sha256 {result['sha256']})" if archive else ""))
    for note in result.get("notes", []):
        info(f"note: {note}")
    if result.get("command"):
        info(f"use it with: {result['command']}")
    typer.echo(str(plan.target))
