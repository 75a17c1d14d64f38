"""Per-request combinations on the server: model "A+B" / "A:0.7+B:0.3" over resident adapters."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lqmf.core.errors import InputError
from lqmf.core.workspace import Workspace
from lqmf.engine import combined, inference
from lqmf.engine.host import ModelHost
from lqmf.engine.server import create_app
from tests.test_adapters import out_json

PROMPT = "How do I return an item?"


def logits(host: ModelHost, slot: str):
    import torch

    with torch.no_grad(), inference.adapter_context(host.model, slot):
        return host.model.model(input_ids=torch.tensor([[1, 5, 9, 14, 3, 7]])).logits


def test_a_request_combines_resident_adapters(cli, adapters_workspace):
    import torch

    # The same combination registered ahead of time: the exact sum of both updates, 0.7 and 0.3 of them.
    out_json(cli("adapters", "combine", "mix", "chat-a", "chat-q", "--method", "cat", "--weights", "0.7,0.3",
                 "--device", "cpu", "--json"))
    host = ModelHost.start(Workspace(adapters_workspace), adapters=["chat-a", "chat-q", "mix"], device="cpu")
    with TestClient(create_app(host)) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "chat-a:0.7+chat-q:0.3", "max_tokens": 6, "messages": [{"role": "user", "content": PROMPT}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "chat-a:0.7+chat-q:0.3"
        slots = list(host.model.adapters)
        again = client.post("/v1/chat/completions", json={
            "model": "chat-a:0.7+chat-q:0.3", "max_tokens": 6, "messages": [{"role": "user", "content": PROMPT}]})
        assert again.json()["choices"][0]["message"] == reply.json()["choices"][0]["message"]
        assert host.model.adapters == slots  # built once, then reused
        missing = client.post("/v1/completions", json={"model": "chat-a+chat-x", "prompt": PROMPT, "max_tokens": 2})
        assert missing.status_code == 404 and "adapter 'chat-x' is not resident here" in missing.text
    combo = host.combinations.slot("chat-a:0.7+chat-q:0.3")
    assert torch.allclose(logits(host, combo), logits(host, host.resident["mix"].slot), atol=1e-5)
    first_only = host.combinations.slot("chat-a:1+chat-q:0")
    assert torch.allclose(logits(host, first_only), logits(host, host.resident["chat-a"].slot), atol=1e-5)


@pytest.mark.parametrize(("model_id", "message"), [
    ("a:x+b", "'x' is not a weight"), ("a+a", "names an adapter twice"), ("a++b", "an adapter name is empty")])
def test_bad_combination_ids(model_id, message):
    with pytest.raises(InputError, match=message):
        combined.parse(model_id)


def test_parse_defaults_to_full_weights():
    assert combined.parse("a+b:0.25") == [("a", 1.0), ("b", 0.25)]
