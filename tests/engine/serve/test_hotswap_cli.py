"""`lqmf adapters switch|load|unload` hot-swapping a running `lqmf serve` while requests run.

"""

from __future__ import annotations

import json
import re
import shutil
import threading

import openai

from lqmf.core.serving import call_server
from tests.helpers import running_server, stop_asking, wait_for_answers

KEY = "cli-key"
PROMPT = "How do I return an item?"


def ask(client: openai.OpenAI, model: str) -> tuple[str, str]:
    response = client.chat.completions.create(model=model, max_tokens=8,
                                              messages=[{"role": "user", "content": PROMPT}])
    return response.model, response.choices[0].message.content


def test_adapters_verbs_swap_the_running_server(trained_workspace, tmp_path, run_lqmf):
    root = tmp_path / "ws"
    shutil.copytree(trained_workspace, root)
    with running_server(root, "--adapter", "chat-a", "--adapter", "instr-b", api_key=KEY) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        expected = dict(ask(client, name) for name in ("chat-a", "instr-b"))
        results, errors, stop = [], [], threading.Event()

        def keep_asking() -> None:
            own = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            while not stop.is_set():
                try:
                    results.append(ask(own, "default"))
                except BaseException as err:  # noqa: BLE001 - asserted below
                    errors.append(err)

        threads = [threading.Thread(target=keep_asking) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            for name in ("instr-b", "chat-a", "instr-b"):
                before = len(results)
                switched = run_lqmf("--workspace", root, "adapters", "switch", name, env={"LQMF_API_KEY": KEY})
                assert switched.returncode == 0, switched.stderr
                assert re.search(r"now the active adapter .*; server http://\S+: \w+ in [0-9.]+ ms", switched.stdout)
                assert call_server(server.url, "GET", "/admin/adapters", api_key=KEY)["active"] == name
                wait_for_answers(results, errors, before + 2, stop)  # let requests run on each adapter
        finally:
            stop_asking(stop, threads)
        assert not errors, errors[:3]
        assert {model for model, _ in results} == {"chat-a", "instr-b"}
        assert all(text == expected[model] for model, text in results)

        unloaded = run_lqmf("--workspace", root, "adapters", "unload", "--server", server.url,
                            env={"LQMF_API_KEY": KEY})
        assert unloaded.returncode == 0, unloaded.stderr
        assert ask(client, "default")[0] == "tiny-llama"
        loaded = run_lqmf("--workspace", root, "adapters", "load", "chat-a", env={"LQMF_API_KEY": KEY})
        assert loaded.returncode == 0, loaded.stderr
        assert ask(client, "default") == ("chat-a", expected["chat-a"])

        # An adapter of another base model changes the registry only; the server keeps what it serves.
        other = run_lqmf("--workspace", root, "adapters", "switch", "sent", env={"LQMF_API_KEY": KEY})
        assert other.returncode == 0, other.stderr
        assert "server" not in other.stdout
        unloaded_other = run_lqmf("--workspace", root, "adapters", "unload", "--base", "minilm",
                                  env={"LQMF_API_KEY": KEY})
        assert unloaded_other.returncode == 0 and "unloaded sent" in unloaded_other.stdout, unloaded_other.stderr
        assert "server" not in unloaded_other.stdout
        assert call_server(server.url, "GET", "/admin/adapters", api_key=KEY)["active"] == "chat-a"

        status = run_lqmf("--workspace", root, "status", "--json", env={"LQMF_API_KEY": KEY})
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        [served] = report["serve"]
        assert served["url"] == server.url and served["active"] == "chat-a"
        assert set(served["adapters"]) >= {"chat-a"}
        assert [a["adapter"] for a in report["adapters"]["active"]] == ["chat-a"]
