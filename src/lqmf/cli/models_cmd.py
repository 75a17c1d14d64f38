"""`lqmf models`: the base models LQMF knows by alias."""

from __future__ import annotations

from pathlib import Path

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import App, info, print_json, print_table
from lqmf.core.config import TrainConfig
from lqmf.core.errors import ConflictError, InputError
from lqmf.core.memory_plan import (
    DEFAULT_BUDGET,
    GiB,
    budget_choices,
    estimate,
    model_shape,
    parse_size,
    settings_for,
)
from lqmf.core.models import ModelCatalogue, ResolvedModel

app = App(help="List and add base models (aliases for hub ids, local folders and packaged models).")


def qlora_estimate_gb(resolved: ResolvedModel) -> float | None:
    """Estimated peak VRAM of QLoRA training at the default settings (None when the shape is unknown)."""
    shape, _ = model_shape(resolved)
    if shape is None:
        return None
    task = "classification" if shape.encoder else "chat"
    config = TrainConfig(task_type=task)
    settings = budget_choices(shape, settings_for(config, resolved, device="cuda"), parse_size(DEFAULT_BUDGET), config)
    return round(estimate(shape, settings).total / GiB, 2)


def model_rows(catalogue: ModelCatalogue) -> list[dict]:
    rows = []
    for alias, entry in sorted(catalogue.models.items()):
        try:
            resolved = catalogue.resolve(alias)
        except InputError as err:  # one alias LQMF would refuse (an odd quantization_config): listed, not fatal
            rows.append({"alias": alias, "source": entry["source"], "kind": None, "family": entry.get("family"),
                         "available": False, "path": None, "origin": catalogue.origin[alias],
                         "description": entry.get("description"), "quantization": None, "qlora_estimate_gb": None,
                         "problem": err.message})
            continue
        rows.append({
            "alias": alias, "source": entry["source"], "kind": resolved.kind,
            "family": resolved.family, "available": resolved.available,
            "path": str(resolved.path) if resolved.path else None,
            "origin": catalogue.origin[alias], "description": entry.get("description"),
            "quantization": resolved.quantization, "qlora_estimate_gb": qlora_estimate_gb(resolved),
        })
    return rows


@app.command("list")
def list_models(
    ctx: typer.Context,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Show each alias, what it resolves to and whether it is available locally (no download)."""
    rows = model_rows(ModelCatalogue(workspace(ctx, workspace_dir)))
    if json_output:
        print_json(rows)
        return
    print_table(
        [[r["alias"], r["source"], r["family"] or "?", "yes" if r["available"] else "no",
          r["quantization"]["label"] if r["quantization"] else "refused" if r.get("problem") else "", r["origin"],
          f"{r['qlora_estimate_gb']:.1f} GB" if r["qlora_estimate_gb"] is not None else "?"] for r in rows],
        ["alias", "source", "family", "local", "quantized", "from", "QLoRA est."],
    )
    info("QLoRA est.: peak GPU memory to train with the defaults (4-bit, r=16, micro-batch 2, 512 tokens); "
         "lqmf plan MODEL for other settings")


@app.command("add")
def add(
    ctx: typer.Context,
    alias: str = typer.Argument(..., help="Short name to use in place of the model."),
    source: str = typer.Argument(..., help="Local folder, hub id (org/name) or package:<module>/<dir>."),
    family: str | None = typer.Option(None, "--family", help="Model family for LoRA target defaults."),
    description: str | None = typer.Option(None, "--description", help="One line shown in listings."),
    force: bool = typer.Option(False, "--force", help="Replace an existing workspace alias."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Add an alias to the workspace's configs/models.yaml."""
    catalogue = ModelCatalogue(workspace(ctx, workspace_dir))
    catalogue.add(alias, source, family=family, description=description, force=force)
    if json_output:
        print_json({"alias": alias, "source": source, "file": str(catalogue.workspace.models_file)})
        return
    typer.echo(f"added {alias} -> {source} ({catalogue.workspace.models_file})")


@app.command("make-tiny")
def make_tiny(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="Folder to write the model to."),
    alias: str | None = typer.Option(None, "--alias", help="Also register it under this alias."),
    corpus: list[Path] = typer.Option([], "--corpus", help="Text files to train the tokenizer on (repeatable)."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Leave the tokenizer without one."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing folder."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Build a tiny random 2-layer Llama (and tokenizer) locally: pipelines can be smoke-tested offline."""
    ws = workspace(ctx, workspace_dir)
    target = path if path.is_absolute() else Path.cwd() / path
    if target.exists() and any(target.iterdir()) and not force:
        raise ConflictError(f"'{target}' exists and is not empty; use --force to overwrite it")
    from lqmf.engine.loading import quiet_libraries
    from lqmf.engine.tiny import build_tiny_causal_lm

    texts = []
    for file in corpus:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{file}: cannot read as UTF-8 text ({type(err).__name__})") from None
    quiet_libraries()
    build_tiny_causal_lm(target, corpus=texts, chat_template=not no_chat_template)
    info(f"built a tiny random Llama in {target}")
    if alias:
        ModelCatalogue(ws).add(alias, str(target), family="llama", description="tiny random Llama (tests)",
                               force=True)
        info(f"registered alias '{alias}'")
    if json_output:
        print_json({"path": str(target), "alias": alias})
        return
    typer.echo(str(target))
