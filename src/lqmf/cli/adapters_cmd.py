"""`lqmf adapters`: the adapter registry under adapters/."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from lqmf.cli import export_cmd
from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import App, human_size, info, print_json, print_json_rows, print_table
from lqmf.core.errors import InputError, LqmfError
from lqmf.core.integrity import ChecksumCache
from lqmf.core.registry import BROKEN, Registry

app = App(help="Manage trained adapters: list, show, load/switch/unload (the active adapter of each base "
          "model), verify, rename, remove, export.")


def _registry(ctx: typer.Context, workspace_dir: str | None) -> Registry:
    return Registry(workspace(ctx, workspace_dir))


def _metric_text(metric: dict[str, Any] | None) -> str:
    if not metric:
        return ""
    name = metric["name"].removeprefix("eval_")
    return f"{name} {metric['value']:.4g}"


@app.command("list")
def list_adapters(
    ctx: typer.Context,
    task: str | None = typer.Option(None, "--task", help="Only adapters for this task."),
    base: str | None = typer.Option(None, "--base", help="Only adapters of this base model (alias, folder, hub id)."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """List adapters: base model, task, rank, size, created, key metric; * marks the active one.

    Folders that are not complete adapters (crashed runs, missing files) are listed as broken,
    runs still going as training; neither is usable.
    """
    registry = _registry(ctx, workspace_dir)
    if task:
        from lqmf.core.config import normalize_task

    wanted_task = normalize_task(task) if task else None
    matches = registry.base_selector(base) if base else None
    active = registry.active_pointers(strict=False)
    checksums = ChecksumCache(registry.workspace.root)
    if not (wanted_task or matches):  # every adapter: the cached rows (fast with 1,000s)
        listed = registry.listing(active, checksums)
        checksums.save()
        if json_output:
            typer.echo("[\n" + ",\n".join(a.json_line() for a in listed) + "\n]" if listed else "[]")
            return
    rows = [a.row() for a in listed] if not (wanted_task or matches) else []
    for entry in registry.entries() if (wanted_task or matches) else []:
        if not entry.complete:
            continue
        row = registry.summary(entry, active, checksums)
        if wanted_task and row["task"] != wanted_task:
            continue
        if matches and not matches(row["base_id"], row["base_model"], entry.base_model.get("source"),
                                   entry.base_model.get("path")):
            continue
        rows.append(row)
    checksums.save()
    if json_output:
        print_json_rows(rows)
        return
    if not rows:
        info(f"no adapters in {registry.root}" + (" match" if task or base else ""))
        return
    table = []
    for r in rows:
        state = r["state"] if r["problem"] is None else f"{r['state']}: {r['problem']}"
        if r["state"] not in ("ok", "corrupt", "suspect"):
            table.append(["", r["name"], "", "", "", "", "", "", state])
            continue
        created = (r["created"] or "")[:16].replace("T", " ")
        table.append(["*" if r["active"] else "", r["name"], r["base_model"] or "?", r["task"] or "?",
                      r["rank"] if r["rank"] is not None else "?", human_size(r["size_bytes"]), created,
                      _metric_text(r["metric"]) + (" (no gain!)" if r["improved"] is False else ""), state])
    print_table(table, ["", "name", "base model", "task", "r", "size", "created", "metric", "state"])


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Adapter name."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Show an adapter's manifest, resolved config, metrics, and files with sizes and checksums."""
    registry = _registry(ctx, workspace_dir)
    entry = registry.get(name)
    row = registry.summary(entry)
    manifest = entry.manifest or {}
    if json_output:
        print_json({"name": entry.name, "path": str(entry.path), "active": row["active"], "base_id": row["base_id"],
                    "size_bytes": row["size_bytes"], "manifest": manifest})
        return
    base = entry.base_model
    lora = manifest.get("lora") or {}
    runtime = manifest.get("runtime") or {}
    dataset = manifest.get("dataset") or {}
    lines = [
        ("name", entry.name + ("   (active)" if row["active"] else "")),
        ("path", str(entry.path)),
        ("base model", f"{base.get('reference')} -> {base.get('source')}" + (f" ({base['family']})"
                                                                              if base.get("family") else "")),
        ("task", manifest.get("task")),
        ("created", manifest.get("created")),
        ("lora", f"r={lora.get('r')} alpha={lora.get('alpha')} dropout={lora.get('dropout')} "
                 f"targets={lora.get('target_modules')}"),
        ("dataset", f"{dataset.get('path')} ({dataset.get('rows')} rows, sha256 {str(dataset.get('sha256'))[:12]})"),
        ("trained on", f"{runtime.get('device')} {runtime.get('dtype')}"
                       + (" 4-bit NF4 (QLoRA)" if runtime.get("quantized_4bit") else "")),
        ("size", human_size(row["size_bytes"])),
    ]
    lineage = manifest.get("lineage")
    if isinstance(lineage, dict):
        details = {k: v for k, v in lineage.items() if k in ("method", "weights", "rank", "energy", "dtype", "trial")
                   and v is not None}
        sources = ", ".join(s.get("name", "?") for s in lineage.get("sources") or [])
        lines.append(("made by", f"{lineage.get('operation')}" + (f" of {sources}" if sources else "")
                      + "".join(f" {k}={v}" for k, v in details.items())))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key:<{width}}  {value}")
    metrics = manifest.get("metrics") or {}
    if metrics:
        typer.echo("\nmetrics")
        for key, value in metrics.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.4g}"
            typer.echo(f"  {key:<20} {value}")
    config = manifest.get("config") or {}
    if config:
        typer.echo("\nconfig")
        for key, value in config.items():
            typer.echo(f"  {key:<28} {value}")
    files = manifest.get("files") or {}
    if files:
        typer.echo("\nfiles")
        print_table([[rel, human_size(f.get("size", 0)), f.get("sha256", "")] for rel, f in files.items()],
                    ["file", "size", "sha256"])


def _tell_server(ctx: typer.Context, action: str, name: str | None, server: str | None,
                 workspace_dir: str | None, base_ids: set[str] | None = None) -> dict | None:
    """Swap the adapter in the running `lqmf serve` of its base model (or at --server); None when none runs."""
    from lqmf.core.serving import notify_server

    return notify_server(workspace(ctx, workspace_dir), action, name, server_url=server, base_ids=base_ids)


def _server_line(result: dict | None) -> str:
    if result is None:
        return ""
    evicted = result.get("evicted") or []
    return (f"; server {result['server']}: {result['method']} in {result['swap_ms']:.1f} ms"
            + (f"; evicted {', '.join(evicted)} (no longer resident)" if evicted else ""))


def _activate(ctx: typer.Context, action: str, name: str, server: str | None, json_output: bool,
              workspace_dir: str | None) -> None:
    registry = _registry(ctx, workspace_dir)
    registry.get_intact(name)  # a missing, broken or corrupt adapter fails here, before any server is asked
    served = _tell_server(ctx, action, name, server, workspace_dir)  # a refusal leaves the registry as it was
    change = registry.activate(name)
    for note in (served or {}).get("notes") or []:
        info(f"warning: {note}")
    if json_output:
        print_json({**change, "server": served})
        return
    was = f" (was {change['previous']})" if change["previous"] else ""
    typer.echo(f"{change['adapter']} is now the active adapter of {change['base_model']}{was}{_server_line(served)}")


NameArgument = typer.Argument(..., help="Adapter name.")
ServerOption = typer.Option(None, "--server", help="URL of the `lqmf serve` to swap in (default: the one "
                            "running for this workspace, if any).")


@app.command("load")
def load(ctx: typer.Context, name: str = NameArgument, server: str | None = ServerOption,
         json_output: bool = JsonOption, workspace_dir: str | None = WorkspaceOption) -> None:
    """Make NAME the active adapter of its base model (adapters/.active.json) and load it into a running server."""
    _activate(ctx, "load", name, server, json_output, workspace_dir)


@app.command("switch")
def switch(ctx: typer.Context, name: str = NameArgument, server: str | None = ServerOption,
           json_output: bool = JsonOption, workspace_dir: str | None = WorkspaceOption) -> None:
    """Switch the active adapter of NAME's base model to NAME, hot-swapping a running server without a restart."""
    _activate(ctx, "switch", name, server, json_output, workspace_dir)


@app.command("unload")
def unload(
    ctx: typer.Context,
    base: str | None = typer.Option(None, "--base", help="The base model whose adapter to unload "
                                    "(needed when several base models have one)."),
    everything: bool = typer.Option(False, "--all", help="Unload the active adapter of every base model."),
    server: str | None = ServerOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Clear the active adapter (of one base model, or --all), in the registry and a running server."""
    if base and everything:
        raise InputError("give --base or --all, not both")
    cleared = _registry(ctx, workspace_dir).deactivate(base, everything)
    served = None
    if cleared or server:  # only servers of the bases whose adapter was unloaded
        served = _tell_server(ctx, "unload", None, server, workspace_dir,
                              base_ids=None if server else {item["base_id"] for item in cleared})
    if json_output:
        print_json({"unloaded": cleared, "server": served})
        return
    if not cleared:
        info("no active adapter" + (f" for {base}" if base else ""))
    for item in cleared:
        typer.echo(f"unloaded {item['adapter']} from {item.get('base_model') or item['base_id']}")
    if served is not None:
        typer.echo(f"server {served['server']}: unloaded in {served['swap_ms']:.1f} ms")


@app.command("history")
def history(ctx: typer.Context, name: str = NameArgument, json_output: bool = JsonOption,
            workspace_dir: str | None = WorkspaceOption) -> None:
    """NAME's learned versions (lqmf learn): parent, feedback used, scores, and which one is active."""
    from lqmf.core.learning import current_member, family_members, family_root

    registry = _registry(ctx, workspace_dir)
    members = family_members(registry, family_root(registry, name))
    active = {p["adapter"] for p in registry.active_pointers(strict=False).values()}
    current = current_member(registry, members)
    rows = [{**m, "feedback": len(m["feedback"]), "active": m["name"] in active, "current": m["name"] == current}
            for m in members]
    if json_output:
        print_json_rows(rows)
        return

    def scores(member: dict[str, Any]) -> str:
        new = ((member.get("evaluation") or {}).get("new") or {}).get("original") or {}
        return ", ".join(f"{k} {v:.4g}" for k, v in new.items())

    print_table([[("* " if r["active"] else "  ") + r["name"], r["version"], r["parent"] or "", r["feedback"],
                  scores(r), r["created"] or ""] for r in rows],
                ["version", "n", "parent", "feedback used", "original held-out", "created"])


@app.command("rollback")
def rollback(ctx: typer.Context, name: str = NameArgument,
             to: str | None = typer.Option(None, "--to", help="The version to go back to (default: the parent of "
                                           "the family's current version)."),
             server: str | None = ServerOption, json_output: bool = JsonOption,
             workspace_dir: str | None = WorkspaceOption) -> None:
    """Make an earlier version of NAME's family active again, hot-swapping a running server."""
    from lqmf.core.learning import current_member, family_members, family_root

    registry = _registry(ctx, workspace_dir)
    members = family_members(registry, family_root(registry, name))
    current = current_member(registry, members)
    target = to or next(m["parent"] for m in members if m["name"] == current)
    if target is None:
        raise InputError(f"{current} is the first version of its family: there is nothing to roll back to")
    if target not in {m["name"] for m in members}:
        raise InputError(f"--to {target}: not a version of {members[0]['name']} "
                         f"({', '.join(m['name'] for m in members)})")
    _activate(ctx, "switch", target, server, json_output, workspace_dir)


def _confirm(question: str) -> None:
    """Ask on a terminal; off a terminal (cron, CI) refuse, so that only --yes removes."""
    if not sys.stdin.isatty():
        raise InputError(f"not removing without confirmation ({question}): pass --yes")
    if not typer.confirm(question[0].upper() + question[1:] + "?", default=False):
        raise LqmfError("nothing removed")


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Adapter name (its unfinished run, if any, goes too)."),
    broken: bool = typer.Option(False, "--broken", help="Remove every broken folder instead (crashed runs, "
                                "incomplete folders); runs still training are kept."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (needed off a terminal)."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Remove an adapter (or every broken folder with --broken) from adapters/."""
    registry = _registry(ctx, workspace_dir)
    if bool(name) == broken:
        raise InputError("give an adapter NAME or --broken")
    if broken:
        victims = [e.path.name for e in registry.entries() if e.state == BROKEN]
        if victims and not yes:
            _confirm(f"remove {len(victims)} broken folder{'s' if len(victims) > 1 else ''} "
                     f"({', '.join(victims)})")
        removed = registry.remove_broken()
    else:
        if not yes:
            _confirm(f"remove adapter '{name}'")
        removed = registry.remove(name)
    if json_output:
        print_json({"removed": removed})
        return
    if not removed:
        info("nothing to remove")
    for folder in removed:
        typer.echo(f"removed {registry.root / folder}")


@app.command("rename")
def rename(
    ctx: typer.Context,
    old: str = typer.Argument(..., help="Current adapter name."),
    new: str = typer.Argument(..., help="New adapter name."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Rename an adapter; an active adapter stays active under its new name."""
    target = _registry(ctx, workspace_dir).rename(old, new)
    if json_output:
        print_json({"old": old, "new": new, "path": str(target)})
        return
    typer.echo(f"renamed {old} -> {new}")


@app.command("verify")
def verify(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Adapter name; default: every adapter."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Check files against the manifest's checksums and LoRA modules against the base model's weights.

    Exits 1 when any adapter fails.
    """
    registry = _registry(ctx, workspace_dir)
    entries = [registry.get(name)] if name else registry.entries()
    reports = [registry.verify(entry) for entry in entries]
    failed = [r for r in reports if not r.ok]
    if json_output:
        print_json({"ok": not failed, "adapters": [r.to_dict() for r in reports]})
    else:
        if not reports:
            info(f"no adapters in {registry.root}")
        for report in reports:
            typer.echo(f"{'ok    ' if report.ok else 'FAILED'}  {report.name}")
            for problem in report.problems:
                typer.echo(f"        problem: {problem}")
            for note in report.notes:
                typer.echo(f"        note: {note}")
        if failed:
            info(f"{len(failed)} of {len(reports)} adapter{'s' if len(reports) > 1 else ''} failed verification")
    if failed:
        raise typer.Exit(1)


EvalFileOption = typer.Option(None, "--eval-file", help="Score the result on this file (the task's dataset "
                              "format) instead of the source adapter's held-out validation split.")
MinMetricOption = typer.Option(None, "--min-metric", help="Quality gate (classification): refuse to register "
                               "a result whose held-out accuracy is below this.")
MaxLossOption = typer.Option(None, "--max-loss", help="Quality gate (any task): refuse to register a result "
                             "whose held-out loss is above this.")
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda | mps")
ForceOption = typer.Option(False, "--force", help="Replace an existing adapter of the new name.")


def _scores_text(scores: dict[str, float] | None) -> str:
    if not scores:
        return "n/a"
    return ", ".join(f"{k} {scores[k]:.4f}" for k in ("loss", "accuracy", "macro_f1") if k in scores)


@app.command("combine")
def combine(
    ctx: typer.Context,
    new: str = typer.Argument(..., help="Name of the new adapter."),
    sources: list[str] = typer.Argument(..., help="Two or more adapters of one base model and task."),
    method: str = typer.Option("linear", "--method", help="linear | svd | cat | ties | dare_ties | dare_linear "
                               "(PEFT's add_weighted_adapter)."),
    weights: str | None = typer.Option(None, "--weights", help="One weight per source, e.g. 0.7,0.3 "
                                       "(default: equal weights summing to 1)."),
    density: float | None = typer.Option(None, "--density", help="Share of values kept by ties / dare_* "
                                         "(default 0.5 for those)."),
    eval_file: Path | None = EvalFileOption,
    min_metric: float | None = MinMetricOption,
    max_loss: float | None = MaxLossOption,
    device: str = DeviceOption,
    force: bool = ForceOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Combine adapters into a new registered adapter NEW (weighted, with PEFT's add_weighted_adapter).

    The result is scored on the first source's held-out split (or --eval-file) and its lineage
    (sources, method, weights) is kept in its manifest.
    """
    from lqmf.core.derived import DENSITY_METHODS, Gate, parse_weights
    from lqmf.engine.derive import combine_adapters

    ws = workspace(ctx, workspace_dir)
    if density is None and method in DENSITY_METHODS:
        density = 0.5
    result = combine_adapters(ws, new, sources, method, parse_weights(weights, len(sources)), density,
                              ws.resolve_path(eval_file) if eval_file else None, Gate(min_metric, max_loss),
                              device, force, progress=(lambda m: None) if json_output else info)
    if json_output:
        print_json(result)
        return
    lineage = result["lineage"]
    scores = (result["quality"] or {}).get("scores")
    info(f"{method} of {', '.join(f'{s} x{w:g}' for s, w in zip(sources, lineage['weights'], strict=True))}: "
         f"r={result['lora']['r']}, {human_size(result['size_bytes'])}; held-out: {_scores_text(scores)}")
    info(f"saved {result['path']}")
    typer.echo(new)


@app.command("compress")
def compress(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Adapter to compress."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="New LoRA rank (SVD of each B@A)."),
    energy: float | None = typer.Option(None, "--energy", help="Keep per module the fewest singular values "
                                        "holding this share of the squared sum, e.g. 0.95."),
    dtype: str | None = typer.Option(None, "--dtype", help="Store the weights as bf16 | fp16 | fp32."),
    new: str | None = typer.Option(None, "--name", "-n", help="Register the result as this new adapter."),
    in_place: bool = typer.Option(False, "--in-place", help="Replace NAME itself (staged, then renamed into "
                                  "place: a crash keeps the old version)."),
    eval_file: Path | None = EvalFileOption,
    min_metric: float | None = MinMetricOption,
    max_loss: float | None = MaxLossOption,
    device: str = DeviceOption,
    force: bool = ForceOption,
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Shrink an adapter: SVD rank reduction of each LoRA pair and/or half-precision storage.

    Prints the size before/after and, when the held-out split can be rebuilt (or --eval-file), the
    metric before/after.
    """
    from lqmf.core.derived import Gate, check_compress
    from lqmf.engine.derive import compress_adapter

    torch_dtype = check_compress(rank, energy, dtype, new, in_place)
    ws = workspace(ctx, workspace_dir)
    result = compress_adapter(ws, name, new, rank, energy, torch_dtype,
                              ws.resolve_path(eval_file) if eval_file else None, Gate(min_metric, max_loss),
                              device, force, progress=(lambda m: None) if json_output else info)
    if json_output:
        print_json(result)
        return
    size, ranks, scores = result["size_bytes"], result["rank"], result["scores"]
    typer.echo(f"size:  {human_size(size['before'])} -> {human_size(size['after'])} "
               f"({size['after'] / size['before']:.0%})")
    typer.echo(f"rank:  {ranks['before']} -> {ranks['after']}" + (f", stored as {dtype}" if dtype else ""))
    if scores["after"]:
        typer.echo(f"held-out: {_scores_text(scores['before'])} -> {_scores_text(scores['after'])}")
    else:
        info("note: no held-out data to score on (pass --eval-file)")
    info(f"saved {result['path']}")


app.command("export")(export_cmd.export)
