"""The Triton LoRA kernels (engine/lora/kernels.py), run by Triton's interpreter on the CPU.

On a GPU machine conftest.py leaves the interpreter off (the GPU check runs the kernels compiled), so
these CPU runs are skipped there; tests/gpu covers the kernels on the GPU."""

import pytest

from tests.helpers import triton_interpreter_only

triton_interpreter_only("tests/gpu runs the kernels")


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels, run on the CPU by Triton's interpreter (conftest.py sets TRITON_INTERPRET)."""
    from lqmf.engine.lora import kernels as lora_kernels

    monkeypatch.setattr(lora_kernels, "OFF_GPU", True)
    return lora_kernels


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize(("rows", "width", "rank", "outputs"),
                         [(1, 256, 48, 384), (3, 1000, 16, 70), (1, 4096, 8, 100)])
def test_kernels_compute_the_scaled_product(interpreted, dtype_name, rows, width, rank, outputs):
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=generator).to(dtype)
    a = (torch.randn(rank, width, generator=generator) * 0.05).to(dtype)
    b = (torch.randn(outputs, rank, generator=generator) * 0.05).to(dtype)
    assert interpreted.kernels_apply(x, a)
    got = interpreted.scaled_product(x, a, b, 2.0)
    # x A^T rounded to the input dtype, as PEFT's GEMM leaves it; accumulation in fp32
    expected = (x.float() @ a.float().t()).to(dtype).float() @ b.float().t() * 2.0
    assert got.dtype == dtype and got.shape == (rows, outputs)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * float(expected.abs().max())
    assert float((got.float() - expected).abs().max()) <= tolerance


def test_kernels_read_strided_views_and_step_aside_when_they_should(interpreted, monkeypatch):
    import torch

    block = torch.randn(300, 48)
    b = block[100:200, 16:32]  # a member's B inside a fused block-diagonal tensor
    a, x = torch.randn(16, 64), torch.randn(1, 64)
    torch.testing.assert_close(interpreted.scaled_product(x, a, b, 0.5), x @ a.t() @ b.t() * 0.5)
    assert not interpreted.kernels_apply(torch.randn(interpreted.MAX_ROWS + 1, 64), a)  # a prompt: cuBLAS
    monkeypatch.setenv("LQMF_LORA_KERNELS", "0")
    assert not interpreted.kernels_apply(x, a)


def test_lean_decode_step_with_kernels_matches_peft(interpreted):
    """One-row forwards through the lean layers (q/k/v as one group, the kernels) give PEFT's logits."""
    import torch

    from lqmf.engine.lora.lean import use_lean_lora
    from tests.helpers import lora_model

    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(2))
    peft_model, lean_model = lora_model().eval(), lora_model(lean=True).eval()
    use_lean_lora(lean_model)
    with torch.no_grad():
        torch.testing.assert_close(lean_model(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def _adapter_entries(ranks: list[int], names: tuple[str, ...], sizes: list[int], width: int, dtype):
    import torch

    from lqmf.engine.lora.stacked import StackedAdapter

    generator = torch.Generator().manual_seed(sum(ranks))
    entries = []
    for number, rank in enumerate(ranks):  # each adapter lacks one projection
        weights = {name: ((torch.randn(rank, width, generator=generator) * 0.1).to(dtype),
                          (torch.randn(size, rank, generator=generator) * 0.1).to(dtype), 0.5 + number)
                   for i, (name, size) in enumerate(zip(names, sizes, strict=True)) if (number + i) % 3 != 2}
        entries.append(StackedAdapter(number, f"a{number}", None, weights))
    return entries


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("count", [1, 5])
def test_each_row_gets_its_own_adapters_product(interpreted, monkeypatch, dtype_name, count):
    """rows_product_into through the per-row kernels, and through the GEMMs over every adapter, against
    each row's product computed alone; adapters of different ranks, some lacking a projection, index 0 none."""
    import torch

    from lqmf.engine.lora.stacked import adapter_tables

    dtype = getattr(torch, dtype_name)
    names, sizes, width = ("q_proj", "k_proj", "v_proj"), [128, 64, 64], 96
    entries = _adapter_entries([8, 4, 16], names, sizes, width, dtype)
    tables = adapter_tables(names, sizes, dict(enumerate(entries, 1)))
    assert tables.a.shape == (4, 3 * 16, width) and tables.b.shape == (256, 4, 16) and tables.fits_kernels
    generator = torch.Generator().manual_seed(count)
    x = torch.randn(count, width, generator=generator).to(dtype)
    rows = torch.tensor([3, 0, 1, 2, 3][:count])
    base = torch.randn(count, sum(sizes), generator=generator).to(dtype)
    expected = base.float().clone()
    for i, index in enumerate(rows.tolist()):
        start = 0
        for name, size in zip(names, sizes, strict=True):
            if index and name in entries[index - 1].weights:
                a, b, scaling = entries[index - 1].weights[name]
                low = (x[i].float() @ a.float().t()).to(dtype).float()
                expected[i, start:start + size] += low @ b.float().t() * scaling
            start += size
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2 * float(expected.abs().max())
    assert interpreted.kernels_apply(x, tables.a, interpreted.MAX_TABLE_ROWS)
    calls = []
    real = interpreted._rows_kernels_into
    monkeypatch.setattr(interpreted, "_rows_kernels_into", lambda *args: calls.append(1) or real(*args))
    for kernels in ("1", "0"):
        monkeypatch.setenv("LQMF_LORA_KERNELS", kernels)
        out = base.clone()
        interpreted.rows_product_into(out, x, rows, tables)
        assert float((out.float() - expected).abs().max()) <= tolerance, f"kernels {kernels}"
    assert calls == [1]  # the kernels ran once, the GEMMs the other time


def test_adapter_tables_hold_the_one_copy_and_rebuild_from_it():
    """Entries' weights become views of the tables; tables built again (an adapter added) give the same products."""
    import torch

    from lqmf.engine.lora.kernels import rows_product_into
    from lqmf.engine.lora.stacked import adapter_tables

    names, sizes, width = ("gate_proj", "up_proj"), [64, 64], 32
    entries = _adapter_entries([4, 8], names, sizes, width, torch.float32)
    first = adapter_tables(names, sizes, dict(enumerate(entries, 1)))
    held = [tensor for entry in entries for a, b, _ in entry.weights.values() for tensor in (a, b)]
    storages = {first.a.untyped_storage().data_ptr(), first.b.untyped_storage().data_ptr()}
    assert {t.untyped_storage().data_ptr() for t in held} == storages
    x, rows = torch.randn(3, width), torch.tensor([1, 2, 0])
    before = torch.zeros(3, 128)
    rows_product_into(before, x, rows, first)
    more = [*entries, *_adapter_entries([2], names, sizes, width, torch.float32)]
    again = adapter_tables(names, sizes, dict(enumerate(more, 1)))
    assert again.a.shape[0] == 4 and again.a.data_ptr() != first.a.data_ptr()
    after = torch.zeros(3, 128)
    rows_product_into(after, x, rows, again)
    torch.testing.assert_close(after, before)
    assert torch.count_nonzero(before[2]) == 0 and torch.count_nonzero(before[:2]) > 0


def test_an_adapter_loads_into_a_free_slot_in_place():
    """Tables built for more slots than adapters take one more (and one replacing a slot's old adapter)
    where they are: the same storage, the products of tables built anew, nothing of the old one left."""
    import torch

    from lqmf.engine.lora.kernels import rows_product_into
    from lqmf.engine.lora.stacked import adapter_tables

    names, sizes, width = ("q_proj", "k_proj", "v_proj"), [128, 64, 64], 32
    first, second, third, small = _adapter_entries([8, 16, 4, 2], names, sizes, width, torch.float32)
    tables = adapter_tables(names, sizes, {1: first, 2: second}, slots=4)
    assert tables.slots == 4 and tables.rank == 16 and tables.leading == 3  # off the GPU, products read slots 0-2
    storage = (tables.a.data_ptr(), tables.b.data_ptr())
    assert tables.takes(3, names, third) and not tables.takes(5, names, third) and not tables.takes(0, names, third)
    tables.put(3, names, third)
    tables.put(1, names, small)  # the slot of `first`, which held a larger rank
    assert (tables.a.data_ptr(), tables.b.data_ptr()) == storage
    fresh = adapter_tables(names, sizes, {1: small, 2: second, 3: third})
    x, rows = torch.randn(5, width), torch.tensor([3, 1, 2, 0, 4])
    got, want = torch.zeros(5, 256), torch.zeros(5, 256)
    rows_product_into(got, x, rows, tables)
    rows_product_into(want[:4], x[:4], rows[:4], fresh)
    torch.testing.assert_close(got, want)
    assert torch.count_nonzero(got[3:]) == 0  # no adapter, and a slot never written
    bigger = _adapter_entries([32], names, sizes, width, torch.float32)[0]
    assert not tables.takes(2, names, bigger)  # a larger rank: the tables must be built anew
    assert tables.leading == 4
    tables.clear(2)  # an adapter left: its slot holds zeros, never what it held (0 x NaN would be NaN)
    assert torch.count_nonzero(tables.a[2]) == 0 and torch.count_nonzero(tables.b[:, 2]) == 0
    assert torch.count_nonzero(tables.a[1]) > 0 and torch.count_nonzero(tables.a[3]) > 0
    tables.clear(3)
    assert tables.leading == 2
