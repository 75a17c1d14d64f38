"""Finding and talking to a running `lqmf serve` (no torch, no HTTP library beyond the stdlib).

While it runs, `lqmf serve` records its address in `<workspace>/.lqmf/servers/<pid>.json`
(written atomically, removed on shutdown). A record whose process is gone, or whose pid now
belongs to another process, is stale and ignored (and cleaned up). `notify_server` is what
`lqmf adapters load|switch|unload` call to hot-swap adapters in that server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lqmf.core.errors import ConflictError, InputError, LqmfError, NotFoundError, RuntimeFailure
from lqmf.core.fsutil import atomic_write_json, process_started
from lqmf.core.workspace import Workspace

API_KEY_ENV = "LQMF_API_KEY"
DEFAULT_MODEL = "default"  # the model id that follows the active adapter
DEFAULT_MAX_ADAPTERS = 8  # lqmf serve --max-adapters
ACTIONS = ("load", "switch", "unload")
SWAP_TIMEOUT_S = 600.0  # a swap waits for the requests queued before it
PROBE_TIMEOUT_S = 3.0  # asking a server what it holds
ANSWER_TIMEOUT_S = 600.0  # one answer, queued behind others


def is_loopback(host: str) -> bool:
    """Whether host names this machine only (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress  # not at start-up: status and adapters list import this module

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False



def servers_dir(workspace: Workspace) -> Path:
    return workspace.root / ".lqmf" / "servers"


def connect_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to host."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def server_url(host: str, port: int) -> str:
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def register_server(workspace: Workspace, record: dict[str, Any]) -> Path:
    """Record a running server (this process) in the workspace; returns the record's path."""
    pid = os.getpid()
    path = servers_dir(workspace) / f"{pid}.json"
    atomic_write_json(path, {**record, "pid": pid, "pid_started": process_started(pid)})
    return path


def unregister_server(workspace: Workspace, pid: int | None = None) -> None:
    (servers_dir(workspace) / f"{pid or os.getpid()}.json").unlink(missing_ok=True)


def running_servers(workspace: Workspace) -> list[dict[str, Any]]:
    """The live servers recorded for this workspace, oldest first; stale records are removed."""
    folder = servers_dir(workspace)
    if not folder.is_dir():
        return []
    live = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid, started = int(record["pid"]), record.get("pid_started")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours: leave it
        now_started = process_started(pid)
        if now_started is None or (started is not None and abs(now_started - started) > 1.0):
            path.unlink(missing_ok=True)
            continue
        live.append(record)
    return sorted(live, key=lambda r: r.get("pid_started") or 0)


@contextmanager
def _request(url: str, method: str, route: str, body: dict[str, Any] | None, api_key: str | None,
             timeout: float) -> Iterator[Any]:
    """The open HTTP response of one request; the server's error answers become LqmfError with its message."""
    import urllib.error  # with http.client, ~40 ms to import: only when a server is asked
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + route, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            yield response
    except urllib.error.HTTPError as err:
        raise _http_error(url, err) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RuntimeFailure(f"cannot reach the lqmf server at {url}: {reason}") from None


def call_server(url: str, method: str, route: str, body: dict[str, Any] | None = None,
                api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """One JSON request to an lqmf server; its error answers become LqmfError with the server's message."""
    with _request(url, method, route, body, api_key, timeout) as response:
        return json.loads(response.read() or b"{}")


def stream_server(url: str, route: str, body: dict[str, Any], api_key: str | None = None,
                  timeout: float = ANSWER_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """The server-sent events of one streaming request, as they arrive (an error event raises)."""
    with _request(url, "POST", route, {**body, "stream": True}, api_key, timeout) as response:
        for raw_line in response:
            line = raw_line.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeFailure(f"server {url} failed mid-answer: {event['error'].get('message')}")
            yield event


def _http_error(url: str, err: Any) -> LqmfError:
    try:
        message = json.loads(err.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = err.reason
    if err.code == 401:
        message += f" (set {API_KEY_ENV} or pass --api-key)"
    kind = {400: InputError, 401: InputError, 404: NotFoundError, 409: ConflictError}.get(err.code, RuntimeFailure)
    return kind(f"server {url} answered {err.code}: {message}")


def _pick_server(workspace: Workspace, adapter: str | None, base_ids: set[str] | None) -> dict[str, Any] | None:
    """The server to swap in: the one serving the adapter's base (or one of base_ids), if any runs."""
    servers = running_servers(workspace)
    if base_ids is not None:
        servers = [s for s in servers if _served_ids(s) & base_ids]
    elif adapter is not None:
        recorded = _recorded_base(workspace, adapter)
        if recorded is not None:  # an unknown adapter is left to the server to refuse
            servers = [s for s in servers if _served_ids(s) & recorded]
    if len(servers) > 1:
        urls = ", ".join(s["url"] for s in servers)
        raise InputError(f"several lqmf servers run for this workspace ({urls}): choose one with --server URL")
    return servers[0] if servers else None


def _served_ids(record: dict[str, Any]) -> set[str]:
    served = record.get("base") or {}
    return {served.get(k) for k in ("reference", "source", "path", "alias")} - {None}


def _recorded_base(workspace: Workspace, adapter: str) -> set[str] | None:
    from lqmf.core.registry import Registry

    try:
        recorded = Registry(workspace).get(adapter).manifest["base_model"]
    except (LqmfError, KeyError, TypeError):
        return None
    return {recorded.get(k) for k in ("reference", "source", "path", "alias")} - {None}


def notify_server(workspace: Workspace, action: str, adapter: str | None = None, server_url: str | None = None,
                  api_key: str | None = None, timeout: float = SWAP_TIMEOUT_S,
                  base_ids: set[str] | None = None) -> dict[str, Any] | None:
    """Load, switch or unload an adapter in the running server; None when no server runs.

    server_url names the server; otherwise the one recorded for the workspace that serves the
    adapter's base (or, given base_ids, one of those bases) is used; None when none does. api_key
    defaults to $LQMF_API_KEY. The answer
    says what changed, how (hotswap, load, resident, free) and how long the swap took
    (swap_ms; wait_ms is the time spent waiting for the requests queued before it).
    """
    if action not in ACTIONS:
        raise InputError(f"unknown server action '{action}': use one of {', '.join(ACTIONS)}")
    if action != "unload" and not adapter:
        raise InputError(f"'{action}' needs an adapter name")
    if server_url is None:
        record = _pick_server(workspace, adapter, base_ids)
        if record is None:
            return None
        server_url = record["url"]
    key = api_key or os.environ.get(API_KEY_ENV) or None
    result = call_server(server_url, "POST", f"/admin/adapters/{action}", {"adapter": adapter}, key, timeout)
    return {**result, "server": server_url}


def server_with_adapter(workspace: Workspace, adapter: str, api_key: str | None = None) -> dict[str, Any] | None:
    """The running server of this workspace that holds adapter (its record, with `state`), if any."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    for record in running_servers(workspace):
        try:
            state = call_server(record["url"], "GET", "/admin/adapters", None, key, timeout=PROBE_TIMEOUT_S)
        except LqmfError:
            continue  # busy, stopping or asking for a key we lack: answer locally
        if adapter in (state.get("resident") or []):
            return {**record, "state": state}
    return None


class ServedModel:
    """An adapter (or the bare base) of a running server, answering over HTTP as a local model would.

    served is server_with_adapter's record; model_id an adapter it holds or its base id. What
    `lqmf test` and `lqmf bench` ask of a running server goes through here.
    """

    def __init__(self, served: dict[str, Any], model_id: str, api_key: str | None = None):
        self.url, self.state, self.model_id = served["url"], served["state"], model_id
        self.task = self.state.get("task")
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None

    def runtime(self) -> dict[str, Any]:
        return {"device": self.state.get("device"), "dtype": self.state.get("dtype"),
                "quantized_4bit": self.state.get("quantized_4bit"), "server": self.url}

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """{label: probability} for each text, as engine.inference.classify gives them."""
        answer = call_server(self.url, "POST", "/v1/classify", {"model": self.model_id, "input": texts},
                             self.api_key, timeout=ANSWER_TIMEOUT_S)
        return [row["probabilities"] for row in sorted(answer["data"], key=lambda row: row["index"])]

    def generate(self, prompt: str | list[dict[str, str]], *, max_new_tokens: int, min_new_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, raw: bool = False,
                 on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """One streamed answer: its text, finish reason, token counts and times (seconds, first token).

        A str prompt is formatted as the adapter's task trained it (raw=True: sent as it is);
        min_new_tokens asks for no end of text before that many tokens (vLLM's `min_tokens`).
        """
        body: dict[str, Any] = {"model": self.model_id, "max_tokens": max_new_tokens, "temperature": temperature,
                                "top_p": top_p or None, "seed": seed, "stream_options": {"include_usage": True}}
        if min_new_tokens:
            body["min_tokens"] = min_new_tokens
        if raw:
            route, body["prompt"] = "/v1/completions", prompt
        else:
            route = "/v1/chat/completions"
            from lqmf.core.datasets import prompt_messages  # the data-set layer only when a prompt is sent

            body["messages"] = prompt_messages(self.task, prompt) if isinstance(prompt, str) else prompt
        pieces: list[str] = []
        finish, usage, first = None, {}, None
        started = time.perf_counter()
        for event in stream_server(self.url, route, body, self.api_key):
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = choice.get("text") if raw else (choice.get("delta") or {}).get("content")
                if text:
                    first = first if first is not None else time.perf_counter() - started
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)
                finish = choice.get("finish_reason") or finish
        return {"text": "".join(pieces), "finish_reason": finish, "prompt_tokens": usage.get("prompt_tokens"),
                "new_tokens": usage.get("completion_tokens"), "seconds": time.perf_counter() - started,
                "first_token_seconds": first}

    def memory(self) -> dict[str, Any]:
        """The server's own peak memory report (on a GPU: its peak since it started, over all its requests),
        or a record saying it was not measured (a server on the CPU reports none)."""
        state = call_server(self.url, "GET", "/admin/adapters", None, self.api_key, timeout=PROBE_TIMEOUT_S)
        gpu = state.get("gpu_memory_gb") or {}
        if gpu.get("peak_allocated") is not None:
            return {"kind": "vram", "device": "cuda", "peak_gb": gpu["peak_allocated"],
                    "after_load_gb": gpu.get("allocated"), "source": "server (its peak since it started)"}
        return {"kind": None, "device": self.state.get("device"), "peak_gb": None, "measured": False}


def latest_active_adapter(active: dict[str, dict[str, Any]]) -> str | None:
    """The adapter made active last, over every base (the registry's active pointers)."""
    if not active:
        return None
    return max(active.values(), key=lambda pointer: str(pointer.get("since") or ""))["adapter"]


def quantization_warnings(manifests: dict[str, dict[str, Any]], served_4bit: bool) -> list[str]:
    """A plain warning for each adapter trained on a base quantized otherwise than the one served."""
    warnings = []
    for name, manifest in manifests.items():
        trained = bool((manifest.get("runtime") or {}).get("quantized_4bit"))
        if trained != served_4bit:
            warnings.append(
                f"warning: adapter '{name}' was trained on a {'4-bit' if trained else 'full-precision'} base but the "
                f"served base is {'4-bit' if served_4bit else 'not quantized'}: its answers will differ from "
                f"`lqmf test`; restart with {'--4bit' if trained else '--no-4bit'} to match")
    return warnings
