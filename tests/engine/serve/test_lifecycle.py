"""`lqmf serve` start and stop: a base given by --model, an adapter folder the operator names,
the workspace record, a busy port, bad arguments and a clean SIGTERM."""

from __future__ import annotations

import shutil

import httpx

from lqmf.core.serving import notify_server, running_servers, servers_dir
from lqmf.core.workspace import Workspace
from tests.helpers import running_server, stop


def test_serve_a_base_and_an_operator_folder_then_stop_cleanly(adapters_workspace, tiny_model, tmp_path, run_lqmf):
    outside = tmp_path / "elsewhere" / "my-chat"
    shutil.copytree(adapters_workspace / "adapters" / "chat-a", outside)
    ws = Workspace(adapters_workspace)
    with running_server(adapters_workspace, "--model", str(tiny_model), "--adapter", f"mine={outside}") as server:
        assert server.info["active"] == "mine" and server.info["api_key_required"] is False
        with httpx.Client(base_url=server.url, timeout=60) as http:
            def ask(model: str) -> tuple[str, str]:
                body = http.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": 6, "messages": [{"role": "user", "content": "Where is my order?"}]
                }).json()
                return body["model"], body["choices"][0]["message"]["content"]

            mine = ask("default")
            assert mine[0] == "mine"
            assert notify_server(ws, "unload", None)["resident"] == []
            assert ask("default")[0] == "tiny-llama"
            assert notify_server(ws, "load", "chat-a")["method"] == "load"
            assert ask("chat-a")[1] == mine[1]  # the same weights, from the registry this time
            assert notify_server(ws, "load", "mine")["method"] == "load"  # the operator's folder stays allowed
            assert ask("mine") == mine

        busy = run_lqmf("--workspace", adapters_workspace, "serve", "--model", tiny_model,
                        "--port", str(server.info["port"]), timeout=120)
        assert busy.returncode == 4 and "cannot listen" in busy.stderr

        assert stop(server.proc) == 0
    assert running_servers(ws) == [] and not list(servers_dir(ws).glob("*.json"))
    assert notify_server(ws, "switch", "chat-a") is None  # no server: the caller only updates the registry


def test_bad_serve_arguments(cli, adapters_workspace):
    nothing = cli("serve")
    assert nothing.exit_code == 2 and "--model" in nothing.stderr
    ghost = cli("serve", "--adapter", "ghost", "--port", "0")
    assert ghost.exit_code == 3 and "ghost" in ghost.stderr
    bad_spec = cli("serve", "--adapter", "x=", "--port", "0")
    assert bad_spec.exit_code == 2
