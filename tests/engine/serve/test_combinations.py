"""Per-request combinations on the server: model "A+B" / "A:0.7+B:0.3" over resident adapters."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lqmf.core.errors import InputError
from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.serve import combinations as combined
from lqmf.engine.serve.host import BatchSettings, ModelHost
from lqmf.engine.serve.server import create_app
from tests.helpers import out_json

PROMPT = "How do I return an item?"


def logits(host: ModelHost, slot: str):
    import torch

    with torch.no_grad(), inference.adapter_context(host.model, slot):
        return host.model.model(input_ids=torch.tensor([[1, 5, 9, 14, 3, 7]])).logits


def chat(client, model: str, prompt: str = PROMPT) -> dict:
    reply = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 12, "messages": [{"role": "user", "content": prompt}]})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture()
def mix_workspace(cli, adapters_workspace):
    # The same combination registered ahead of time: the exact sum of both updates, 0.7 and 0.3 of them.
    out_json(cli("adapters", "combine", "mix", "chat-a", "chat-q", "--method", "cat", "--weights", "0.7,0.3",
                 "--device", "cpu", "--json"))
    return Workspace(adapters_workspace)


def test_a_request_combines_resident_adapters_in_the_batch(mix_workspace):
    """With continuous batching the combination is one more scheduler entry: it answers as the
    registered combination does, batched beside rows of other adapters."""
    from concurrent.futures import ThreadPoolExecutor

    host = ModelHost.start(mix_workspace, adapters=["chat-a", "chat-q", "mix"], device="cpu")
    assert host.scheduler is not None
    prompts = [PROMPT, "What is your refund policy?", "Where is my order?"]
    with TestClient(create_app(host)) as client:
        expected = [chat(client, "mix", p)["choices"][0]["message"] for p in prompts]
        alone_a = chat(client, "chat-a")["choices"][0]["message"]
        jobs = [("chat-a:0.7+chat-q:0.3", p) for p in prompts] + [("chat-a:1+chat-q:0", PROMPT), ("chat-q", PROMPT)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: chat(client, *job), jobs))
        assert [r["choices"][0]["message"] for r in replies[:3]] == expected
        assert replies[0]["model"] == "chat-a:0.7+chat-q:0.3"
        assert replies[3]["choices"][0]["message"] == alone_a  # weights (1, 0) answer as the first adapter
        entries = len(host.scheduler.entries)
        chat(client, "chat-a:0.7+chat-q:0.3")
        assert len(host.scheduler.entries) == entries  # built once, then reused
        missing = client.post("/v1/completions", json={"model": "chat-a+chat-x", "prompt": PROMPT, "max_tokens": 2})
        assert missing.status_code == 404 and "adapter 'chat-x' is not resident here" in missing.text
    host.close()


def test_a_request_combines_resident_adapters_one_at_a_time(mix_workspace):
    import torch

    host = ModelHost.start(mix_workspace, adapters=["chat-a", "chat-q", "mix"], device="cpu",
                           batching=BatchSettings(enabled=False))
    with TestClient(create_app(host)) as client:
        reply = chat(client, "chat-a:0.7+chat-q:0.3")
        assert reply["model"] == "chat-a:0.7+chat-q:0.3"
        slots = list(host.model.adapters)
        assert chat(client, "chat-a:0.7+chat-q:0.3")["choices"] == reply["choices"]
        assert host.model.adapters == slots  # built once, then reused
    combo = host.combinations.slot("chat-a:0.7+chat-q:0.3")
    assert torch.allclose(logits(host, combo), logits(host, host.resident["mix"].slot), atol=1e-5)
    first_only = host.combinations.slot("chat-a:1+chat-q:0")
    assert torch.allclose(logits(host, first_only), logits(host, host.resident["chat-a"].slot), atol=1e-5)


def test_combined_weights_are_the_weighted_sum_of_updates():
    import torch

    torch.manual_seed(0)
    first = {"q": (torch.randn(2, 8), torch.randn(6, 2), 2.0)}
    second = {"q": (torch.randn(4, 8), torch.randn(6, 4), 0.5), "v": (torch.randn(4, 8), torch.randn(3, 4), 0.5)}
    stacked = combined.stacked_weights([(first, 0.7), (second, 0.3)])
    a, b, scaling = stacked["q"]
    expected = 0.7 * 2.0 * first["q"][1] @ first["q"][0] + 0.3 * 0.5 * second["q"][1] @ second["q"][0]
    assert scaling == 1.0 and torch.allclose(b @ a, expected, atol=1e-5)
    assert torch.allclose(stacked["v"][1] @ stacked["v"][0], 0.3 * 0.5 * second["v"][1] @ second["v"][0], atol=1e-5)


@pytest.mark.parametrize(("model_id", "message"), [
    ("a:x+b", "'x' is not a weight"), ("a+a", "names an adapter twice"), ("a++b", "an adapter name is empty")])
def test_bad_combination_ids(model_id, message):
    with pytest.raises(InputError, match=message):
        combined.parse(model_id)


def test_parse_defaults_to_full_weights():
    assert combined.parse("a+b:0.25") == [("a", 1.0), ("b", 0.25)]
