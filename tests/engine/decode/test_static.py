"""The static-cache decoder (engine/lora/lean.py) and in-place adapter swaps give what HF generate gives.

On the CPU the decoder runs its one-token step eagerly (CUDA graphs are measured on a GPU,
docs/performance.md); the static cache, the additive mask, lean LoRA layers, streaming, stop
strings and the in-place weight copy are the same code either way."""

from __future__ import annotations

import pytest

from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.decode.static import StaticDecoder, cache_size_for
from lqmf.engine.lora.lean import adapter_key, lean_state, uses_lean_forward

NEW = 12


def greedy(model, ids: list[int], **options) -> inference.Generation:
    return inference.generate(model, ids, max_new_tokens=NEW, min_new_tokens=NEW, **options)


@pytest.fixture(scope="module")
def models(trained_workspace):
    """(reference, fast): chat-a loaded twice, the second decoding through StaticDecoder."""
    ws = Workspace(trained_workspace)
    reference = inference.load_for_inference(ws, "chat-a")
    fast = inference.load_for_inference(ws, "chat-a")
    fast.fast_decode = True
    return reference, fast


def test_static_decoding_matches_generate(models):
    reference, fast = models
    ids = inference.prompt_ids(reference, "How do I return an item?")
    expected = greedy(reference, ids)
    assert reference.decoder is None  # the CPU default is transformers' generate
    for _ in range(2):  # the cache resets between requests
        got = greedy(fast, ids)
        assert (got.text, got.new_tokens, got.finish_reason) == (expected.text, NEW, "length")
    assert isinstance(fast.decoder, StaticDecoder) and fast.decoder.max_cache_len == 256
    assert uses_lean_forward(next(m for m in fast.model.modules() if hasattr(m, "lora_A")))
    # q/k/v's adapter weights are views into one stacked A and one block-diagonal B
    attention = fast.model.base_model.model.model.layers[0].self_attn
    stacked_a, block_b, spans = lean_state(attention.q_proj).fused[fast.adapters[0]]
    assert [member for member, _, _ in spans] == [attention.q_proj, attention.k_proj, attention.v_proj]
    v_b = attention.v_proj.lora_B[fast.adapters[0]].weight
    assert v_b.untyped_storage().data_ptr() == block_b.untyped_storage().data_ptr()
    assert block_b.count_nonzero() == sum(b.count_nonzero() for b in (
        attention.q_proj.lora_B[fast.adapters[0]].weight, attention.k_proj.lora_B[fast.adapters[0]].weight, v_b))


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
    key = adapter_key(fast.decoder.lora_layers)
    assert inference.replace_adapter(fast, trained_workspace / "adapters" / "instr-b", slot)
    assert {name: p.data_ptr() for name, p in fast.model.named_parameters() if "lora_" in name} == live
    # same tensors, same scaling: same graph
    assert fast.decoder is decoder and adapter_key(fast.decoder.lora_layers) == key
    other = inference.load_for_inference(ws, "instr-b")
    assert greedy(fast, ids).text == greedy(other, ids).text
    base = inference.load_for_inference(ws, None, base=str(fast.base.path))
    with inference.adapter_context(fast, None):
        assert adapter_key(fast.decoder.lora_layers) == ()
        assert greedy(fast, ids).text == greedy(base, ids).text


def test_cache_sizes():
    assert cache_size_for(10, None) == 256
    assert cache_size_for(257, 4096) == 512
    assert cache_size_for(5000, 4096) == 4096


def test_lean_lora_trains_like_peft():
    """Same loss and LoRA gradients as PEFT's own forward, dropout included (same random masks)."""
    import torch

    from lqmf.engine.lora.lean import use_lean_lora
    from tests.helpers import gradients, lora_model

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    peft_model, lean_model = lora_model(), lora_model(lean=True)
    use_lean_lora(lean_model)
    expected, got = gradients(peft_model, ids), gradients(lean_model, ids)
    assert set(expected) == set(got) and len(got) == 24
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        peft_model.eval(), lean_model.eval()
        torch.testing.assert_close(lean_model(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    # q_proj computed k_proj's and v_proj's products for them, and both used them
    attention = lean_model.base_model.model.model.layers[0].self_attn
    assert lean_state(attention.q_proj).followers == [attention.k_proj, attention.v_proj]
    assert not any(lean_state(module).pending for module in lean_model.modules() if uses_lean_forward(module))


def test_lean_inference_matches_peft(monkeypatch):
    """Fused q/k/v or not (members scaled apart), prompt or one row: PEFT's logits, one product per group."""
    import torch

    from lqmf.engine.lora import lean
    from tests.helpers import lora_model

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    peft_model, lean_model = lora_model().eval(), lora_model(lean=True).eval()
    lean.use_lean_lora(lean_model, torch.float32)
    calls = []
    group_products = lean._group_products
    monkeypatch.setattr(lean, "_group_products", lambda *args: calls.append(args[0]) or group_products(*args))
    for scale_k in (1.0, 3.0):
        for model in (peft_model, lean_model):
            for name, module in model.named_modules():
                if name.endswith("k_proj") and hasattr(module, "scaling"):
                    module.scaling["default"] = 2.0 * scale_k
        with torch.no_grad():
            for rows in (ids, ids[:, :1]):
                calls.clear()
                torch.testing.assert_close(lean_model(input_ids=rows).logits, peft_model(input_ids=rows).logits)
                assert len(calls) == 6  # q_proj (serving k_proj and v_proj) and o_proj, in 3 layers


def test_a_model_the_decoder_cannot_run_falls_back_to_generate(trained_workspace, monkeypatch):
    ws = Workspace(trained_workspace)
    fast = inference.load_for_inference(ws, "chat-a")
    fast.fast_decode = True
    ids = inference.prompt_ids(fast, "Hello there")

    def no_static_cache(self, *args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr(StaticDecoder, "generate", no_static_cache)
    pieces: list[str] = []
    got = inference.generate(fast, ids, max_new_tokens=NEW, min_new_tokens=NEW, on_text=pieces.append)
    reference = inference.load_for_inference(ws, "chat-a")
    assert got.text == "".join(pieces) == greedy(reference, ids).text
    assert fast.fast_decode is False and fast.decoder is None


def test_swapping_in_another_rank_refuses_stale_fused_weights(trained_workspace, cli, workspace, tiny_model):
    """PEFT's hot-swap gives a slot new tensors for a larger rank; the decoder must not keep using the old ones."""
    from tests.helpers import EXAMPLES

    result = cli("train", str(tiny_model), str(EXAMPLES / "chat_training.csv"), "chat", "--name", "rank32",
                 "--rank", "32", "--max-steps", "2", "--max-seq-length", "128", "--no-4bit", "--lr", "5e-3",
                 "--set", "validation_split=0", "-q")
    assert result.exit_code == 0, result.output
    fast = inference.load_for_inference(Workspace(trained_workspace), "chat-a")
    fast.fast_decode = True
    ids = inference.prompt_ids(fast, "Where is my parcel?")
    greedy(fast, ids)  # the decoder fuses q/k/v
    assert inference.replace_adapter(fast, workspace / "adapters" / "rank32", fast.adapters[0])
    wider = inference.load_for_inference(Workspace(workspace), "rank32")
    assert greedy(fast, ids).text == greedy(wider, ids).text
