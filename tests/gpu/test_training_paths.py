"""The GPU check of issue 24's training paths: on a 4-bit NF4 model under the bfloat16 autocast that
`lqmf train` runs in, each path gives the loss and LoRA gradients of the plain one.

- the loss without the logits (engine/fused/loss.py, through `loop.answer_loss_sum`) against
  cross-entropy over the model's whole logits;
- packed examples (data.pack / collate_packed, position ids restarting) against the same examples
  padded one per row;
- the tiled MLP (engine/fused/blocks.py: tile_mlps) against the plain MLP;
- liger-kernel's RMSNorm, SiLU-multiply and RoPE (`fused_kernels`, blocks.use_fused_kernels and
  fused_rope), padded and packed rows, against transformers' modules; skipped without liger-kernel;
- the LoRA dropout kept for backward (recompute_lora_dropout off) against it recomputed;
- the frozen NF4 base (engine/lora/nf4_frozen.py) against bitsandbytes' matmul_4bit, bit for bit;
- LoRA's dropout in the rank-r product's kernels (engine/lora/dropout.py) against torch's dropout and
  GEMMs given the kernels' masks, at a 7B layer's shape and in the model;
- LeanRMSNorm (engine/fused/norm.py, on in `lqmf train` unless liger's norms are) against transformers'
  norms, whole and a few tokens a chunk.

Tolerances as tests/gpu/test_fast_path.py's training check, and for the same reason (bfloat16 compute,
sums in another order): the loss within 1%, each LoRA gradient within 3% (relative L2 norm). The
CPU tests (tests/engine/fused/test_long_context.py) check the same equalities in float32 to 1e-4.
Skipped without CUDA; `make gpu-check` runs it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("the GPU check needs CUDA", allow_module_level=True)

from lqmf.engine import data as data_mod  # noqa: E402
from lqmf.engine.train import loop  # noqa: E402
from tests.helpers import EXAMPLES, lora_for_training  # noqa: E402

LOSS_TOL, GRAD_TOL = 0.01, 0.03
LENGTHS = [200, 37, 120, 64, 23, 90]  # examples: the first third prompt, the rest answer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from lqmf.engine.tiny import build_tiny_causal_lm

    corpus = [path.read_text(encoding="utf-8") for path in sorted(EXAMPLES.iterdir())]
    return build_tiny_causal_lm(tmp_path_factory.mktemp("gpu-train") / "tiny-llama-256", corpus=corpus,
                                hidden_size=256, layers=4)


def _model(base_dir):
    """The 4-bit base with our r=8 LoRA layers on q/k/v/o (tests.helpers.lora_for_training), checkpointed
    as `lqmf train` runs it."""
    from lqmf.core.models import ModelCatalogue
    from lqmf.core.workspace import Workspace
    from lqmf.engine.loading import load_model

    resolved = ModelCatalogue(Workspace(base_dir.parent / "ws")).resolve(str(base_dir))
    model = load_model(resolved, task="chat", quantize_4bit=True, training=True).model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return lora_for_training(model, ["q_proj", "k_proj", "v_proj", "o_proj"], lean=True)


def _rows() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(10, 400, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [data_mod.IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
    return rows


def _on_gpu(batch: dict) -> dict:
    return {key: value.cuda() for key, value in batch.items()}


def _plain_loss(model, batch):
    """Cross-entropy over the model's whole logits (what the fused loss replaces)."""
    import torch.nn.functional as F

    with loop.autocast("cuda"):
        logits = model(**loop.model_inputs(batch)).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=data_mod.IGNORE_INDEX, reduction="sum")


def _loss_and_grads(model, batch, loss_fn=loop.answer_loss_sum):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_close(what: str, expected, got) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = expected, got
    assert abs(loss_b - loss_a) <= LOSS_TOL * abs(loss_a), f"{what}: loss {loss_b} vs {loss_a}"
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 4 * 4 * 2
    worst = max(((grads_b[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in grads_a.items())
    print(f"{what}: loss {loss_b:.5f} vs {loss_a:.5f}, worst relative gradient difference {worst:.5f}")
    assert worst <= GRAD_TOL, f"{what}: a LoRA gradient differs by {worst:.4f} (relative L2)"


def test_the_loss_without_logits_matches_the_logits_path(base_dir):
    model = _model(base_dir)
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    _assert_close("fused loss", _loss_and_grads(model, batch, _plain_loss), _loss_and_grads(model, batch))


def test_packed_examples_match_the_unpacked_ones(base_dir):
    model = _model(base_dir)
    rows = _rows()
    bins = data_mod.pack(rows, capacity=256)
    assert len(bins) < len(rows)
    unpacked = _loss_and_grads(model, _on_gpu(data_mod.collate(rows, pad_id=0, classification=False)))
    _assert_close("packed", unpacked, _loss_and_grads(model, _on_gpu(data_mod.collate_packed(bins, pad_id=0))))


def test_tiled_mlp_matches_the_plain_mlp(base_dir):
    from lqmf.engine.fused.blocks import tile_mlps

    model = _model(base_dir)
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    plain = _loss_and_grads(model, batch)
    assert tile_mlps(model, tile=64) == 4
    _assert_close("tiled MLP", plain, _loss_and_grads(model, batch))


def test_liger_kernels_match_the_plain_modules(base_dir):
    pytest.importorskip("liger_kernel")
    from lqmf.engine.fused.blocks import fused_rope, use_fused_kernels

    model = _model(base_dir)
    rows = _rows()
    batch = _on_gpu(data_mod.collate(rows, pad_id=0, classification=False))
    packed = _on_gpu(data_mod.collate_packed(data_mod.pack(rows, capacity=256), pad_id=0))
    plain, plain_packed = _loss_and_grads(model, batch), _loss_and_grads(model, packed)
    assert use_fused_kernels(model) == {"rms_norm": 4 * 2 + 1, "swiglu": 4, "rope": 4, "nf4_dequantize": 4 * 7,
                                        "lora_dropout": 0}  # lora_for_training: no LoRA dropout
    _assert_close("liger norms and SwiGLU", plain, _loss_and_grads(model, batch))
    with fused_rope(model):  # as `lqmf train` runs its loop
        _assert_close("liger norms, SwiGLU and RoPE", plain, _loss_and_grads(model, batch))
        _assert_close("liger kernels, packed rows", plain_packed, _loss_and_grads(model, packed))


def test_frozen_nf4_base_is_bitsandbytes_bit_for_bit(base_dir):
    """engine/lora/nf4_frozen.py: its dequantize gives bitsandbytes' dequantize_4bit bit for bit (a 7B MLP weight,
    nested absmax), and the LoRA layers' bases through it give the loss and LoRA gradients of bitsandbytes'
    path exactly where that path repeats itself exactly (else within the tolerances)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from lqmf.engine import compat
    from lqmf.engine.lora import nf4_frozen

    layer = bnb.nn.Linear4bit(4096, 14336, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(14336, 4096) * 0.02, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
    layer = layer.cuda()
    expected = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(nf4_frozen.dequantize(compat.nf4_stored_parts(layer), torch.bfloat16), expected)
    model = _model(base_dir)
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    plain, again = _loss_and_grads(model, batch), _loss_and_grads(model, batch)
    assert nf4_frozen.switch_on(model) == 4 * 7
    got = _loss_and_grads(model, batch)
    _assert_close("frozen NF4 base", plain, got)
    if again[0] == plain[0] and all(torch.equal(again[1][name], grad) for name, grad in plain[1].items()):
        assert got[0] == plain[0] and all(torch.equal(got[1][name], grad) for name, grad in plain[1].items())


def test_fused_lora_dropout_matches_torchs_given_its_masks(base_dir):
    """engine/lora/dropout.py on the GPU: at a 7B attention input (8,192 bf16 rows of 4,096, rank 16, p 0.05,
    under autocast) the product and both gradients within bf16 roundings of torch's dropout and GEMMs given
    the kernels' mask, which keeps 95% of the values; in the 4-bit model (dropout 0.1), the loss and LoRA
    gradients of PEFT's layers whose dropout draws the same masks."""
    import sys
    from pathlib import Path

    from lqmf.engine.lora.lean import fuse_lora_dropout, lora_layers, use_lean_lora
    from tests.helpers import kernel_masked_dropouts

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from lora_dropout_bench import checked

    weight = torch.randn(16, 4096, device="cuda") * 0.02
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(8192, 16, device="cuda", dtype=torch.bfloat16)
    worst = checked(weight, x, grad, 0.05)
    print("fused LoRA dropout at 8192 x 4096, rank 16:", worst)
    assert abs(worst["kept"] - 0.95) < 1e-3
    assert worst["out_rel"] < 0.01 and worst["dx_rel"] < 0.01 and worst["da_rel"] < 0.01

    reference, fused = _model(base_dir), _model(base_dir)
    for model in (reference, fused):
        for layer in lora_layers(model):
            layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    kernel_masked_dropouts(reference)
    use_lean_lora(fused)
    assert fuse_lora_dropout(fused) == 4 * 4
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    torch.manual_seed(0)
    expected = _loss_and_grads(reference, batch)
    torch.manual_seed(0)
    _assert_close("fused LoRA dropout", expected, _loss_and_grads(fused, batch))


def test_kept_mlps_match_the_checkpointed_ones(base_dir):
    """Kept MLPs (engine/fused/blocks.py: KeptMLP) on the 4-bit base under autocast, with liger-kernel's
    SwiGLU where it is installed: the checkpointed path's loss and gradients, gate_proj run once a step."""
    from lqmf.engine.compat import checkpointed_layers
    from lqmf.engine.fused.blocks import keep_mlps, unavailable, use_fused_kernels

    model = _model(base_dir)
    if unavailable("cuda") is None:
        use_fused_kernels(model)
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    layers = checkpointed_layers(model)
    runs = []
    for layer in layers:
        layer.mlp.gate_proj.register_forward_hook(lambda *_: runs.append(1))
    plain = _loss_and_grads(model, batch)
    assert len(runs) == 2 * len(layers)
    assert keep_mlps(layers, len(layers)) == list(range(len(layers)))
    runs.clear()
    _assert_close("kept MLPs", plain, _loss_and_grads(model, batch))
    assert len(runs) == len(layers)


def test_kept_lora_dropout_matches_the_recomputed_one(base_dir):
    """LoRA dropout kept for backward (engine/lora/lean.py: recompute_lora_dropout off) on the 4-bit base
    under autocast: the same masks (drawn in the same order), so the recomputing path's loss and gradients."""
    from lqmf.engine.lora.lean import lora_layers, recompute_lora_dropout

    model = _model(base_dir)
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    torch.manual_seed(0)
    recomputed = _loss_and_grads(model, batch)
    recompute_lora_dropout(model, False)
    torch.manual_seed(0)
    _assert_close("kept LoRA dropout", recomputed, _loss_and_grads(model, batch))


@pytest.mark.parametrize("chunk_tokens", [2048, 100])
def test_lean_norms_match_the_stock_norms(base_dir, monkeypatch, chunk_tokens):
    from lqmf.engine.fused import norm

    monkeypatch.setattr(norm, "CHUNK_TOKENS", chunk_tokens)
    model = _model(base_dir)
    batch = _on_gpu(data_mod.collate(_rows(), pad_id=0, classification=False))
    plain = _loss_and_grads(model, batch)
    assert norm.lean_rms_norms(model) == 4 * 2 + 1
    _assert_close(f"lean norms, {chunk_tokens} tokens a chunk", plain, _loss_and_grads(model, batch))


def test_packed_examples_under_chunked_attention_match_the_unpacked_ones(base_dir, monkeypatch):
    """engine/fused/attention.py on packed rows, 100 queries a chunk (several chunks, checkpointed)."""
    from lqmf.engine.fused import attention

    monkeypatch.setattr(attention, "QUERY_CHUNK", 100)
    model = _model(base_dir)
    rows = _rows()
    unpacked = _loss_and_grads(model, _on_gpu(data_mod.collate(rows, pad_id=0, classification=False)))
    assert attention.use_chunked_attention(model)
    packed = _on_gpu(data_mod.collate_packed(data_mod.pack(rows, capacity=256), pad_id=0))
    _assert_close("packed, chunked attention", unpacked, _loss_and_grads(model, packed))


@pytest.mark.parametrize("window", [None, 1536])
def test_chunked_attention_matches_sdpa_with_the_whole_mask(window):
    """At Mistral-7B's attention shape (32 query heads, 8 key heads, 128 wide), 4,000 bfloat16 tokens of
    two packed examples and, with a window, Mistral-v0.1's banded mask: chunked_attention's output and
    q/k/v gradients against SDPA given the whole s x s mask, within 1% (relative L2)."""
    from lqmf.engine.fused import attention

    s, split = 4000, 1700
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = (torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(2))
    positions = torch.cat([torch.arange(split), torch.arange(s - split)]).cuda()[None]
    index = torch.arange(s, device="cuda")
    segment = (index >= split).long()
    allowed = (index[None] <= index[:, None]) & (segment[None] == segment[:, None])
    if window:
        allowed &= index[:, None] - index[None] < window
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 4

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        return [out.float()] + [t.grad.float() for t in leaves]

    expected = run(lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
        q_, k_.repeat_interleave(4, 1), v_.repeat_interleave(4, 1), attn_mask=allowed).transpose(1, 2))
    got = run(lambda q_, k_, v_: attention.chunked_attention(module, q_, k_, v_, None, sliding_window=window,
                                                             position_ids=positions)[0])
    for name, a, b in zip(("output", "dq", "dk", "dv"), expected, got, strict=True):
        difference = ((b - a).norm() / a.norm()).item()
        print(f"chunked attention, window {window}: {name} relative difference {difference:.5f}")
        assert difference <= 0.01, f"{name}: {difference}"
