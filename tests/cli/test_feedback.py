"""Loading phases on stderr, and serve/test consistency with a running server."""

from __future__ import annotations

import json

from lqmf.core.serving import latest_active_adapter, quantization_warnings
from tests.helpers import running_server


def test_model_loading_phases_go_to_stderr(adapters_workspace, run_lqmf):
    done = run_lqmf("test", "chat-a", "Where is my order?", "--max-new-tokens", "3", "--local",
                    cwd=adapters_workspace)
    assert done.returncode == 0, done.stderr
    phases = [line for line in done.stderr.splitlines() if line.startswith("[") and "s] " in line]
    text = "\n".join(phases)
    assert "importing torch and transformers" in text
    assert "loading base model" in text and "loading adapter chat-a" in text
    assert "s] " not in done.stdout  # the answer alone on stdout
    quiet = run_lqmf("test", "chat-a", "Where is my order?", "--max-new-tokens", "3", "--local", "--json",
                     cwd=adapters_workspace)
    assert quiet.returncode == 0 and "loading base model" not in quiet.stderr
    json.loads(quiet.stdout)


def test_quantization_warnings_name_the_mismatch():
    manifests = {"q": {"runtime": {"quantized_4bit": True}}, "f": {"runtime": {"quantized_4bit": False}}}
    full = quantization_warnings(manifests, served_4bit=False)
    assert len(full) == 1 and "'q' was trained on a 4-bit base" in full[0] and "--4bit" in full[0]
    assert quantization_warnings(manifests, served_4bit=True)[0].startswith("warning: adapter 'f'")


def test_latest_active_adapter():
    assert latest_active_adapter({}) is None
    pointers = {"a": {"adapter": "x", "since": "2026-01-01T00:00:00"}, "b": {"adapter": "y", "since": "2026-02-01"}}
    assert latest_active_adapter(pointers) == "y"


def test_serve_starts_from_the_active_adapter_and_test_uses_it(adapters_workspace, run_lqmf):
    assert run_lqmf("adapters", "load", "chat-q", cwd=adapters_workspace).returncode == 0
    with running_server(adapters_workspace) as server:
        assert server.info["adapters"] == ["chat-q"] and server.info["active"] == "chat-q"
        assert "serving the active adapter 'chat-q'" in server.log_text()
        health = json.loads(run_lqmf("status", "--json", cwd=adapters_workspace).stdout)
        assert health  # the server is recorded for the workspace
        served = run_lqmf("test", "chat-q", "Where is my order?", "--max-new-tokens", "3", "--json",
                          cwd=adapters_workspace)
        assert served.returncode == 0, served.stderr
        answer = json.loads(served.stdout)
        assert answer["server"] == server.url and answer["quantized_4bit"] is True
        assert f"answering with the running server {server.url}" in served.stderr
        local = run_lqmf("test", "chat-q", "Where is my order?", "--max-new-tokens", "3", "--json", "--local",
                         cwd=adapters_workspace)
        assert local.returncode == 0 and "server" not in json.loads(local.stdout)
        assert json.loads(local.stdout)["answer"] == answer["answer"]  # same base quantization, same greedy answer
        swapped = run_lqmf("adapters", "load", "chat-a", cwd=adapters_workspace)  # trained without 4-bit
        assert swapped.returncode == 0, swapped.stderr
        assert "warning: adapter 'chat-a' was trained on a full-precision base" in swapped.stderr
