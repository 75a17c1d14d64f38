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
@pytest.mark.parametrize("rows", [1, 33])
@pytest.mark.parametrize(("block_n", "warps", "stages"), [(64, 4, 2), (32, 2, 3)])
def test_register_lookup_is_taken_only_where_its_variant_checks_out(rows, dtype_name, block_n, warps, stages):
    """lut 2 (PTX byte-permute lookups) against lut 0 (loads from the code) in the same late_scale config,
    a tile on which an H100 saw lut 2 group the wrong bytes (4 warps, swapped) and one where it did not:
    where lookup_verified passes the variant, the two agree to two units in the last place of the output
    (the same values; the compiled tiles may add them in another order: on an H100, bf16 outputs were
    equal bit for bit and 5 to 16 of 8,192 to 16,896 fp16 outputs apart, by at most 0.000977, one unit
    at 1 to 2); where it does not, nf4_matmul gives lut 1's output."""
    from lqmf.engine.lora import nf4

    base = nf4.NF4Linear.of_module(_group()[0])
    x = torch.randn(rows, 1024, device="cuda").to(getattr(torch, dtype_name))
    config = nf4.Config(block_m=16 if rows <= 16 else 64, block_n=block_n, block_k=256, warps=warps, stages=stages,
                        lut=2, swap=True, late_scale=True)
    fitted, split = nf4.fitted(config, rows, base.shape, base.blocksize)
    assert base.standard_code and nf4.launched(fitted, x, True) == fitted
    verified = nf4.lookup_verified(fitted, split, x, base.packed, base.absmax, base.code, base.shape, base.blocksize)
    runs = {lut: nf4.nf4_matmul(x, base.packed, base.absmax, base.code, base.shape, base.blocksize,
                                replace(config, lut=lut)) for lut in (0, 1, 2)}
    print(f"lut 2, {fitted}, {rows} rows, {dtype_name}: {'checked out' if verified else 'lut 1 instead'}")
    if verified:
        torch.testing.assert_close(runs[2], runs[0], rtol=2 * torch.finfo(x.dtype).eps, atol=0)
    else:
        assert torch.equal(runs[2], runs[1])


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize(("block_n", "block_k", "warps"), [(64, 256, 4), (16, 512, 1)])
def test_lut_3_gives_lut_2s_values_in_a_gemv(dtype_name, block_n, block_k, warps):
    """lut 3 (the table's words as the PTX's operands) in one-row GEMVs, gate/up's tile and the other
    projections': its variant checks out and gives lut 2's output to two units in the last place (the
    same values; each compiled loop may add them in its own order), inside a CUDA graph too."""
    from lqmf.engine.lora import nf4

    base = nf4.NF4Linear.of_module(_group()[0])
    x = torch.randn(1, 1024, device="cuda").to(getattr(torch, dtype_name))
    config = nf4.Config(block_m=1, block_n=block_n, block_k=block_k, warps=warps, split=2, dot=False, lut=3,
                        late_scale=True)
    fitted, split = nf4.fitted(config, 1, base.shape, base.blocksize)
    assert nf4.launched(fitted, x, True).lut == 3
    assert nf4.lookup_verified(fitted, split, x, base.packed, base.absmax, base.code, base.shape, base.blocksize)
    args = (x, base.packed, base.absmax, base.code, base.shape, base.blocksize)
    lut3 = nf4.nf4_matmul(*args, config, standard_code=True)  # given: checking it inside a capture would sync
    lut2 = nf4.nf4_matmul(*args, replace(config, lut=2), standard_code=True)
    torch.testing.assert_close(lut3, lut2, rtol=2 * torch.finfo(x.dtype).eps, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nf4.nf4_matmul(*args, config, standard_code=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, lut3)


def test_every_tuned_config_checks_out_at_the_7b_shapes():
    """Each nf4.CONFIGS entry, at its row bucket and Mistral-7B shape, in bfloat16: lookup_verified passes its
    variant (else the server would run lut 1 there, slower), and the output is bitsandbytes' within the
    module's bf16 bound."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from lqmf.engine.lora import nf4

    failed = []
    for (rows, out_features, in_features), config in nf4.CONFIGS.items():
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
        layer.weight.data.normal_(0, 0.02)
        base = nf4.NF4Linear.of_module(layer.cuda())
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        fitted, split = nf4.fitted(config, rows, base.shape, base.blocksize)
        if not nf4.lookup_verified(fitted, split, x, base.packed, base.absmax, base.code, base.shape, base.blocksize):
            failed.append((rows, out_features, in_features))
        exact = x.float() @ dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().t()
        error = float((base(x).float() - exact).abs().max())
        assert error <= 2 * 2**-7 * float(exact.abs().max()), (rows, out_features, in_features, error)
    assert not failed, f"lut 2 falls back to lut 1 at {failed}"


@pytest.mark.parametrize("rows", [1, 16])
def test_dependent_launches_see_the_kernel_before_them(monkeypatch, rows):
    """On Hopper or newer (LQMF_PDL unset or 1, decode/pdl.py) an NF4 matmul launches while the RMSNorm
    before it still runs and waits for the norm's writes before it reads x; its split-K sums and the
    next norm wait for it in turn. A captured chain norm -> matmul -> norm ... replayed
    gives the same bits as the chain launched plainly and eagerly (PDL changes when kernels start, not
    what they compute)."""
    import bitsandbytes as bnb

    from lqmf.engine.decode import kernels, pdl
    from lqmf.engine.lora import nf4

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs Hopper or newer")
    layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight.data.normal_(0, 0.02)
    base = nf4.NF4Linear.of_module(layer.cuda())
    weight = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)

    def chain(h):
        for _ in range(6):
            h = base(kernels.rms_norm(h, weight, 1e-6)[1])
        return h

    monkeypatch.setenv("LQMF_PDL", "0")
    plain = chain(x)
    monkeypatch.delenv("LQMF_PDL")
    assert pdl.launch(x.device) and nf4.fitted(nf4.config_for(rows, 1024, 1024), rows, base.shape, 64)[1] > 1
    chain(x)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, plain)


@pytest.mark.parametrize(("rows", "dot"), [(1, False), (1, True), (16, True), (32, True)])
def test_serial_split_k_gives_the_reduce_kernels_bits(rows, dot):
    """Serial split K (nf4.Config.serial): the last slice of each tile to finish sums the slices through a
    counter, in slice order, instead of reduce_splits. At a 7B down_proj shape with 8 and 16 slices, in a
    chain of dependent launches captured in a CUDA graph and replayed many times (a lost ordering
    between the partials and the count would show as different bits), it gives reduce_splits' bits
    and leaves every counter at zero."""
    import bitsandbytes as bnb

    from lqmf.engine.lora import nf4

    layer = bnb.nn.Linear4bit(14336, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight.data.normal_(0, 0.02)
    base = nf4.NF4Linear.of_module(layer.cuda())
    x = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16)
    tile = (nf4.Config(block_m=16 if rows <= 16 else 32, block_n=64, block_k=256, lut=2, late_scale=True) if dot
            else nf4.Config(block_m=1, block_n=64, block_k=256, dot=False, lut=2, late_scale=True))
    for split in (8, 16):
        plain, serial = replace(tile, split=split), replace(tile, split=split, serial=True)

        def run(config, x=x):
            return nf4.nf4_matmul(x, base.packed, base.absmax, base.code, base.shape, base.blocksize, config,
                                  standard_code=base.standard_code)

        want = run(plain)
        assert torch.equal(run(serial), want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [run(serial) for _ in range(8)]
        for _ in range(50):
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(out, want) for out in outs)
        assert not nf4._COUNTERS[str(x.device)].any()
