"""Show GPUs, CPU, RAM, disk, library versions and the adapter registry (no torch unless --gpu)."""

from __future__ import annotations

import os
import platform
from typing import Any

import typer

from lqmf import __version__
from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import print_json, print_table
from lqmf.core.registry import CORRUPT, OK, Registry
from lqmf.core.system import cpu_and_ram, disk, gpus, library_versions, platform_name
from lqmf.core.workspace import Workspace


def adapter_summary(registry: Registry) -> dict[str, Any]:
    listed = registry.listing()  # cached rows: fast with 1,000 adapters
    complete = (OK, CORRUPT)
    return {
        "path": str(registry.root),
        "count": sum(1 for a in listed if a.state in complete),
        "broken": [{"name": a.name, "problem": a.problem} for a in listed if a.state not in complete],
        "active": active_adapters(registry),
    }


def active_adapters(registry: Registry) -> list[dict[str, Any]]:
    """The active adapter of each base model, from the registry's active pointer."""
    return [{"base": base, **pointer} for base, pointer in sorted(registry.active_pointers(strict=False).items())]


def running_servers(ws: Workspace) -> list[dict[str, Any]]:
    """Each live `lqmf serve` of this workspace with the adapters it holds (asked over loopback)."""
    from lqmf.core.errors import LqmfError
    from lqmf.core.serving import API_KEY_ENV, call_server, running_servers

    servers = []
    for record in running_servers(ws):
        entry = {"url": record["url"], "pid": record["pid"], "base": record["base_id"], "task": record.get("task"),
                 "recording": bool(record.get("recording"))}
        try:
            state = call_server(record["url"], "GET", "/admin/adapters", api_key=os.environ.get(API_KEY_ENV),
                                timeout=2.0)
            entry.update(active=state.get("active"), adapters=state.get("resident"), device=state.get("device"),
                         evictions=state.get("evictions") or [], batching=state.get("batching"))
        except LqmfError as err:
            entry["error"] = err.message
        servers.append(entry)
    return servers


def status(
    ctx: typer.Context,
    gpu: bool = typer.Option(False, "--gpu", help="Also ask PyTorch for GPU details (imports torch: slower)."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Show GPUs, CPU, RAM, disk, library versions and the adapter registry (fast: no torch unless --gpu)."""
    ws = workspace(ctx, workspace_dir)
    report: dict[str, Any] = {
        "lqmf": __version__, "python": platform.python_version(), "platform": platform_name(),
        "workspace": str(ws.root),
        **gpus(),
        **cpu_and_ram(),
        "disk": disk(ws.root),
        "versions": library_versions(),
        "adapters": adapter_summary(Registry(ws)),
        "serve": running_servers(ws),
    }
    if gpu:
        from lqmf.engine.train.memory import torch_gpu_details

        report["torch"] = torch_gpu_details()
    if json_output:
        print_json(report)
        return
    _print_status(report)


def _print_status(report: dict[str, Any]) -> None:
    typer.echo(f"lqmf {report['lqmf']} (Python {report['python']}, {report['platform']})")
    if report["gpus"]:
        typer.echo(f"GPUs (driver {report['gpus'][0]['driver']}, CUDA {report['cuda_version'] or '?'}):")
        print_table([[g["index"], g["name"], _gb(g["memory_total_gb"]), _gb(g["memory_used_gb"]),
                      _gb(g["memory_free_gb"]), f"{g['utilization_pct']:.0f}%" if g["utilization_pct"] is not None
                      else "?"] for g in report["gpus"]],
                    ["#", "name", "total", "used", "free", "util"])
    else:
        typer.echo(f"GPUs: none ({report['gpu_problem']})")
    torch_info = report.get("torch")
    if torch_info:
        if torch_info["cuda_available"]:
            for dev in torch_info["devices"]:
                typer.echo(f"torch sees cuda:{dev['index']} {dev['name']}: compute capability "
                           f"{dev['capability']}, bf16 {'yes' if dev['bf16'] else 'no'}, "
                           f"{dev['free_gb']:.2f} of {dev['total_gb']:.2f} GB free")
        typer.echo(f"torch {torch_info['torch']} built for CUDA {torch_info['cuda_build'] or 'none'}"
                   + ("" if torch_info["cuda_available"] else f"; no CUDA device ({torch_info['problem']})"))
    cpu, ram, disk_info = report["cpu"], report["ram"], report["disk"]
    typer.echo(f"CPU: {cpu['model']}, {cpu['physical_cores']} cores / {cpu['logical_cores']} threads"
               + (f", load {' '.join(str(x) for x in cpu['load_average'])}" if cpu["load_average"] else ""))
    typer.echo(f"RAM: {ram['available_gb']:.1f} GB available of {ram['total_gb']:.1f} GB")
    typer.echo(f"disk: {disk_info['free_gb']:.1f} GB free of {disk_info['total_gb']:.1f} GB ({disk_info['path']})")
    typer.echo("libraries: " + ", ".join(f"{k} {v or 'missing'}" for k, v in report["versions"].items()))
    adapters = report["adapters"]
    line = f"adapters: {adapters['count']} in {adapters['path']}"
    if adapters["broken"]:
        line += f", {len(adapters['broken'])} broken (" + ", ".join(b["name"] for b in adapters["broken"]) + ")"
    typer.echo(line)
    if adapters["active"]:
        typer.echo("active: " + ", ".join(f"{a['adapter']} (on {a.get('base_model') or a['base']})"
                                          for a in adapters["active"]))
    for server in report["serve"]:
        held = ", ".join(server.get("adapters") or []) or "no adapters"
        state = f"error: {server['error']}" if "error" in server else f"active {server.get('active') or 'none'}"
        recording = "; recording answers (learning/completions.jsonl)" if server.get("recording") else ""
        typer.echo(f"serving: {server['base']} at {server['url']} (pid {server['pid']}): {held}; {state}{recording}")
        for eviction in server.get("evictions") or []:
            typer.echo(f"  evicted {eviction['adapter']}: {eviction['reason']}")


def _gb(value: float | None) -> str:
    return f"{value:.1f} GB" if value is not None else "?"
