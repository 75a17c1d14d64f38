"""`lqmf serve`: a base model and hot-swappable adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
import time

import typer

from lqmf.cli.common import JsonOption, WorkspaceOption, workspace
from lqmf.cli.output import info, print_json
from lqmf.cli.phases import importing, show_phases
from lqmf.core.errors import InputError
from lqmf.core.manifest import now_iso
from lqmf.core.memory_plan import parse_size
from lqmf.core.registry import Registry
from lqmf.core.serving import (
    API_KEY_ENV,
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MODEL,
    is_loopback,
    latest_active_adapter,
    quantization_warnings,
    register_server,
    server_url,
    unregister_server,
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _manifests(registry: Registry, names) -> dict[str, dict]:
    """The manifests of registered adapters among names (NAME=PATH adapters are not in the registry)."""
    return {name: registry.get(name).manifest or {} for name in names if registry.exists(name)}


def serve(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Base model: alias, hub id or folder (default: the first adapter's base; "
                                     "with no --adapter either, the active adapter's)."),
    adapters: list[str] = typer.Option([], "--adapter", "-a",
                                       help="Adapter to load at start: a registry name, or NAME=PATH for an adapter "
                                       "folder (repeatable; the first is the active one)."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on. Loopback by default; another address exposes the server "
                             "to the network, so use --api-key there."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port to listen on (0: any free one)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
                                       help="Require 'Authorization: Bearer KEY' on every route but /health."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    four_bit: bool | None = typer.Option(None, "--4bit/--no-4bit",
                                         help="Load the base in 4-bit (default: as the first adapter was trained)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1,
                                       help="The most tokens one request may generate (the default for chat)."),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens", min=1,
                                                 help="The longest prompt accepted, in tokens (default: the "
                                                 "model's context length)."),
    max_batch: int | None = typer.Option(None, "--max-batch", min=1, max=256,
                                         help="Sequences decoded together (default: what fits --max-memory on a "
                                         "GPU, at most 64; 8 on the CPU)."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", min=2,
                                           help="Tokens one sequence may hold, prompt and answer (default: the "
                                           "model's context, at most 2048)."),
    max_queue: int | None = typer.Option(None, "--max-queue", min=0,
                                         help="Requests that may wait for a free sequence before the server "
                                         "answers 429 (default: 4 x --max-batch)."),
    max_adapters: int = typer.Option(DEFAULT_MAX_ADAPTERS, "--max-adapters", min=1,
                                     help="Adapters resident at once; loading another evicts the least recently "
                                     "used (and says so). Their LoRA tables count in the memory plan that picks "
                                     "--max-batch (lqmf plan MODEL --serve-adapters K shows it)."),
    max_memory: str | None = typer.Option(None, "--max-memory",
                                          help="GPU memory budget for weights, adapters and KV cache, e.g. 8GB "
                                          "(default: the free memory)."),
    log_level: str = typer.Option("info", "--log-level", help="critical | error | warning | info | debug"),
    record_answers: bool = typer.Option(False, "--record", help="Keep every answer (id, adapter, prompt, answer, "
                                        "time) in learning/completions.jsonl, owner-only, and take feedback on it "
                                        "(POST /v1/feedback; lqmf feedback, lqmf learn). Off by default."),
    json_output: bool = JsonOption,
    workspace_dir: str | None = WorkspaceOption,
) -> None:
    """Serve a base model and hot-swappable adapters over an OpenAI-compatible API.

    A request's "model" picks what answers: an adapter by name, the base
    by its id, or "default" (the active adapter; the base when none is).
    `lqmf adapters load|switch|unload` swap adapters without a restart.
    Once ready, the URL is printed on stdout (JSON with --json) and
    recorded in the workspace until the server stops (Ctrl-C, SIGTERM).
    """
    ws = workspace(ctx, workspace_dir)
    registry = Registry(ws)
    adapters = _adapters_to_serve(registry, model, adapters)
    _check_serve_options(max_memory, log_level, host, api_key)
    show_phases(ctx, not json_output)
    importing()
    server_mod = _server_module()
    sock = server_mod.bind_socket(host, port)
    try:
        bound_port = sock.getsockname()[1]
        url = server_url(host, bound_port)
        batching = (max_batch, max_seq_len, max_queue, max_adapters, parse_size(max_memory) if max_memory else None)
        model_host = _start_host(ws, registry, model, adapters, batching, device=device, quantize_4bit=four_bit,
                                 max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
        record = _server_record(ws, model_host, url, host, bound_port, bool(api_key), record_answers)
        app = server_mod.create_app(model_host, api_key=api_key,
                                    on_ready=lambda: _announce_ready(ws, record, model_host, json_output),
                                    on_stop=lambda: unregister_server(ws),
                                    recorder=_recorder(ws, model_host.model.task) if record_answers else None)
        try:
            server_mod.run_server(app, sock, log_level)
        finally:
            model_host.close()
    finally:
        unregister_server(ws)
        sock.close()


def _adapters_to_serve(registry: Registry, model: str | None, adapters: list[str]) -> list[str]:
    """The adapters given, or with neither a model nor an adapter given, the active adapter."""
    if model or adapters:
        return adapters
    active = latest_active_adapter(registry.active_pointers(strict=False))
    if active is None:
        raise InputError("no adapter is active: give a base model (--model) or an adapter (--adapter), "
                         "or make one active with `lqmf adapters load NAME`")
    info(f"serving the active adapter '{active}' on its base model (give --model or --adapter to choose)")
    return [active]


def _check_serve_options(max_memory: str | None, log_level: str, host: str, api_key: str | None) -> None:
    if max_memory:
        try:
            parse_size(max_memory)
        except ValueError as err:
            raise InputError(f"--max-memory: {err}") from None
    if log_level not in LOG_LEVELS:
        raise InputError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    if not is_loopback(host) and not api_key:
        info(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model "
             "and swap its adapters")


def _server_module():
    """engine/serve/server.py, or a clear error when FastAPI or uvicorn is missing."""
    try:
        from lqmf.engine.serve import server as server_mod
    except ImportError as err:
        raise InputError(f"lqmf serve needs FastAPI and uvicorn ({err.name} is missing): "
                         "pip install 'lqmf[serve]'") from None
    return server_mod


def _start_host(ws, registry: Registry, model: str | None, adapters: list[str], batching: tuple, **options):
    """Load the model host (engine/serve/host.py; batching: BatchSettings' fields) and warn about adapters
    trained on another quantization."""
    from lqmf.engine.serve.host import BatchSettings, ModelHost

    info(f"loading {model or adapters[0]} ...")
    model_host = ModelHost.start(ws, base=model, adapters=adapters, batching=BatchSettings(*batching), **options)
    for line in quantization_warnings(_manifests(registry, model_host.resident), model_host.model.loaded.quantized):
        info(line)
    if model_host.captures_graphs:
        info("capturing CUDA graphs for every batch and prompt shape ...")
        started = time.perf_counter()
        captured = model_host.capture_graphs()
        info(f"captured {captured} CUDA graphs in {time.perf_counter() - started:.1f} s")
    return model_host


def _server_record(ws, model_host, url: str, host: str, port: int, api_key_required: bool,
                   recording: bool) -> dict:
    """What the workspace records about the running server (core/serving.py finds it there)."""
    base = model_host.model.base
    return {"url": url, "host": host, "port": port, "base_id": model_host.base_id,
            "base": {"reference": base.reference, "source": base.source, "alias": base.alias,
                     "path": str(base.path) if base.path else None},
            "task": model_host.model.task, "api_key_required": api_key_required, "workspace": str(ws.root),
            "started": now_iso(), "recording": recording}


def _announce_ready(ws, record: dict, model_host, json_output: bool) -> None:
    """Once the server listens: record it in the workspace, print its URL (or JSON), say what it serves."""
    path = register_server(ws, record)
    if json_output:
        print_json({**record, "pid": os.getpid(), "record": str(path), "active": model_host.active,
                    "adapters": list(model_host.resident)})
    else:
        typer.echo(record["url"])
    url = record["url"]
    resident = ", ".join(f"{n} (active)" if n == model_host.active else n for n in model_host.resident)
    info(f"serving {model_host.base_id} on {model_host.model.loaded.device}"
         f"{' with ' + resident if resident else ''} at {url}; model ids: {DEFAULT_MODEL}, "
         f"{model_host.base_id}{', ' + ', '.join(model_host.resident) if resident else ''}. Ctrl-C stops it.")
    batching = model_host.describe()["batching"]
    info(f"continuous batching: up to {batching['max_batch']} sequences of {batching['max_seq_len']} tokens, "
         f"{batching['max_queue']} more waiting; up to {model_host.batching.max_adapters} adapters resident "
         f"(LoRA tables {batching['adapter_tables_gb']:.2f} GB)" if batching else
         "one request at a time (LQMF_FAST=0, a classification model, or a model the batched decoder "
         "does not run)")


def _recorder(ws, task: str):
    from lqmf.engine.serve.recording import Recorder

    recorder = Recorder(ws, task)
    info(f"recording every answer in {recorder.log.path} (owner-only); feedback: POST /v1/feedback")
    return recorder
