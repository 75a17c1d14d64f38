"""The batched decoder's fused kernels (engine/decode/kernels.py), run by Triton's interpreter on the CPU:
each against the torch code it replaces, and a decoder step with them against one without.

Tolerances: float32 results agree to float32 rounding (1e-5). In bfloat16 the interpreter rounds
float32 to bfloat16 by truncation where torch (and Triton on a GPU) round to nearest, so a kernel's
bfloat16 output may sit a bfloat16 step (2**-7 of its magnitude) from torch's for each rounding on
its way (two in rotary and RMSNorm, three after the residual add); attention, whose scores torch
rounds to bfloat16 and the kernel keeps in float32, within 2% of the largest output. On a GPU
machine the interpreter is off and tests/gpu runs the kernels compiled."""

import pytest

from tests.helpers import triton_interpreter_only

triton_interpreter_only("tests/gpu runs the kernels")

DTYPES = ["float32", "bfloat16"]


@pytest.fixture
def interpreted(monkeypatch):
    from lqmf.engine.decode import kernels as decode_kernels

    monkeypatch.setattr(decode_kernels, "OFF_GPU", True)
    return decode_kernels


def steps(got, expected, count: float = 1.0) -> None:
    """got within count bfloat16 steps of expected's magnitude (float32: within 1e-5 of it)."""
    import torch

    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = float(expected.float().abs().max())
    tolerance = 1e-5 * max(scale, 1.0) if got.dtype == torch.float32 else count * 2 ** -7 * scale
    assert float((got.float() - expected.float()).abs().max()) <= tolerance


def random(*shape, dtype, generator):
    import torch

    return torch.randn(*shape, generator=generator).to(getattr(torch, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_the_residual_add_is_llama_rms_norm(interpreted, dtype):
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(96, eps=1e-5).to(getattr(torch, dtype))
    norm.weight.data = random(96, dtype=dtype, generator=generator)
    hidden, delta = random(3, 2, 96, dtype=dtype, generator=generator), random(3, 2, 96, dtype=dtype,
                                                                               generator=generator)
    with torch.inference_mode():
        same, normed = interpreted.rms_norm(hidden, norm.weight, norm.variance_epsilon)
        assert same is hidden or torch.equal(same, hidden)
        steps(normed, norm(hidden), 2)
        summed, normed = interpreted.rms_norm(hidden, norm.weight, norm.variance_epsilon, delta)
        steps(summed, hidden + delta)
        steps(normed, norm(hidden + delta), 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reads_gate_and_up_side_by_side(interpreted, dtype):
    import torch

    generator = torch.Generator().manual_seed(2)
    gate_up = random(2, 3, 2 * 1500, dtype=dtype, generator=generator)  # two column blocks of 1024
    gate, up = gate_up.split(1500, dim=-1)
    steps(interpreted.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_rotates_q_and_k_and_writes_k_and_v_at_each_rows_position(interpreted, dtype):
    import torch

    from lqmf.engine.decode.batched import _rotate_heads

    generator = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, dim, positions = 3, 4, 2, 16, torch.tensor([5, 0, 40])  # 40: an idle row's scratch
    q, k, v = (t.view(batch, 1, -1, dim) for t in random(batch, 1, (heads + 2 * kv_heads) * dim, dtype=dtype,
                                                         generator=generator).split([64, 32, 32], dim=-1))
    cos, sin = random(batch, 1, dim, dtype=dtype, generator=generator), random(batch, 1, dim, dtype=dtype,
                                                                               generator=generator)
    keys, values = random(batch, kv_heads, 41, dim, dtype=dtype, generator=generator), torch.zeros(
        batch, kv_heads, 41, dim, dtype=getattr(torch, dtype))
    expected_keys, expected_values = keys.clone(), values.clone()
    rotated = interpreted.rotary_write(q[:, 0], k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], positions, keys, values)
    expected_q, expected_k = _rotate_heads(q, k, cos, sin)
    slots = torch.arange(batch)
    expected_keys[slots, :, positions] = expected_k[:, :, 0]
    expected_values[slots, :, positions] = v[:, 0]
    steps(rotated, expected_q[:, :, 0], 2)
    steps(keys, expected_keys, 2)
    assert torch.equal(values, expected_values)


@pytest.mark.parametrize(("dtype", "dot"), [("float32", False), ("bfloat16", True), ("bfloat16", False)])
@pytest.mark.parametrize(("heads", "kv_heads", "window", "programs"), [(4, 2, None, 512), (4, 4, 9, 512),
                                                                      (8, 2, None, 2), (8, 2, 20, 2)])
def test_decode_attention_is_the_masked_grouped_attention_of_the_step(interpreted, monkeypatch, dtype, dot, heads,
                                                                      kv_heads, window, programs):
    """64-key tiles over 96 positions: programs 2 gives one split of both tiles (the online softmax
    across tiles), 512 two splits of one tile (the combine across splits); 16-bit caches through
    tl.dot or multiply-adds."""
    import torch

    from lqmf.engine.decode.batched import _attention

    monkeypatch.setattr(interpreted, "TARGET_PROGRAMS", programs)
    monkeypatch.setattr(interpreted, "ATTENTION_DOT", dot)
    generator = torch.Generator().manual_seed(heads + kv_heads)
    batch, dim, length, positions = 3, 32, 96, torch.tensor([0, 37, 95])
    q = random(batch, heads, dim, dtype=dtype, generator=generator)
    keys, values = (random(4, kv_heads, 129, dim, dtype=dtype, generator=generator) for _ in range(2))
    keys_at = torch.arange(length).view(1, -1)
    allowed = keys_at <= positions.view(-1, 1)
    if window:
        allowed &= keys_at > positions.view(-1, 1) - window
    expected = _attention(q.unsqueeze(2), keys[:batch, :, :length], values[:batch, :, :length],
                          allowed.view(batch, 1, 1, length), dim ** -0.5)[:, :, 0]
    got = interpreted.decode_attention(q, keys, values, positions, length, window, dim ** -0.5)
    assert got.dtype == q.dtype and got.shape == expected.shape
    tolerance = 1e-5 if dtype == "float32" else 2e-2 * float(expected.float().abs().max())
    assert float((got.float() - expected.float()).abs().max()) <= tolerance


def test_attention_plans_cover_the_keys_without_an_empty_split():
    from lqmf.engine.decode.kernels import TARGET_PROGRAMS, attention_plan

    for batch, heads, kv_heads, dim, length in [(1, 32, 8, 128, 128), (16, 32, 8, 128, 4096), (1, 32, 32, 128, 4096),
                                                (256, 32, 8, 128, 128), (3, 4, 2, 16, 100), (1, 32, 8, 128, 32768)]:
        for sixteen_bit in (False, True):
            plan = attention_plan(batch, heads, kv_heads, dim, length, sixteen_bit)
            keys_a_split = plan.tiles * plan.block_n
            assert (plan.splits - 1) * keys_a_split < length <= plan.splits * keys_a_split  # no empty split
            assert plan.splits == 1 or batch * kv_heads * (plan.splits - 1) < TARGET_PROGRAMS * 2
            assert plan.splits <= plan.splits_p2 and plan.dot == sixteen_bit
            assert plan.block_g * plan.block_n * plan.block_d <= 16384 or plan.dot  # multiply-adds' [G, N, D]
            assert not plan.dot or min(plan.block_g, plan.block_n, plan.block_d) >= 16  # tl.dot's smallest
            assert plan.splits_p2 * plan.block_d // (32 * plan.combine_warps) <= 32  # partials a thread, combine


def test_kernels_are_off_on_the_cpu_and_by_switch(interpreted, monkeypatch):
    import torch

    assert interpreted.enabled(torch.device("cpu"))  # OFF_GPU, as the interpreted tests run
    monkeypatch.setenv("LQMF_DECODE_KERNELS", "0")
    assert not interpreted.enabled(torch.device("cpu"))
    monkeypatch.delenv("LQMF_DECODE_KERNELS")
    monkeypatch.setattr(interpreted, "OFF_GPU", False)
    assert not interpreted.enabled(torch.device("cpu"))


def _tiny(kind: str, tiny_model):
    """A small random model of kind: the tests' tiny Llama, a Mistral with a 6-token window, a Qwen3 (q/k norms)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if kind == "llama":
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(4)
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, sliding_window=6))
    return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=16))


def _runs(decoder) -> list[tuple]:
    """(prompt logits, step logits, greedy tokens, caches) with the kernels off, then on, from empty caches:
    three rows at different positions (one idle slot: a batch bucket of 4)."""
    import torch

    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50], [2, 7, 18]]
    runs = []
    with torch.inference_mode():
        for kernels in (False, True):
            decoder.kernels = kernels
            for cache in decoder.keys + decoder.values:
                cache.zero_()
            prompt_logits = torch.cat([decoder.prefill([slot], [ids], [0], [0]) for slot, ids in enumerate(prompts)])
            step = decoder.decode([11, 12, 13], [len(ids) for ids in prompts], [0, 0, 0])
            runs.append((prompt_logits, step.logits.float(), step.greedy(),
                         [cache[:3, :, :13].clone() for cache in decoder.keys + decoder.values]))
    return runs


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_a_step_with_the_kernels_gives_the_torch_steps_logits(interpreted, tiny_model, kind):
    """Prefill and step logits and greedy tokens with the kernels on equal those with them off (float32);
    the caches they leave too."""
    import torch

    from lqmf.engine.decode.batched import BatchedDecoder

    model = _tiny(kind, tiny_model).eval()
    decoder = BatchedDecoder(model, slots=4, max_len=40)
    assert decoder.kernels and decoder.fused_norms and decoder.fused_mlp
    runs = _runs(decoder)
    (torch_prompts, torch_step, torch_tokens, torch_caches), (prompts_got, step_got, tokens, caches) = runs
    torch.testing.assert_close(prompts_got, torch_prompts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_got, torch_step, rtol=1e-5, atol=1e-5)
    assert tokens == torch_tokens
    for got, expected in zip(caches, torch_caches, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_step_with_the_kernels_stays_within_rounding_of_the_torch_step(interpreted, tiny_model):
    """The tiny Llama in bfloat16 (attention through tl.dot): logits within 3% of the largest, as
    tests/gpu allows for bfloat16 rounding; the interpreter's truncating casts make it no closer."""
    import torch
    from transformers import AutoModelForCausalLM

    from lqmf.engine.decode.batched import BatchedDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    decoder = BatchedDecoder(model, slots=4, max_len=40)
    assert decoder.kernels and decoder.fused_norms and decoder.dtype == torch.bfloat16
    (torch_prompts, torch_step, _, _), (prompts_got, step_got, _, _) = _runs(decoder)
    for got, expected in ((prompts_got, torch_prompts), (step_got, torch_step)):
        worst = ((got.float() - expected.float()).abs().amax(-1) / expected.float().abs().amax(-1)).max()
        assert float(worst) <= 0.03
