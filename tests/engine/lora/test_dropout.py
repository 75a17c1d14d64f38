"""LoRA's dropout inside the rank-r product (engine/lora/dropout.py), its kernels run by Triton's interpreter
on the CPU: a dropout's mask, the product and both gradients of torch's dropout and GEMMs given that mask,
the same mask drawn again by a checkpoint's recomputation, and a lean LoRA model's loss and gradients equal
to PEFT's given the same masks. The kernels compile for sm_90 without spilling; tests/gpu runs them."""

import pytest

from tests.helpers import compiled_for_sm90, triton_interpreter_only

triton_interpreter_only("tests/gpu checks the kernels")


@pytest.fixture
def dropout(monkeypatch):
    from lqmf.engine.lora import dropout as module

    monkeypatch.setattr(module, "OFF_GPU", True)
    return module


def test_the_mask_keeps_each_value_with_probability_one_minus_p(dropout):
    import torch

    for p in (0.05, 0.5):
        mask = dropout.mask(256, 1000, p, seed=7, device="cpu").float()
        kept = mask.mean().item()
        assert abs(kept - (1 - p)) < 4 * ((p * (1 - p) / mask.numel()) ** 0.5)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    first = dropout.mask(130, 200, 0.3, seed=11, device="cpu")
    assert torch.equal(first, dropout.mask(130, 200, 0.3, seed=11, device="cpu"))  # the seed decides
    assert not torch.equal(first, dropout.mask(130, 200, 0.3, seed=12, device="cpu"))
    assert len({tuple(row.tolist()) for row in first}) == 130  # no two rows alike
    columns = first.float().mean(0)  # every column dropped at the same rate, lanes and groups alike
    assert columns.min() > 0.45 and columns.max() < 0.9


def _reference(x, weight, mask, p: float, dtype):
    """torch's dropout (with mask) and GEMM in float32, the dropped values and the weight rounded to dtype as
    the kernels and autocast round them."""
    dropped = (x * mask.float() * (1.0 / (1.0 - p))).to(dtype).float()
    return dropped @ weight.to(dtype).float().t()


def _assert_near(got, want, rel: float):
    """Each value within rel of the reference's, or of a millionth of its largest (sums that cancel)."""
    import torch

    bound = rel * want.abs() + 1e-6 * want.abs().max()
    assert torch.all((got.float() - want).abs() <= bound), (got.float() - want).abs().max()


@pytest.mark.parametrize(("rows", "columns", "rank", "dtype_name", "p"), [
    (70, 200, 8, "float32", 0.3),  # rows and columns not multiples of the tiles; a rank below the tile
    (130, 128, 16, "bfloat16", 0.05),
    (5, 64, 40, "float32", 0.5),
    (64, 96, 16, "float16", 0.1),
])
def test_product_and_gradients_equal_torchs_given_the_same_mask(dropout, rows, columns, rank, dtype_name, p):
    """The product rounded once from float32, x's gradient twice (the rank-r GEMM's output, then scaled), A's
    summed in float32 (torch's rounds to x's dtype, as autocast's GEMM does): each within those roundings of
    torch's result given the kernels' mask."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(rows * columns)
    x = torch.randn(rows, columns, generator=generator).to(dtype)
    weight = torch.randn(rank, columns, generator=generator)  # fp32, as LoRA's A trains
    grad = torch.randn(rows, rank, generator=generator).to(dtype)
    torch.manual_seed(3)
    mask = dropout.mask(rows, columns, p, dropout.draw_seed(), "cpu")

    torch.manual_seed(3)  # the Function draws the same seed
    fused_x, fused_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = dropout.low_rank(fused_x, fused_w, p)
    out.backward(grad)
    ref_x, ref_w = x.float().requires_grad_(), weight.clone().requires_grad_()
    expected = _reference(ref_x, ref_w, mask, p, dtype)
    expected.backward(grad.float())

    rounding = 1e-6 if dtype == torch.float32 else 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert out.dtype == dtype and out.shape == (rows, rank)
    assert fused_x.grad.dtype == dtype and fused_w.grad.dtype == torch.float32
    _assert_near(out, expected.detach(), rounding)
    _assert_near(fused_x.grad, ref_x.grad, 2 * rounding)
    _assert_near(fused_w.grad, ref_w.grad, max(rounding, 1e-5))  # the reference's rounds to dtype, as autocast's
    assert torch.all(fused_x.grad[mask == 0] == 0)  # a dropped value passes no gradient back


def test_a_checkpoints_recomputation_draws_the_same_mask(dropout):
    """Under torch's checkpoint (which restores the CPU generator) the recomputed forward draws the seed the
    first forward drew, so the gradients are those of the unchecked run, bit for bit."""
    import torch
    from torch.utils.checkpoint import checkpoint

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 40, 96, generator=generator), torch.randn(16, 96, generator=generator)

    def run(checked: bool):
        inputs, down = x.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.manual_seed(5)
        low = (checkpoint(dropout.low_rank, inputs, down, 0.2, use_reentrant=False) if checked
               else dropout.low_rank(inputs, down, 0.2))
        torch.rand(7)  # the generator moves on between forward and backward
        (low.square().sum()).backward()
        return low.detach(), inputs.grad, down.grad

    for plain, checked in zip(run(False), run(True), strict=True):
        assert torch.equal(plain, checked)
    assert not torch.equal(run(False)[0], (torch.manual_seed(6), dropout.low_rank(x, weight, 0.2))[1])


def test_lean_lora_with_the_fused_dropout_trains_like_peft_given_its_masks(dropout):
    """A 4-bit-free tiny Llama with r=4 LoRA on q/k/v/o (dropout 0.1), checkpointed layer by layer: with the
    dropout in the kernels, the loss and LoRA gradients of PEFT's own layers whose dropout draws the same
    masks; every LoRA layer switched on, and with the kernels off the lean forward is PEFT's again."""
    import torch

    from lqmf.engine.lora.lean import fuse_lora_dropout, lean_state, lora_layers, use_lean_lora
    from tests.helpers import gradients, kernel_masked_dropouts, lora_model

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    reference, fused = lora_model(), lora_model(lean=True)
    kernel_masked_dropouts(reference)
    use_lean_lora(fused)
    assert fuse_lora_dropout(fused) == 12 and all(lean_state(layer).fused_dropout for layer in lora_layers(fused))
    calls = []
    low_rank = dropout.low_rank
    dropout.low_rank = lambda *args: calls.append(args[2]) or low_rank(*args)
    try:
        expected, got = gradients(reference, ids), gradients(fused, ids)
    finally:
        dropout.low_rank = low_rank
    assert calls == [0.1] * 24  # each LoRA layer in forward, and again in the layer's recomputation
    assert set(expected) == set(got) and len(got) == 24
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)


def test_the_kernels_compile_for_sm90_without_spilling():
    """Compiled for an H100 (sm_90, no GPU needed) in a process without the interpreter, for bf16 and fp16
    and ranks up to MAX_RANK: every kernel builds, and none spills registers to local memory."""
    probe = ("from lora_dropout_bench import compiled\n"
             "from nf4_sass_count import resource_usage\n"
             "for dtype in ('bf16', 'fp16'):\n"
             "    for rank in (16, 64):\n"
             "        for name in ('dropout_shrink_kernel', 'dropout_shrink_backward_kernel'):\n"
             "            print(resource_usage(compiled(name, dtype, rank))['spilled'])\n"
             "print(resource_usage(compiled('dropout_mask_kernel', 'bf16', 16))['spilled'])\n")
    assert compiled_for_sm90(probe) == ["0"] * 9
