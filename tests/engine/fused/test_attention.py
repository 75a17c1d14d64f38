"""Chunked attention (engine/fused/attention.py) against transformers' own SDPA path with its full mask:
sliding windows shorter than the rows, padding, packed examples, a cache, and what it keeps for backward."""

from __future__ import annotations

import pytest

from lqmf.engine import data as data_mod
from lqmf.engine.fused import attention
from tests.helpers import lora_model


def _window_model(window: int | None):
    """A tiny Mistral (sliding window) with r=4 LoRA on q/k/v/o, checkpointed, dropout off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=window)
    model = MistralForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(first, second):
    import torch

    torch.testing.assert_close(second[0], first[0], rtol=1e-5, atol=1e-6)
    assert first[1].keys() == second[1].keys() and first[1]
    for name, grad in first[1].items():
        torch.testing.assert_close(second[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _batch(lengths: list[int], seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": (ids := torch.randint(3, 128, (n,), generator=generator).tolist()), "labels": ids}
            for n in lengths]
    return rows, data_mod.collate(rows, pad_id=0, classification=False)


@pytest.mark.parametrize("chunk", [16, 1024])
def test_a_window_shorter_than_the_rows_gives_the_masked_loss_and_gradients(chunk, monkeypatch):
    """Rows of 40 and 33 tokens (padded) under an 8-token window, in chunks of 16 queries (three,
    each checkpointed) and in one: the loss and LoRA gradients of transformers' SDPA with its mask."""
    import torch

    model = _window_model(8)
    _, batch = _batch([40, 33])
    stock = _loss_and_grads(model, batch)
    monkeypatch.setattr(attention, "QUERY_CHUNK", chunk)
    assert attention.wanted(model.config, 40, packed=False) and attention.use_chunked_attention(model)
    _assert_same(stock, _loss_and_grads(model, batch))
    with torch.no_grad():  # the window matters here: without it the loss moves
        model.get_base_model().config.sliding_window = None
        assert abs(float(model(**batch).loss) - float(stock[0])) > 1e-3


def test_packed_examples_see_only_themselves(monkeypatch):
    """Packed rows (position ids restarting, no attention mask) in chunks of 16: the loss and gradients
    of transformers' block-diagonal mask."""
    import torch

    model = lora_model(lean=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rows, _ = _batch([30, 9, 21, 12, 17, 5, 26])
    packed = data_mod.collate_packed(data_mod.pack(rows, capacity=40), pad_id=0)
    assert attention.wanted(model.config, 40, packed=True) and not attention.wanted(model.config, 40, packed=False)
    stock = _loss_and_grads(model, packed)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    attention.use_chunked_attention(model)
    _assert_same(stock, _loss_and_grads(model, packed))


def test_rows_without_a_mask_take_transformers_sdpa_unchanged(monkeypatch):
    import torch

    model = _window_model(64)  # the window is longer than the rows: a plain causal mask
    _, batch = _batch([40, 40])
    batch.pop("attention_mask")
    stock = _loss_and_grads(model, batch)
    assert not attention.wanted(model.config, 40, packed=False)
    calls = []
    monkeypatch.setattr(attention, "_chunk", lambda *args: calls.append(args) or torch.zeros(()))
    attention.use_chunked_attention(model)
    _assert_same(stock, _loss_and_grads(model, batch))
    assert not calls


@pytest.mark.parametrize("window", [8, 32])
def test_left_padded_prompts_and_decoding_with_a_cache_are_unchanged(window, monkeypatch):
    """A left-padded batch (as batched generation pads): the prompt's logits at its real tokens and
    the greedy tokens decoded against the cache (one query a step, a window shorter and longer than
    the text) equal transformers' own attention."""
    import torch

    model = _window_model(window).eval()
    base = model.get_base_model()
    base.config.use_cache = True
    prompts = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0

    def run():
        logits = base(input_ids=prompts, attention_mask=mask).logits
        return logits[mask.bool()], base.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=12,
                                                  do_sample=False)

    with torch.no_grad():
        stock_logits, stock_tokens = run()
        monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
        attention.use_chunked_attention(model)
        logits, tokens = run()
    torch.testing.assert_close(logits, stock_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, stock_tokens)


def test_backward_keeps_no_row_by_row_mask(monkeypatch):
    """What autograd keeps for the chunked attention of one 512-token row: nothing near 512 x 512 values
    (transformers' path keeps the boolean mask and an additive copy of that size)."""
    import torch

    monkeypatch.setattr(attention, "QUERY_CHUNK", 64)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 512, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(1, 2, 512, 8, generator=generator, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out, _ = attention.chunked_attention(module, query, key, value, None, sliding_window=128)
    assert out.shape == (1, 512, 4, 8) and max(sizes) <= 512 * 4 * 8  # q, k and v themselves at most
    out.sum().backward()
    assert query.grad is not None and key.grad is not None
