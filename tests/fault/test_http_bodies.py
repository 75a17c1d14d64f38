"""Bad HTTP bodies through the server app (FastAPI's TestClient): each gets a 4xx with one JSON error
message, the server keeps serving, and the registry is unchanged. A corrupt adapter is refused."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from tests.helpers import snapshot

CHAT = "/v1/chat/completions"
COMPLETE = "/v1/completions"
ADMIN = "/admin/adapters"
HELLO = [{"role": "user", "content": "hi"}]

BODIES = [
    # (id, path, raw body or JSON-able object, status)
    ("chat-not-json", CHAT, b"{not json", 400),
    ("chat-empty-body", CHAT, b"", 400),
    ("chat-array", CHAT, [1, 2], 400),
    ("chat-no-messages", CHAT, {"model": "good"}, 400),
    ("chat-messages-empty", CHAT, {"messages": []}, 400),
    ("chat-messages-not-list", CHAT, {"messages": "hi"}, 400),
    ("chat-bad-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("chat-content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    ("chat-max-tokens-zero", CHAT, {"messages": HELLO, "max_tokens": 0}, 400),
    ("chat-max-tokens-text", CHAT, {"messages": HELLO, "max_tokens": "many"}, 400),
    ("chat-temperature-negative", CHAT, {"messages": HELLO, "temperature": -1}, 400),
    ("chat-temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("chat-top-p-two", CHAT, {"messages": HELLO, "top_p": 2}, 400),
    ("chat-n-three", CHAT, {"messages": HELLO, "n": 3}, 400),
    ("chat-penalty", CHAT, {"messages": HELLO, "presence_penalty": 1}, 400),
    ("chat-stream-text", CHAT, {"messages": HELLO, "stream": "yes please"}, 400),
    ("chat-unknown-model", CHAT, {"messages": HELLO, "model": "nobody"}, 404),
    ("chat-corrupt-model", CHAT, {"messages": HELLO, "model": "bad"}, 400),  # loaded on request: refused
    ("chat-model-path", CHAT, {"messages": HELLO, "model": "../good"}, 404),
    # numbers are checked at the edge: finite, in range, the type the kernel takes (issue 20)
    ("chat-seed-2**64", CHAT, {"messages": HELLO, "seed": 2**64, "temperature": 0.7}, 400),
    ("chat-seed-2**70", CHAT, {"messages": HELLO, "seed": 1180591620717411303424, "temperature": 0.7}, 400),
    ("chat-seed-negative", CHAT, {"messages": HELLO, "seed": -1, "temperature": 0.7}, 400),
    ("chat-seed-fraction", CHAT, {"messages": HELLO, "seed": 1.5, "temperature": 0.7}, 400),
    ("chat-seed-text", CHAT, {"messages": HELLO, "seed": "seven", "temperature": 0.7}, 400),
    ("chat-temperature-infinity", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
     400),
    ("chat-top-p-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400),
    ("chat-penalty-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": NaN}', 400),
    ("chat-max-tokens-huge", CHAT, {"messages": HELLO, "max_tokens": 10**30}, 400),
    ("chat-max-tokens-float", CHAT, {"messages": HELLO, "max_tokens": 1e30}, 400),
    ("chat-min-tokens-huge", CHAT, {"messages": HELLO, "min_tokens": 2**80}, 400),
    ("chat-combination-nan", CHAT, {"messages": HELLO, "model": "good:nan+other:1"}, 400),
    ("chat-combination-inf", CHAT, {"messages": HELLO, "model": "good:inf+other:1"}, 400),
    ("chat-combination-overflow", CHAT, {"messages": HELLO, "model": "good:1e39+other:1"}, 400),
    ("chat-combination-too-heavy", CHAT, {"messages": HELLO, "model": "good:-101+other:1"}, 400),
    ("chat-combination-empty-name", CHAT, {"messages": HELLO, "model": "good+"}, 400),
    ("chat-combination-twice", CHAT, {"messages": HELLO, "model": "good+good"}, 400),
    ("complete-too-many-prompts", COMPLETE, {"prompt": ["x"] * 33}, 400),
    ("complete-no-prompt", COMPLETE, {"model": "good"}, 400),
    ("complete-empty-list", COMPLETE, {"prompt": []}, 400),
    ("complete-prompt-number", COMPLETE, {"prompt": 7}, 400),
    ("complete-stop-too-many", COMPLETE, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("admin-load-corrupt", f"{ADMIN}/load", {"adapter": "bad"}, 400),
    ("admin-switch-corrupt", f"{ADMIN}/switch", {"adapter": "bad"}, 400),
    ("admin-load-missing", f"{ADMIN}/load", {"adapter": "nobody"}, 404),
    ("admin-load-escape", f"{ADMIN}/load", {"adapter": "../escape"}, 400),
    ("admin-load-no-name", f"{ADMIN}/load", {}, 400),
    ("admin-load-not-json", f"{ADMIN}/load", b"adapter=good", 400),
    ("admin-unload-not-loaded", f"{ADMIN}/unload", {"adapter": "nobody"}, 404),
]


@pytest.fixture(scope="module")
def served(trained_once, tmp_path_factory):
    from lqmf.core.workspace import Workspace
    from lqmf.engine.serve.host import ModelHost
    from lqmf.engine.serve.server import create_app

    root = tmp_path_factory.mktemp("served") / "ws"
    shutil.copytree(trained_once, root)
    shutil.copytree(root / "adapters" / "good", root / "adapters" / "bad")
    weights = root / "adapters" / "bad" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # same size, other bytes
    host = ModelHost.start(Workspace(root), adapters=["good"], device="cpu")
    with TestClient(create_app(host)) as http:
        yield root, http


@pytest.mark.parametrize(("path", "body", "status"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_bad_body(served, path, body, status):
    root, http = served
    before = snapshot(root)
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    assert snapshot(root) == before
    assert http.post(CHAT, json={"messages": HELLO, "max_tokens": 1}).status_code == 200  # still serving


def test_corrupt_adapter_is_refused_at_start(served):
    from lqmf.core.errors import InputError
    from lqmf.core.workspace import Workspace
    from lqmf.engine.serve.host import ModelHost

    root, _ = served
    with pytest.raises(InputError, match="adapter 'bad' is corrupt"):
        ModelHost.start(Workspace(root), adapters=["bad"], device="cpu")
