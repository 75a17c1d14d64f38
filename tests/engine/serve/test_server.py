"""`lqmf serve` as users meet it: a real server process on loopback, the official `openai` client,
greedy answers equal to `lqmf test`'s, adapter swaps while requests run, and 4xx for bad requests.

One server per module (chat-a active, instr-b resident, on the tiny Llama; an API key required).
Tests that swap adapters put the served set back as they found it.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from lqmf.core.errors import InputError, NotFoundError
from lqmf.core.serving import call_server, notify_server, running_servers, servers_dir
from lqmf.core.workspace import Workspace
from tests.helpers import running_server, stop_asking, wait_for_answers

KEY = "test-key-123"
PROMPT = "How do I return an item?"
RAW_PROMPT = "Where is my order"
NEW_TOKENS = 8


def lqmf_test(workspace: Path, adapter: str, prompt: str, *extra: str) -> dict:
    from lqmf.cli.app import app

    result = CliRunner().invoke(app, ["--workspace", str(workspace), "test", adapter, prompt, "--json",
                                      "--max-new-tokens", str(NEW_TOKENS), "--no-4bit", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def served(trained_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "ws"
    shutil.copytree(trained_workspace, root)
    with running_server(root, "--adapter", "chat-a", "--adapter", "instr-b", "--max-new-tokens", "64",
                        api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def expected(served):
    """`lqmf test`'s greedy answers: chat formatting per adapter, and raw text for chat-a."""
    answers = {name: lqmf_test(served.workspace, name, PROMPT)["answer"] for name in ("chat-a", "instr-b", "chat-q")}
    answers["raw:chat-a"] = lqmf_test(served.workspace, "chat-a", RAW_PROMPT, "--raw")["answer"]
    assert len({answers["chat-a"], answers["instr-b"], answers["chat-q"]}) == 3, answers  # they tell adapters apart
    return answers


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def admin(served):
    def call(action: str, adapter: str | None, **extra) -> dict:
        return call_server(served.url, "POST", f"/admin/adapters/{action}", {"adapter": adapter, **extra}, KEY)

    yield call
    state = call_server(served.url, "GET", "/admin/adapters", api_key=KEY)
    for name in set(state["resident"]) - {"chat-a", "instr-b"}:
        call("unload", name)
    call("load", "instr-b", activate=False)
    call("load", "chat-a")


def chat(client, model: str, **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=NEW_TOKENS, **options)


def test_models_lists_default_base_and_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"default", "tiny-llama", "chat-a", "instr-b"}
    assert models["default"].lqmf == {"kind": "default", "adapter": "chat-a", "task": "chat"}
    assert client.models.retrieve("instr-b").lqmf["kind"] == "adapter"


def test_the_start_says_how_many_adapters_may_be_resident_and_what_their_tables_hold(served):
    line = next(row for row in served.log_text().splitlines() if row.startswith("continuous batching"))
    assert re.search(r"; up to 8 adapters resident \(LoRA tables \d+\.\d\d GB\)$", line), line


def test_chat_answers_equal_lqmf_test(client, expected):
    for model, adapter in (("chat-a", "chat-a"), ("instr-b", "instr-b"), ("default", "chat-a")):
        response = chat(client, model)
        assert response.model == adapter
        assert response.choices[0].message.content == expected[adapter]
        assert response.usage.completion_tokens <= NEW_TOKENS
        assert response.choices[0].finish_reason in ("stop", "length")
    base = chat(client, "tiny-llama")
    assert base.model == "tiny-llama" and base.choices[0].message.content not in expected.values()


def test_max_tokens_is_honoured(client):
    for n in (1, 5):
        response = client.completions.create(model="chat-a", prompt=RAW_PROMPT, max_tokens=n)
        assert response.usage.completion_tokens <= n
        if response.choices[0].finish_reason == "length":
            assert response.usage.completion_tokens == n


def test_completion_is_the_raw_prompt(client, expected):
    response = client.completions.create(model="chat-a", prompt=RAW_PROMPT, max_tokens=NEW_TOKENS)
    assert response.choices[0].text == expected["raw:chat-a"]
    several = client.completions.create(model="chat-a", prompt=[RAW_PROMPT, RAW_PROMPT], max_tokens=NEW_TOKENS)
    assert [c.text for c in several.choices] == [expected["raw:chat-a"]] * 2


def test_streaming_matches_the_whole_answer(client, expected):
    chunks = list(chat(client, "instr-b", stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"instr-b"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["instr-b"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= NEW_TOKENS
    pieces = list(client.completions.create(model="chat-a", prompt=RAW_PROMPT, max_tokens=NEW_TOKENS, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected["raw:chat-a"]


def test_stop_strings_end_the_answer(client, expected):
    answer = expected["instr-b"]
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    cut = answer[:answer.index(stop)]
    assert chat(client, "instr-b", stop=[stop]).choices[0].message.content == cut
    streamed = chat(client, "instr-b", stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_switch_changes_what_default_answers(served, client, admin, expected):
    ws = Workspace(served.workspace)
    result = notify_server(ws, "switch", "instr-b", api_key=KEY)
    assert (result["active"], result["previous"], result["method"]) == ("instr-b", "chat-a", "resident")
    assert result["swap_ms"] >= 0 and result["server"] == served.url
    response = chat(client, "default")
    assert (response.model, response.choices[0].message.content) == ("instr-b", expected["instr-b"])
    # chat-q is not resident: it is loaded beside the others (nothing is evicted below the budget)
    result = notify_server(ws, "switch", "chat-q", api_key=KEY)
    assert (result["method"], result["active"], result["evicted"]) == ("load", "chat-q", [])
    assert set(result["resident"]) == {"chat-a", "instr-b", "chat-q"}
    assert chat(client, "default").choices[0].message.content == expected["chat-q"]
    assert chat(client, "chat-a").choices[0].message.content == expected["chat-a"]
    assert chat(client, "instr-b").choices[0].message.content == expected["instr-b"]
    result = notify_server(ws, "unload", None, api_key=KEY)
    assert result["active"] is None and result["adapter"] == "chat-q"
    assert chat(client, "default").model == "tiny-llama"


def test_requests_in_flight_during_swaps_never_fail(served, admin, expected):
    """Threads ask `default` (streaming and not) while the main thread switches adapters back and forth."""
    ws = Workspace(served.workspace)
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def ask(streaming: bool) -> None:
        own = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                if streaming:
                    chunks = [c for c in chat(own, "default", stream=True) if c.choices]
                    results.append((chunks[0].model, "".join(c.choices[0].delta.content or "" for c in chunks)))
                else:
                    response = chat(own, "default")
                    results.append((response.model, response.choices[0].message.content))
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    swaps = []
    try:
        for name in ["instr-b", "chat-a", "chat-q", "chat-a", "instr-b", "chat-a"]:
            swaps.append(notify_server(ws, "switch", name, api_key=KEY))
            # each thread's request in flight may still finish on the adapter before; its next one asks this one
            wait_for_answers(results, errors, len(results) + len(threads) + 1, stop)
    finally:
        stop_asking(stop, threads)
    assert not errors, errors[:3]
    assert {s["method"] for s in swaps} >= {"resident", "load"}
    served_by = {model for model, _ in results}
    assert {"chat-a", "instr-b", "chat-q"} <= served_by
    for model, text in results:  # each answer came whole from the adapter that the response names
        assert text == expected[model], (model, text)


BAD_REQUESTS = [
    # (method, route, body or raw bytes, status, words in the message)
    ("POST", "/v1/chat/completions", b'{"messages": [', 400, "malformed JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "not served"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 3}, 400, "n = 1"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "at most 64"),
    ("POST", "/v1/completions", {"prompt": "word " * 1100}, 400, "at most 1024"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}', 413, "larger than"),
    ("POST", "/v1/classify", {"input": "great"}, 400, "text-generation"),
    ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
    ("GET", "/v1/models/nope", None, 404, "not served"),
    ("POST", "/admin/adapters/load", {"adapter": "ghost"}, 404, "not found"),
    ("POST", "/admin/adapters/load", {"adapter": "../adapters"}, 400, "path separator"),
    ("POST", "/admin/adapters/load", {"adapter": "sent"}, 409, "classification"),
    ("POST", "/admin/adapters/switch", {}, 400, "adapter name"),
    ("POST", "/admin/adapters/unload", {"adapter": "instr"}, 404, "instr-b"),
]


@pytest.mark.parametrize(("method", "route", "body", "status", "words"), BAD_REQUESTS,
                         ids=[f"{m} {r} {s}" for m, r, _, s, _ in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_message(served, method, route, body, status, words):
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        content = body if isinstance(body, bytes) else None
        response = http.request(method, route, content=content, json=body if isinstance(body, dict) else None)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words.lower() in error["message"].lower()
        assert error["type"]
        assert http.get("/health").json()["status"] == "ok"  # still serving
    assert served.proc.poll() is None


def test_api_key_is_required_except_for_health(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for route in ("/v1/models", "/admin/adapters"):
            assert http.get(route).status_code == 401
            assert http.get(route, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/admin/adapters/switch", json={"adapter": "instr-b"}).status_code == 401
        assert http.get("/health").json() == {"status": "ok"}  # no details without the key
        assert http.get("/health", headers={"Authorization": f"Bearer {KEY}"}).json()["active"] == "chat-a"
    with pytest.raises(InputError, match="LQMF_API_KEY"):
        notify_server(Workspace(served.workspace), "switch", "instr-b", api_key="wrong")


def test_the_workspace_records_the_running_server(served, monkeypatch):
    ws = Workspace(served.workspace)
    records = running_servers(ws)
    assert [r["pid"] for r in records] == [served.proc.pid]
    assert records[0]["url"] == served.url and records[0]["api_key_required"] is True
    assert KEY not in (servers_dir(ws) / f"{served.proc.pid}.json").read_text()
    monkeypatch.setenv("LQMF_API_KEY", KEY)
    assert notify_server(ws, "load", "chat-a")["method"] == "resident"  # found through the record
    with pytest.raises(NotFoundError):
        notify_server(ws, "switch", "ghost")
