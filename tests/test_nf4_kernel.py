"""The NF4 matmul kernel (engine/nf4_kernels.py), run by Triton's interpreter on the CPU, against
bitsandbytes' own dequantization and a matmul."""

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(("rows", "in_features", "out_features", "nested"),
                         [(2, 256, 48, True), (5, 512, 40, False), (17, 320, 33, True)])
def test_nf4_kernel_matches_dequantize_then_matmul(monkeypatch, rows, in_features, out_features, nested):
    import bitsandbytes as bnb
    import torch

    from lqmf.engine import nf4_kernels

    monkeypatch.setattr(nf4_kernels, "OFF_GPU", True)
    generator = torch.Generator().manual_seed(rows)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=nested)
    with torch.no_grad():
        layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, generator=generator) * 0.05,
                                         requires_grad=False, quant_type="nf4", compress_statistics=nested,
                                         blocksize=64)._quantize("cpu")
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    weight = nf4_kernels.NF4Weight.of(layer)
    assert weight is not None
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    assert weight.applies(x) and not weight.applies(x[:1])
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    expected = x.float() @ dequantized.float().t() + layer.bias.float()
    got = weight.matmul(x.view(rows, 1, in_features))
    assert got.shape == (rows, 1, out_features) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.view(rows, -1).float(), expected, rtol=2e-2, atol=2e-2)
