"""The batched decoder's fused kernels (engine/decode/kernels.py) compiled on the GPU: each at Mistral-7B
shapes in bfloat16 against the torch code it replaces, and a decoder's CUDA-graph step with them
against its eager torch step. Skipped without CUDA (the CPU runs them interpreted:
tests/engine/decode/test_kernels.py).

Tolerances: bfloat16 rounding. The kernels round where torch rounds, so elementwise results sit
within one bfloat16 step (2**-8 relative, rounding to nearest) per rounding of torch's; attention
keeps its scores in float32 where torch rounds them to bfloat16 (2% of the largest output); the
step's logits within LOGIT_TOL of the largest, as tests/gpu/test_fast_path.py allows.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("the GPU kernels need CUDA", allow_module_level=True)
pytest.importorskip("triton")

from lqmf.engine.decode import kernels  # noqa: E402
from lqmf.engine.decode.batched import BatchedDecoder, _attention, _rotate_heads  # noqa: E402

LOGIT_TOL = 0.03
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, DIM = 4096, 14336, 32, 8, 128


def close(got, expected, relative: float) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    worst = float((got.float() - expected.float()).abs().max())
    assert worst <= relative * float(expected.float().abs().max()), f"differs by {worst}"


@pytest.mark.parametrize("rows", [1, 16])
def test_norm_rotary_and_silu_kernels_at_7b_shapes(rows):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    cuda = torch.device("cuda")
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(cuda, torch.bfloat16)
    norm.weight.data.normal_()
    hidden, delta = (torch.randn(rows, 1, HIDDEN, device=cuda, dtype=torch.bfloat16) for _ in range(2))
    with torch.inference_mode():
        summed, normed = kernels.rms_norm(hidden, norm.weight, 1e-5, delta)
        close(summed, hidden + delta, 2 ** -8)
        close(normed, norm(hidden + delta), 2 ** -7)
        gate_up = torch.randn(rows, 1, 2 * INTERMEDIATE, device=cuda, dtype=torch.bfloat16)
        gate, up = gate_up.split(INTERMEDIATE, dim=-1)
        close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, 2 ** -7)  # exp may differ by a bit
        qkv = torch.randn(rows, 1, (HEADS + 2 * KV_HEADS) * DIM, device=cuda, dtype=torch.bfloat16)
        q, k, v = (t.view(rows, 1, -1, DIM) for t in qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], -1))
        cos, sin = torch.rand(rows, 1, DIM, device=cuda).bfloat16(), torch.rand(rows, 1, DIM, device=cuda).bfloat16()
        positions = torch.arange(rows, device=cuda) * 7
        keys, values = (torch.zeros(rows, KV_HEADS, 257, DIM, device=cuda, dtype=torch.bfloat16) for _ in range(2))
        rotated = kernels.rotary_write(q[:, 0], k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], positions, keys, values)
        expected_q, expected_k = _rotate_heads(q, k, cos, sin)
        slots = torch.arange(rows, device=cuda)
        # torch rounds x cos, rotate_half(x) sin and their sum to bfloat16: three roundings, one here
        close(rotated, expected_q[:, :, 0], 3 * 2 ** -8)
        close(keys[slots, :, positions], expected_k[:, :, 0], 3 * 2 ** -8)
        assert torch.equal(values[slots, :, positions], v[:, 0])


@pytest.mark.parametrize(("rows", "length", "window"), [(1, 128, None), (5, 1024, None), (16, 4096, 1000)])
def test_decode_attention_at_7b_shapes(rows, length, window):
    cuda = torch.device("cuda")
    q = torch.randn(rows, HEADS, DIM, device=cuda, dtype=torch.bfloat16)
    keys, values = (torch.randn(rows, KV_HEADS, length + 1, DIM, device=cuda, dtype=torch.bfloat16)
                    for _ in range(2))
    positions = torch.randint(0, length, (rows,), device=cuda)
    positions[-1] = length - 1
    keys_at = torch.arange(length, device=cuda).view(1, -1)
    allowed = keys_at <= positions.view(-1, 1)
    if window:
        allowed &= keys_at > positions.view(-1, 1) - window
    expected = _attention(q.unsqueeze(2), keys[:, :, :length], values[:, :, :length],
                          allowed.view(rows, 1, 1, length), DIM ** -0.5)[:, :, 0]
    close(kernels.decode_attention(q, keys, values, positions, length, window, DIM ** -0.5), expected, 0.02)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_a_captured_step_with_the_kernels_gives_the_eager_torch_steps_logits(kind):
    """Graph capture works with the kernels (no host sync, fixed sizes), and a replay computes what the
    eager torch step does, rows at different positions (a Mistral's 48-token window passed)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=512)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama"
             else MistralForCausalLM(MistralConfig(**shape, sliding_window=48)))
    model = model.to("cuda", torch.bfloat16).eval()
    decoder = BatchedDecoder(model, slots=8, max_len=256)
    assert decoder.kernels and decoder.use_graphs
    prompts = [list(range(5, 5 + n)) for n in (3, 70, 130, 9, 200)]
    with torch.inference_mode():
        for slot, ids in enumerate(prompts):
            decoder.prefill([slot], [ids], [0], [0])
        positions = [len(ids) for ids in prompts]
        got = decoder.decode([1, 2, 3, 4, 5], positions, [0] * 5).logits.float()
        assert decoder.graphs, "the step with the kernels was not captured"
        decoder.kernels, decoder.use_graphs = False, False
        expected = decoder.decode([1, 2, 3, 4, 5], positions, [0] * 5).logits.float()
    worst = float(((got - expected).abs().amax(-1) / expected.abs().amax(-1)).max())
    assert worst <= LOGIT_TOL, f"logits differ by {worst:.4f} of the largest"


def test_a_captured_sampling_step_draws_what_the_eager_step_draws():
    """Sampling on the device (sample_rows) inside a CUDA graph: the captured step with sampling rows
    draws, from the same logits, seeds and positions, the tokens the eager step draws; greedy rows keep
    their argmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    decoder = BatchedDecoder(model.to("cuda", torch.float32).eval(), slots=4, max_len=128)
    draws = [None, (0.8, 0.9, 5), (1.5, 1.0, -7), None]
    with torch.inference_mode():
        decoder.prefill(list(range(4)), [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], [0] * 4, [0] * 4)
        positions = [3, 2, 4, 1]
        captured = decoder.decode([1, 2, 3, 4], positions, [0] * 4, sampling=draws)
        tokens, logits = captured.greedy(), captured.logits.float().clone()
        assert any(key[2] for key in decoder.graphs), "the sampling step was not captured"
        decoder.use_graphs = False
        assert decoder.decode([1, 2, 3, 4], positions, [0] * 4, sampling=draws).greedy() == tokens
    assert tokens[0] == int(logits[0].argmax()) and tokens[3] == int(logits[3].argmax())
