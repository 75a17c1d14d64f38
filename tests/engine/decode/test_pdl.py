"""decode/pdl.py: the decode step's Triton kernels as programmatic dependent launches (Hopper and newer).

A kernel launched that way starts while the kernel before it still runs, so it must not touch memory
before `gdc_wait`. The GPU check (tests/gpu) runs the decode step with them against stock PEFT; here,
without a GPU: every kernel that takes the PDL flag waits before its first load or store, and no launch
asks for PDL off the GPU or when switched off."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")


def _decode_kernels() -> dict[str, object]:
    from lqmf.engine.decode import kernels as decode
    from lqmf.engine.lora import kernels as lora
    from lqmf.engine.lora import nf4_kernels

    shrink_rows, expand_rows = lora._row_kernels()
    named = {name: value for name, value in vars(decode._kernels()).items() if name.endswith("_kernel")}
    _, shrink, expand = lora._kernels()
    return {**named, "shrink": shrink, "expand": expand, "shrink_rows": shrink_rows, "expand_rows": expand_rows,
            "nf4_matmul_kernel": nf4_kernels.nf4_matmul_kernel, "nf4_gemv_kernel": nf4_kernels.nf4_gemv_kernel,
            "reduce_splits": nf4_kernels.reduce_splits}


def test_every_decode_kernel_waits_before_it_touches_memory():
    kernels = _decode_kernels()
    assert len(kernels) == 12
    for name, kernel in kernels.items():
        source = inspect.getsource(kernel.fn)
        signature, body = source.split("):\n", 1)
        assert "PDL: tl.constexpr = False" in signature, name
        lines = [line.strip() for line in body.splitlines()]
        first_access = min(number for number, line in enumerate(lines)
                           if any(call in line for call in ("tl.load(", "tl.store(", "tl.atomic_")))
        wait = lines.index("tl.extra.cuda.gdc_wait()")
        assert lines[wait - 1].startswith("if PDL:") and wait < first_access, name
        assert lines[wait + 1] == "tl.extra.cuda.gdc_launch_dependents()", name


def test_no_dependent_launch_off_the_gpu_or_switched_off(monkeypatch):
    from lqmf.engine.decode import pdl

    assert pdl.launch(torch.device("cpu")) == {}
    monkeypatch.setenv("LQMF_PDL", "0")
    assert pdl.launch(torch.device("cuda", 0)) == {}  # decided before any CUDA call
