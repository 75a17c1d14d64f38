"""The shared inference path: adapters loaded on their base, generation, streaming, classification."""

from __future__ import annotations

import pytest

from lqmf.core.errors import InputError, NotFoundError
from lqmf.core.workspace import Workspace
from lqmf.engine import inference


@pytest.fixture(scope="module")
def chat_model(trained_workspace):
    return inference.load_for_inference(Workspace(trained_workspace), "chat-a")


def test_greedy_generation_is_deterministic_and_streams(chat_model):
    ids = inference.prompt_ids(chat_model, "How do I return an item?")
    pieces: list[str] = []
    first = inference.generate(chat_model, ids, max_new_tokens=12, min_new_tokens=12, on_text=pieces.append)
    second = inference.generate(chat_model, ids, max_new_tokens=12, min_new_tokens=12)
    assert first.text == second.text
    assert "".join(pieces) == first.text
    assert first.new_tokens == 12 and first.prompt_tokens == len(ids)
    assert first.tokens_per_second > 0


def test_sampling_follows_the_seed(chat_model):
    ids = inference.prompt_ids(chat_model, "Where is my order?")
    runs = [inference.generate(chat_model, ids, max_new_tokens=10, min_new_tokens=10, temperature=1.0, seed=s).text
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_adapter_changes_the_answer_distribution(chat_model, trained_workspace):
    base = inference.load_for_inference(Workspace(trained_workspace), None, base=str(chat_model.base.path))
    ids = inference.prompt_ids(chat_model, "How do I return an item?")
    import torch

    assert not torch.allclose(inference.next_token_logits(chat_model, ids), inference.next_token_logits(base, ids))


def test_quantized_adapter_loads_4bit(trained_workspace):
    model = inference.load_for_inference(Workspace(trained_workspace), "chat-q")
    assert model.loaded.quantized
    ids = inference.prompt_ids(model, "hello")
    assert inference.generate(model, ids, max_new_tokens=4, min_new_tokens=4).new_tokens == 4


def test_classification_probabilities(trained_workspace):
    model = inference.load_for_inference(Workspace(trained_workspace), "sent")
    scores = inference.classify(model, ["Absolutely wonderful, I love it.", "Broke in a day. Awful."])
    for row in scores:
        assert set(row) == {"negative", "positive"}
        assert abs(sum(row.values()) - 1) < 1e-5
    with pytest.raises(InputError, match="does not generate"):
        inference.generate(model, [1, 2, 3])


def test_unknown_adapter(trained_workspace):
    with pytest.raises(NotFoundError, match="did you mean 'chat-"):
        inference.load_for_inference(Workspace(trained_workspace), "chat-x")
