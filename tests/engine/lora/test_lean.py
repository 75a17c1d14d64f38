"""Our LoRA layer classes for training (engine/lora/lean.py): the loss, gradients and logits of PEFT's own."""

from __future__ import annotations


def test_lean_lora_trains_like_peft():
    """Same loss and LoRA gradients as PEFT's own forward, dropout included (same random masks)."""
    import torch

    from lqmf.engine.lora.lean import lean_state, use_lean_lora, uses_lean_forward
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
    """Members scaled alike or apart, prompt or one row: PEFT's logits, one product per group leader."""
    import torch

    from lqmf.engine.lora import lean
    from tests.helpers import lora_model

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    peft_model, lean_model = lora_model().eval(), lora_model(lean=True).eval()
    lean.use_lean_lora(lean_model)
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


def test_kept_dropout_gives_the_same_gradients_and_keeps_what_the_planner_counts():
    """recompute_dropout off: each LoRA layer keeps its dropout's output and mask (no checkpoint of its own);
    the same gradients, bit for bit, as recomputing it (blocks checkpointed), and the bytes kept beyond
    the recomputing forward's are what the planner's per-token count says (unique storages saved for
    backward, one forward without checkpointing)."""
    from dataclasses import replace

    import torch

    from lqmf.core.memory_plan import ModelShape, TrainSettings, _block_bytes_per_token, _lora_targets
    from lqmf.engine.lora.lean import recompute_lora_dropout, use_lean_lora
    from tests.helpers import gradients, lora_model

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    recomputed, kept = lora_model(lean=True), lora_model(lean=True)
    use_lean_lora(recomputed), use_lean_lora(kept)
    recompute_lora_dropout(kept, False)
    expected, got = gradients(recomputed, ids), gradients(kept, ids)
    assert set(expected) == set(got) and len(got) == 24
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name

    def saved_bytes(model) -> int:  # activations: parameters (their transposes too) are counted apart
        parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in parameters:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        model.base_model.model.gradient_checkpointing_disable()
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, labels=ids).loss.backward()
        return sum(storages.values())

    config = recomputed.base_model.model.config
    shape = ModelShape.from_config({**config.to_dict(), "model_type": "llama"})
    settings = TrainSettings(lora_r=4, lora_dropout=0.1, device="cpu", target_modules=("q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"))
    lora = _lora_targets(shape, settings.target_modules)

    def per_token(recompute: bool) -> float:
        return _block_bytes_per_token(shape, replace(settings, recompute_lora_dropout=recompute), lora, False, 32)[0]

    counted = (per_token(False) - per_token(True)) * ids.numel() * config.num_hidden_layers
    assert counted > 0 and saved_bytes(kept) - saved_bytes(recomputed) == counted
