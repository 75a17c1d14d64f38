"""Training's frozen NF4 base (engine/lora/nf4_frozen.py), its dequantize kernel run by Triton's interpreter
on the CPU: bitsandbytes' own dequantize_4bit bit for bit, and so the same loss and gradients as its
matmul_4bit, alone and in a 4-bit LoRA model. tests/gpu checks the same on a GPU."""

import pytest

from tests.helpers import triton_interpreter_only

pytest.importorskip("bitsandbytes")
triton_interpreter_only("tests/gpu checks the kernel")


@pytest.fixture
def nf4_frozen(monkeypatch):
    from lqmf.engine.lora import nf4_frozen as module

    monkeypatch.setattr(module, "OFF_GPU", True)
    return module


def _layer(out_features: int, in_features: int, nested: bool, dtype, blocksize: int = 64, bias: bool = False):
    """A bitsandbytes NF4 Linear4bit of a random weight, quantized on the CPU."""
    import bitsandbytes as bnb
    import torch

    generator = torch.Generator().manual_seed(out_features * in_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, generator=generator) * 0.05,
                                     requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                     blocksize=blocksize)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator).to(dtype), requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize(("out_features", "in_features", "nested", "dtype_name", "blocksize"), [
    (48, 320, True, "bfloat16", 64),
    (40, 1024, True, "float16", 64),  # more than one second-level block (256 first-level blocks each)
    (33, 64, False, "bfloat16", 64),
    (7, 128, False, "float32", 128),
    (3, 65, True, "bfloat16", 64),  # an odd number of values: the last byte holds one
])
def test_dequantize_is_bitsandbytes_bit_for_bit(nf4_frozen, out_features, in_features, nested, dtype_name, blocksize):
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from lqmf.engine import compat

    dtype = getattr(torch, dtype_name)
    layer = _layer(out_features, in_features, nested, dtype, blocksize)
    parts = compat.nf4_stored_parts(layer)
    assert parts["nested"] is nested and parts["shape"] == (out_features, in_features)
    expected = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    got = nf4_frozen.dequantize(parts, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_matmul_gives_bitsandbytes_output_and_input_gradient(nf4_frozen, bias):
    import torch

    layer = _layer(96, 256, True, torch.bfloat16, bias=bias)
    model = torch.nn.Sequential(layer)
    assert nf4_frozen.switch_on(model) == 1
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    grad = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    results = []
    for run in (layer, lambda inputs: nf4_frozen.linear(layer, inputs)):
        inputs = x.clone().requires_grad_()
        out = run(inputs)
        out.backward(grad)
        results.append((out.detach(), inputs.grad, type(out.grad_fn).__name__))
    (expected, expected_grad, _), (got, got_grad, function) = results
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
    assert "FrozenNF4Matmul" in function


def test_linear_calls_the_module_where_the_frozen_path_does_not_apply(nf4_frozen, monkeypatch):
    import torch

    layer = _layer(32, 64, True, torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    nf4_frozen.linear(layer, x)  # not switched on
    nf4_frozen.switch_on(torch.nn.Sequential(layer))
    with torch.no_grad():
        nf4_frozen.linear(layer, x)  # no gradients: bitsandbytes' inference kernels serve
    nf4_frozen.linear(layer, x.float())  # not the compute dtype
    monkeypatch.setattr(nf4_frozen, "OFF_GPU", False)
    nf4_frozen.linear(layer, x)  # on the CPU
    monkeypatch.setattr(nf4_frozen, "OFF_GPU", True)
    assert len(calls) == 4
    nf4_frozen.linear(layer, x)
    assert len(calls) == 4


def test_a_4bit_lora_model_trains_alike_with_the_frozen_path(nf4_frozen, tmp_path, monkeypatch):
    """The lean LoRA layers' 4-bit base through FrozenNF4Matmul: bitsandbytes' loss and LoRA gradients, bit for bit."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from lqmf.engine.lora.lean import use_lean_lora
    from tests.helpers import gradients, with_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantized, dtype=torch.bfloat16)
    model = with_lora(model, lean=True)
    use_lean_lora(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs it (the LoRA weights are float32)
        expected = gradients(model, ids)
        assert nf4_frozen.switch_on(model) == 2 * 7
        dequantized = []
        dequantize = nf4_frozen.dequantize
        monkeypatch.setattr(nf4_frozen, "dequantize", lambda *args: dequantized.append(1) or dequantize(*args))
        got = gradients(model, ids)
    # q/k/v/o's bases in 2 layers: 8 forwards, and 5 backwards (not layer 0's q/k/v: their input, the embedding's
    # norm, needs no gradient); the MLPs are bitsandbytes' (the fused SwiGLU, on CUDA, would route them too)
    assert len(dequantized) == 8 + 5
    assert set(got) == set(expected) and len(got) == 16
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name
