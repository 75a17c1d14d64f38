"""The NF4 Triton kernel (engine/lora/nf4.py) compiled on the GPU, against bitsandbytes' own path.

Skipped without CUDA. bf16 inputs: the kernel rounds each dequantized value to bf16 as bitsandbytes'
dequantize_4bit does, so it differs from the float32 product of those bf16 values by its final
rounding and the order of the sums: within two bf16 units in the last place (2 x 2**-7 relative)
plus 1e-3 of the largest output. float32 inputs: within 1e-4 of the largest output (full-precision
tl.dot, not TF32). Captured in a CUDA graph, it gives what it gives eagerly."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("the GPU check needs CUDA", allow_module_level=True)
pytest.importorskip("triton")


def _group():
    """A q/k/v-like group of bitsandbytes NF4 layers (nested absmax, as the loader makes them) on the GPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layers = []
    for rows in (512, 128, 128):
        layer = bnb.nn.Linear4bit(1024, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight.data.normal_(0, 0.02)
        layers.append(layer.cuda())  # quantizes
    return layers


@pytest.fixture(autouse=True)
def switched_on(monkeypatch):
    monkeypatch.setenv("LQMF_NF4_KERNEL", "1")


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 40, 64])
def test_nf4_kernel_matches_bitsandbytes_on_the_gpu(rows):
    from bitsandbytes.functional import dequantize_4bit

    from lqmf.engine.lora.nf4 import kernel_applies, nf4_base

    layers = _group()
    dense = torch.cat([dequantize_4bit(layer.weight.data, layer.weight.quant_state).float() for layer in layers])
    base = nf4_base(layers)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(rows, 1024, device="cuda").to(dtype)
        assert kernel_applies(x, base.shape, base.blocksize)
        exact = x.float() @ dense.t()
        error = (base(x).float() - exact).abs()
        largest = float(exact.abs().max())
        if dtype == torch.bfloat16:  # late_scale rounds the codes, not code * absmax: as far off as bitsandbytes
            own = (torch.cat([layer(x) for layer in layers], dim=-1).float() - exact).abs()
            assert float(error.max()) <= 2 * float(own.max()) and float(error.mean()) <= 2 * float(own.mean())
        else:
            assert float(error.max()) <= 1e-4 * largest


def test_nf4_kernel_runs_in_a_cuda_graph():
    from lqmf.engine.lora.nf4 import nf4_base

    base = nf4_base(_group())
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    eager = base(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = base(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 16, 33])
def test_register_lookup_gives_what_the_memory_lookup_gives(rows, dtype_name):
    """lut 2 (PTX byte-permute lookups) against lut 0 (loads from the code) in the same late_scale
    config: both round the same codes to the same 16-bit values and hand them to tl.dot in the same
    runs of k, so the outputs are equal bit for bit; and the check NF4Linear makes before it takes lut 2
    passes."""
    from lqmf.engine.lora.nf4 import Config, NF4Linear, launched, nf4_matmul, register_lookup_works

    assert register_lookup_works("cuda:0")

    base = NF4Linear.of_module(_group()[0])
    x = torch.randn(rows, 1024, device="cuda").to(getattr(torch, dtype_name))
    config = Config(block_m=16 if rows <= 16 else 64, block_k=256, lut=2, swap=True, late_scale=True)
    assert base.standard_code and launched(config, x, base.standard_code) == config
    runs = [nf4_matmul(x, base.packed, base.absmax, base.code, base.shape, base.blocksize, replace(config, lut=lut))
            for lut in (0, 2)]
    assert torch.equal(runs[0], runs[1])
