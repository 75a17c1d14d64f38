"""Server discovery without a server: the workspace records, stale ones, and notify_server's choices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lqmf.core.errors import InputError, RuntimeFailure
from lqmf.core.serving import (
    notify_server,
    process_started,
    register_server,
    running_servers,
    server_url,
    servers_dir,
)
from lqmf.core.workspace import Workspace


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return server_url("127.0.0.1", port)  # nothing listens there any more


def fake_record(ws: Workspace, pid: int, base: str, url: str | None = None, started: float | None = None) -> Path:
    path = servers_dir(ws) / f"{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": url or closed_port_url(), "pid": pid, "base": {"reference": base},
                                "pid_started": process_started(pid) if started is None else started}))
    return path


def fake_adapter(ws: Workspace, name: str, base: str) -> None:
    folder = ws.adapters_dir / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "lqmf.json").write_text(json.dumps({"name": name, "task": "chat", "base_model": {"reference": base}}))


def test_records_of_live_servers_are_found_and_stale_ones_removed(workspace):
    ws = Workspace(workspace)
    mine = register_server(ws, {"url": "http://127.0.0.1:1", "base": {"reference": "m"}})
    assert json.loads(mine.read_text())["pid"] == os.getpid()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = fake_record(ws, int(finished.stdout), "m", started=1.0)
    reused = fake_record(ws, os.getppid(), "m", started=12.0)  # the pid now belongs to another process
    (servers_dir(ws) / "partial.json").write_text("{")
    assert [r["pid"] for r in running_servers(ws)] == [os.getpid()]
    assert not dead.exists() and not reused.exists()
    assert (servers_dir(ws) / "partial.json").exists()  # not a record we can judge: left alone


def test_notify_server_without_a_server_or_with_bad_arguments(workspace):
    ws = Workspace(workspace)
    assert notify_server(ws, "switch", "anything") is None
    with pytest.raises(InputError, match="unknown server action"):
        notify_server(ws, "reload", "x")
    with pytest.raises(InputError, match="needs an adapter"):
        notify_server(ws, "switch", None)


def test_notify_server_picks_the_server_of_the_adapters_base(workspace):
    ws = Workspace(workspace)
    fake_adapter(ws, "legal", base="llama-7b")
    chat_url, legal_url = closed_port_url(), closed_port_url()
    fake_record(ws, os.getpid(), "mistral-7b", url=chat_url)
    fake_record(ws, os.getppid(), "llama-7b", url=legal_url)
    with pytest.raises(RuntimeFailure, match=f"cannot reach the lqmf server at {legal_url}"):
        notify_server(ws, "switch", "legal")
    with pytest.raises(InputError, match="several lqmf servers"):
        notify_server(ws, "unload")
    with pytest.raises(RuntimeFailure, match=chat_url):
        notify_server(ws, "unload", server_url=chat_url)
