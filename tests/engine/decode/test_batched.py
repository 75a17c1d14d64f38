"""The batched decoder as a batch of one (`lqmf test`, bench, the shell) and in-place adapter swaps
give what HF generate gives, token for token.

On the CPU the decoder runs its one-token step eagerly (CUDA graphs are checked on a GPU, tests/gpu);
the per-slot cache, the mask, the stacked LoRA products, streaming, stop strings and the in-place
weight copy are the same code either way."""

from __future__ import annotations

import pytest

from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.decode import batched
from lqmf.engine.decode.batched import BatchedDecoder, cache_size_for
from lqmf.engine.lora import stacked

NEW = 12


def greedy(model, ids: list[int], **options) -> inference.Generation:
    return inference.generate(model, ids, max_new_tokens=NEW, min_new_tokens=NEW, **options)


@pytest.fixture(scope="module")
def models(trained_workspace):
    """(reference, fast): chat-a loaded twice, the second decoding through the batched decoder."""
    ws = Workspace(trained_workspace)
    reference = inference.load_for_inference(ws, "chat-a")
    fast = inference.load_for_inference(ws, "chat-a")
    fast.fast_decode = True
    return reference, fast


def test_batch_of_one_matches_generate(models):
    reference, fast = models
    ids = inference.prompt_ids(reference, "How do I return an item?")
    expected = greedy(reference, ids)
    assert reference.decoder is None  # the CPU default is transformers' generate
    for _ in range(2):  # the cache resets between requests
        got = greedy(fast, ids)
        assert (got.text, got.new_tokens, got.finish_reason) == (expected.text, NEW, "length")
    assert isinstance(fast.decoder, BatchedDecoder) and fast.decoder.max_len == 256 and fast.decoder.slots == 1
    assert fast.stacked == fast.adapters  # the adapter applied as index 1, read from its folder


def test_short_answers_and_the_bare_base_follow_generate(models, trained_workspace):
    reference, fast = models
    ids = inference.prompt_ids(reference, "Thanks, bye")
    short = inference.generate(fast, ids, max_new_tokens=NEW)
    assert short.text == inference.generate(reference, ids, max_new_tokens=NEW).text
    base = inference.load_for_inference(Workspace(trained_workspace), None, base=str(fast.base.path))
    with inference.adapter_context(fast, None):
        assert greedy(fast, ids).text == greedy(base, ids).text


def test_streaming_stop_strings_and_cancel_behave_alike(models):
    reference, fast = models
    ids = inference.prompt_ids(reference, "Where is my order?")
    full = greedy(reference, ids).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for model in (reference, fast):
        pieces: list[str] = []
        result = inference.generate(model, ids, max_new_tokens=NEW, stop=[stop], on_text=pieces.append)
        assert result.finish_reason == "stop" and "".join(pieces) == result.text == full[:full.index(stop)]
        checks = iter(range(NEW * 2))
        cancelled = inference.generate(model, ids, max_new_tokens=NEW,
                                       cancelled=lambda checks=checks: next(checks) >= 3)
        assert cancelled.finish_reason == "cancelled" and cancelled.new_tokens < NEW


def test_sampling_is_seeded(models):
    _, fast = models
    ids = inference.prompt_ids(fast, "Hello")
    runs = [inference.generate(fast, ids, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=5).text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_in_place_swap_matches_loading_the_adapter(trained_workspace):
    ws = Workspace(trained_workspace)
    fast = inference.load_for_inference(ws, "chat-a")
    fast.fast_decode = True
    slot = fast.adapters[0]
    ids = inference.prompt_ids(fast, "Translate to French: good morning")
    greedy(fast, ids)
    decoder = fast.decoder
    live = {name: p.data_ptr() for name, p in fast.model.named_parameters() if "lora_" in name}
    assert inference.replace_adapter(fast, trained_workspace / "adapters" / "instr-b", slot)
    assert {name: p.data_ptr() for name, p in fast.model.named_parameters() if "lora_" in name} == live
    assert fast.decoder is decoder and fast.stacked is None  # same cache; the new weights read before the next request
    other = inference.load_for_inference(ws, "instr-b")
    assert greedy(fast, ids).text == greedy(other, ids).text
    base = inference.load_for_inference(ws, None, base=str(fast.base.path))
    with inference.adapter_context(fast, None):
        assert greedy(fast, ids).text == greedy(base, ids).text


def test_cache_sizes():
    assert cache_size_for(10, None) == 256
    assert cache_size_for(257, 4096) == 512
    assert cache_size_for(5000, 4096) == 4096


def test_a_model_the_decoder_cannot_run_falls_back_to_generate(trained_workspace, monkeypatch):
    ws = Workspace(trained_workspace)
    fast = inference.load_for_inference(ws, "chat-a")
    fast.fast_decode = True
    ids = inference.prompt_ids(fast, "Hello there")

    monkeypatch.setattr(batched, "supports", lambda model: False)
    pieces: list[str] = []
    got = inference.generate(fast, ids, max_new_tokens=NEW, min_new_tokens=NEW, on_text=pieces.append)
    reference = inference.load_for_inference(ws, "chat-a")
    assert got.text == "".join(pieces) == greedy(reference, ids).text
    assert fast.decoder is None


def test_an_adapter_the_decoder_cannot_apply_is_answered_by_generate(trained_workspace, monkeypatch):
    ws = Workspace(trained_workspace)
    fast = inference.load_for_inference(ws, "chat-a")
    fast.fast_decode = True
    ids = inference.prompt_ids(fast, "Hello there")

    def unsupported(*args, **kwargs):
        raise stacked.UnsupportedAdapter("use_dora adapters are not served by the batched decoder")

    monkeypatch.setattr(stacked, "read_adapter", unsupported)
    got = greedy(fast, ids)
    assert fast.stacked == [] and got.text == greedy(inference.load_for_inference(ws, "chat-a"), ids).text


def test_swapping_in_another_rank_reads_the_new_weights(trained_workspace, cli, workspace, tiny_model):
    """PEFT's hot-swap gives a slot new tensors for a larger rank; the decoder must not keep the old ones."""
    from tests.helpers import EXAMPLES

    result = cli("train", str(tiny_model), str(EXAMPLES / "chat_training.csv"), "chat", "--name", "rank32",
                 "--rank", "32", "--max-steps", "2", "--max-seq-length", "128", "--no-4bit", "--lr", "5e-3",
                 "--set", "validation_split=0", "-q")
    assert result.exit_code == 0, result.output
    fast = inference.load_for_inference(Workspace(trained_workspace), "chat-a")
    fast.fast_decode = True
    ids = inference.prompt_ids(fast, "Where is my parcel?")
    greedy(fast, ids)  # the decoder holds chat-a's rank
    assert inference.replace_adapter(fast, workspace / "adapters" / "rank32", fast.adapters[0])
    wider = inference.load_for_inference(Workspace(workspace), "rank32")
    assert greedy(fast, ids).text == greedy(wider, ids).text
