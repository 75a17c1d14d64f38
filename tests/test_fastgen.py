"""Static-cache decoding and in-place adapter slots give exactly what HF generate gives (CPU, eager step)."""

from __future__ import annotations

import pytest

from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.fastgen import AdapterSlots, CompiledDecoder

NEW = 12


def greedy(model, ids: list[int]) -> str:
    return inference.generate(model, ids, max_new_tokens=NEW, min_new_tokens=NEW).text


@pytest.fixture(scope="module")
def served(trained_workspace):
    """chat-a loaded the normal way, its slot, and a decoder over it."""
    model = inference.load_for_inference(Workspace(trained_workspace), "chat-a")
    slots = AdapterSlots(model.model, "chat-a", slot_scaling=32 / 16)
    return model, slots, CompiledDecoder(model.model, max_cache_len=256)


def decode(model, decoder, ids: list[int]) -> str:
    out = decoder.generate(ids, NEW, min_new_tokens=NEW, eos_ids={model.tokenizer.eos_token_id})
    return model.tokenizer.decode(out.tokens, skip_special_tokens=True)


def test_static_cache_decoding_matches_generate(served):
    model, _, decoder = served
    ids = inference.prompt_ids(model, "How do I return an item?")
    assert decode(model, decoder, ids) == greedy(model, ids)
    assert decode(model, decoder, ids) == greedy(model, ids)  # the cache resets between requests


def test_slot_swaps_match_loading_each_adapter(served, trained_workspace):
    model, slots, decoder = served
    ws = Workspace(trained_workspace)
    ids = inference.prompt_ids(model, "Translate to French: good morning")
    other = inference.load_for_inference(ws, "instr-b")
    base = inference.load_for_inference(ws, None, base=str(model.base.path))
    slots.add("instr-b", slots.read_adapter(trained_workspace / "adapters" / "instr-b"), scaling=32 / 16)
    try:
        slots.activate("instr-b")
        assert decode(model, decoder, ids) == greedy(other, ids)
        slots.activate(None)
        assert decode(model, decoder, ids) == greedy(base, ids)
        slots.activate("chat-a")
        fresh = inference.load_for_inference(ws, "chat-a")
        assert decode(model, decoder, ids) == greedy(fresh, ids)
    finally:
        slots.activate("chat-a")


def test_slot_refuses_a_different_shape(served):
    _, slots, _ = served
    state = {name: value[:1] for name, value in slots.stored["chat-a"].items()}
    with pytest.raises(ValueError, match="targets and rank"):
        slots.add("odd", state, scaling=2.0)
