"""The NF4 matmul kernel (engine/nf4_kernels.py), run by Triton's interpreter on the CPU, against
bitsandbytes' own dequantization and a matmul, with and without split-K and double quantization."""

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")


def _layer(in_features: int, out_features: int, nested: bool, seed: int):
    import bitsandbytes as bnb
    import torch

    generator = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=nested)
    with torch.no_grad():
        layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, generator=generator) * 0.05,
                                         requires_grad=False, quant_type="nf4", compress_statistics=nested,
                                         blocksize=64)._quantize("cpu")
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    return layer


@pytest.mark.parametrize(("rows", "in_features", "out_features", "nested", "split"),
                         [(2, 256, 48, True, 1), (5, 512, 40, False, 2), (17, 384, 33, True, None)])
def test_nf4_kernel_matches_dequantize_then_matmul(monkeypatch, rows, in_features, out_features, nested, split):
    import bitsandbytes as bnb
    import torch

    from lqmf.engine import nf4_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LQMF_NF4_KERNEL", "1")
    monkeypatch.setattr(nf4_kernels, "OFF_GPU", True)
    layer = _layer(in_features, out_features, nested, rows)
    weight = nf4_kernels.NF4Weight.of(layer)
    assert weight is not None and (weight.absmax2 is not None) == nested
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    assert weight.applies(x) and not weight.applies(x[:1])
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    expected = x.float() @ dequantized.float().t() + layer.bias.float()
    config = nf4_kernels.Config(block_n=16, block_k=128, split=split)
    got = weight.matmul(x.view(rows, 1, in_features), config)
    assert got.shape == (rows, 1, out_features) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.view(rows, -1).float(), expected, rtol=2e-2, atol=2e-2)


def test_slices_divide_k_and_fill_the_machine():
    from lqmf.engine.nf4_kernels import Config, NF4Weight

    weight = NF4Weight(*[None] * 6, out_features=4096, in_features=14336, blocksize=64, blocksize2=256, bias=None)
    assert weight.slices(Config(block_n=64, block_k=128)) == 4  # 64 column blocks x 4 >= 264 programs
    assert weight.slices(Config(block_n=64, block_k=128, split=3)) == 2  # 112 chunks: 3 does not divide
    wide = NF4Weight(*[None] * 6, out_features=14336, in_features=4096, blocksize=64, blocksize2=256, bias=None)
    assert wide.slices(Config(block_n=64, block_k=128)) == 2
