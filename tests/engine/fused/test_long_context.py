"""Long sequences on small GPUs, checked on the CPU: the loss without the logits (engine/fused/loss.py),
packing without cross-contamination (data.pack / collate_packed), the tiled MLP (engine/fused/blocks.py),
the LoRA dropout recomputed in backward, and what `lqmf plan` makes of them."""

from __future__ import annotations

import json

import pytest

from lqmf.engine import data as data_mod
from lqmf.engine.fused.loss import linear_cross_entropy
from lqmf.engine.train import loop as engine
from tests.helpers import EXAMPLES, lora_model

IGNORE = data_mod.IGNORE_INDEX


def _no_dropout(model):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _loss_and_grads(model, batch, loss_fn=engine.answer_loss_sum):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(first, second, rtol=1e-4, atol=1e-6):
    import torch

    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 24
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=rtol, atol=atol, msg=name)


def _rows(lengths: list[int], seed: int = 0) -> list[dict]:
    """Examples of these lengths whose first third is prompt (no label), the rest answer."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3:]})
    return rows


def test_linear_cross_entropy_equals_the_logits_path():
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (37,), generator=generator)
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected * 0.5, hidden)
    got = linear_cross_entropy(hidden, weight, targets, chunk=8)  # five chunks, the last one short
    (got_grad,) = torch.autograd.grad(got * 0.5, hidden)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk=8), expected)


def test_answer_loss_takes_the_fused_loss_and_equals_the_plain_one(monkeypatch):
    """engine.answer_loss_sum (no logits kept) against cross-entropy over the model's own logits."""
    import torch.nn.functional as F

    model = _no_dropout(lora_model(lean=True))
    batch = data_mod.collate(_rows([30, 21, 12]), pad_id=0, classification=False)

    def plain(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum")

    calls = []
    real = engine.linear_cross_entropy
    monkeypatch.setattr(engine, "linear_cross_entropy", lambda *args: calls.append(1) or real(*args))
    _assert_same(_loss_and_grads(model, batch, plain), _loss_and_grads(model, batch))
    assert calls, "the fused loss was not used"


def test_packed_examples_give_the_unpacked_loss_and_gradients():
    import torch

    model = _no_dropout(lora_model(lean=True))
    rows = _rows([30, 9, 21, 12, 17, 5, 26])
    bins = data_mod.pack(rows, capacity=40)
    assert len(bins) < len(rows) and all(sum(len(r["input_ids"]) for r in b) <= 40 for b in bins)
    assert sorted(len(r["input_ids"]) for b in bins for r in b) == sorted(len(r["input_ids"]) for r in rows)
    packed = data_mod.collate_packed(bins, pad_id=0)
    assert packed["input_ids"].shape[0] == len(bins) and "attention_mask" not in packed
    unpacked = _loss_and_grads(model, data_mod.collate(rows, pad_id=0, classification=False))
    _assert_same(unpacked, _loss_and_grads(model, packed))
    # without positions restarting, examples would see each other: the loss moves by over 5x the tolerance above
    leaking = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    with torch.no_grad():
        assert abs(float(engine.answer_loss_sum(model, leaking)) - float(unpacked[0])) > 5e-4 * float(unpacked[0])


def test_tiled_mlp_keeps_names_loss_and_gradients():
    import torch

    from lqmf.engine.fused.blocks import tile_mlps

    model = lora_model(lean=True)  # dropout on: the checkpointed tiles replay the same masks
    batch = data_mod.collate(_rows([30, 23]), pad_id=0, classification=False)
    keys = list(model.state_dict())
    torch.manual_seed(3)
    plain = _loss_and_grads(model, batch)
    assert tile_mlps(model, tile=7) == 3 and tile_mlps(model, tile=7) == 0
    assert list(model.state_dict()) == keys  # PEFT saves the same adapter keys
    torch.manual_seed(3)
    _assert_same(plain, _loss_and_grads(model, batch))


@pytest.mark.parametrize("chunk", [2048, 4])
def test_lean_rms_norm_computes_the_same_and_keeps_no_float32_copy(chunk, monkeypatch):
    """In bf16 (as on a GPU): the same forward bits as transformers' RMSNorm, gradients for x and the
    weight within bf16 rounding, and for backward only x, the weight and one float32 value a token;
    the same in chunks of 4 of the 18 tokens as whole."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lqmf.engine.fused import norm
    from lqmf.engine.fused.norm import lean_rms_norms

    monkeypatch.setattr(norm, "CHUNK_TOKENS", chunk)
    torch.manual_seed(0)
    holder = torch.nn.Sequential(LlamaRMSNorm(64, eps=1e-5)).to(torch.bfloat16)
    holder[0].weight.data.normal_(1.0, 0.2)
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16) * 3
    grad = torch.randn(2, 9, 64, dtype=torch.bfloat16)

    def run():
        saved = []
        leaf = x.clone().requires_grad_()
        holder.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = holder(leaf)
        out.backward(grad)
        new_bytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in
                        (leaf.data_ptr(), holder[0].weight.data_ptr()))
        return out.detach(), leaf.grad, holder[0].weight.grad, new_bytes

    out, grad_x, grad_weight, stock_bytes = run()
    assert lean_rms_norms(holder) == 1 and type(holder[0]).__name__ == "LeanRMSNorm"
    assert list(holder.state_dict()) == ["0.weight"]
    lean_out, lean_grad_x, lean_grad_weight, lean_bytes = run()
    assert torch.equal(lean_out, out)
    torch.testing.assert_close(lean_grad_x, grad_x, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(lean_grad_weight, grad_weight, rtol=2**-7, atol=1e-2)
    assert lean_bytes == 2 * 9 * 4 and stock_bytes >= 2 * 9 * 64 * 4  # rstd alone, against a float32 x


def test_lean_rms_norms_train_the_plain_loss_and_gradients():
    import torch

    from lqmf.engine.fused.norm import lean_rms_norms

    model = lora_model(lean=True)
    batch = data_mod.collate(_rows([30, 23]), pad_id=0, classification=False)
    torch.manual_seed(3)
    plain = _loss_and_grads(model, batch)
    assert lean_rms_norms(model) == 7  # two a block, three blocks, and the final norm
    torch.manual_seed(3)
    _assert_same(plain, _loss_and_grads(model, batch))


@pytest.mark.parametrize("packed", [False, True])
def test_liger_rope_trains_the_plain_loss_and_gradients(packed):
    """blocks.fused_rope (liger-kernel's RoPE, run by Triton's interpreter here) against transformers'
    rotation, padded rows and packed ones (positions restarting, so cos and sin differ by row)."""
    pytest.importorskip("liger_kernel")
    import torch
    from transformers.models.llama import modeling_llama

    from lqmf.engine.fused.blocks import fused_rope

    model = lora_model(lean=True)
    rows = _rows([30, 9, 21, 12])
    batch = (data_mod.collate_packed(data_mod.pack(rows, capacity=40), pad_id=0) if packed
             else data_mod.collate(rows, pad_id=0, classification=False))
    torch.manual_seed(3)
    plain = _loss_and_grads(model, batch)
    with fused_rope(model):
        assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
        torch.manual_seed(3)
        fused = _loss_and_grads(model, batch)
    _assert_same(plain, fused)


def plan_json(cli, *args: str) -> tuple[int, dict]:
    result = cli("plan", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def test_plan_reports_the_longest_sequence_with_and_without_packing(cli, workspace):
    options = ["--max-memory", "8GB", "--batch-size", "1", "--offload", "--targets", "q_proj,k_proj,v_proj,o_proj"]
    code, report = plan_json(cli, "mistral-7b-instruct", *options)  # v0.3: no sliding window
    assert code == 0
    # packed rows take chunked attention (a chunk's mask and the row's k/v gradients in backward); tiles of
    # the MLP save more
    assert 0 < report["longest_seq_len_packed"] < report["longest_seq_len"] < report["longest_seq_len_tiled_mlp"]
    assert report["longest_seq_len_tiled_mlp_packed"] > report["longest_seq_len_packed"]
    assert not report["estimate"]["details"]["chunked_attention"]
    # v0.1's 4,096-token sliding window takes it past 4,096 tokens, packed or not: no s x s mask, but the
    # window's keys in each chunk's mask
    code, windowed = plan_json(cli, "mistral-7b", *options)
    assert code == 0 and windowed["longest_seq_len"] == windowed["longest_seq_len_packed"] > 4096
    assert report["longest_seq_len_packed"] < windowed["longest_seq_len"] < report["longest_seq_len"]
    code, window_16k = plan_json(cli, "mistral-7b", *options, "--seq-len", "16384", "--tiled-mlp")
    assert code == 0 and window_16k["fits"] and window_16k["estimate"]["details"]["chunked_attention"]
    code, long = plan_json(cli, "mistral-7b-instruct", *options, "--seq-len", "16384", "--tiled-mlp")
    assert code == 0 and long["fits"] and long["settings"]["tiled_mlp"]
    code, untiled = plan_json(cli, "mistral-7b-instruct", *options, "--seq-len", "16384", "--no-tiled-mlp")
    assert untiled["estimate"]["activations_gb"] > long["estimate"]["activations_gb"] + 0.5
    assert {"changes": {"tiled_mlp": "on"}, "total_gb": pytest.approx(long["estimate"]["total_gb"], abs=0.01)} \
        in untiled["would_fit_with"]


def test_a_13b_model_needs_two_8gb_gpus_with_fsdp(cli, workspace):
    options = ["--max-memory", "8GB", "--batch-size", "1", "--seq-len", "512"]
    code, one = plan_json(cli, "llama-13b", *options)
    assert code == 5 and not one["fits"] and one["largest_micro_batch"] == 0
    assert one["parameters"] > 13e9
    code, two = plan_json(cli, "llama-13b", *options, "--gpus", "2")
    strategies = two["strategies"]
    assert code == 0 and strategies["chosen"] == "fsdp"
    assert not strategies["ddp"]["fits"] and strategies["fsdp"]["fits"]
    assert strategies["fsdp"]["per_gpu_gb"] <= 8


@pytest.mark.parametrize(("mode", "device", "processes", "tiled", "liger", "expected"), [
    ("auto", "cuda", 1, False, True, (True, None)),  # the measured case
    ("auto", "cuda", 2, False, True, (False, None)),  # DDP / FSDP: not checked with them
    ("auto", "cuda", 1, True, True, (False, None)),  # with the tiled MLP: not checked
    ("auto", "cpu", 1, False, True, (False, None)),
    ("auto", "cuda", 1, False, False, (False, "fused_kernels=auto: PyTorch's kernels kept: no liger-kernel")),
    ("on", "cuda", 2, True, True, (True, None)),
    ("on", "cpu", 1, False, True, (False, "fused_kernels=on: PyTorch's kernels kept: not CUDA")),
    ("off", "cuda", 1, False, True, (False, None)),
])
def test_fused_kernels_auto_takes_them_only_where_they_were_measured(mode, device, processes, tiled, liger, expected,
                                                                     monkeypatch):
    from lqmf.engine.fused import blocks

    monkeypatch.setattr(blocks, "unavailable", {"cuda": None if liger else "no liger-kernel", "cpu": "not CUDA"}.get)
    assert blocks.fused_kernels_wanted(mode, device, processes, tiled) == expected


def test_packing_trains_the_unpacked_curve(cli, workspace, tiny_model):
    """`lqmf train` with packing on and off (auto packs these short chats): the same losses. The
    switches that change nothing here (sequences under a tile; fused kernels off the GPU) train the
    stock curve too, and the run says which ran (packed rows take chunked attention); so does a kept
    layer (engine/train/offload.py: not recomputed in backward) and a kept MLP (engine/fused/blocks.py),
    which the tiled MLP rules out."""
    run = ["--max-seq-length", "256", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "3", "--lr", "5e-3",
           "--set", "lora_dropout=0", "--set", "validation_split=0", "--set", "eval_at_start=false"]
    variants = {"auto": ["--set", "packing=auto", "--set", "kept_mlps=1"], "off": ["--set", "packing=off"],
                "switches": ["--set", "packing=off", "--set", "tiled_mlp=on", "--set", "fused_kernels=on",
                             "--set", "kept_layers=1", "--set", "kept_mlps=1"]}
    curves, runtimes, notes = {}, {}, {}
    for name, options in variants.items():
        result = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", f"pack-{name}",
                     *run, *options)
        assert result.exit_code == 0, result.output
        notes[name] = result.stderr
        folder = workspace / "adapters" / f"pack-{name}"
        runtimes[name] = json.loads((folder / "lqmf.json").read_text())["runtime"]
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        curves[name] = [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]
    assert [runtimes[name]["pack_tokens"] for name in variants] == [256, 0, 0]
    assert runtimes["switches"]["tiled_mlp"] and runtimes["switches"]["fused_kernels"] is None
    assert runtimes["switches"]["kept_layers"] == [0] and runtimes["off"]["kept_layers"] == []
    assert "kept layers: 1 of 2 decoder layers keep their activations on the device" in result.stderr
    assert runtimes["auto"]["kept_mlps"] == [0] and runtimes["switches"]["kept_mlps"] == []
    assert "kept MLPs: 1 of 2 decoder layers keep their MLP's gate and up on the device" in notes["auto"]
    assert "fused_kernels=on: PyTorch's kernels kept" in result.stderr
    assert runtimes["off"]["fused_kernels"] is None and "fused_kernels" not in notes["off"]  # auto, on the CPU
    assert "chunked attention on" in notes["auto"] and "chunked attention" not in notes["off"]
    assert len(curves["off"]) == 3 and curves["auto"] == pytest.approx(curves["off"], rel=1e-4)
    assert curves["switches"] == pytest.approx(curves["off"], rel=1e-5)


def test_gpu_memory_cap_is_a_checked_budget(cli, workspace, tiny_model):
    from lqmf.core.memory_plan import GiB
    from lqmf.engine.train.memory import cap_allocator, memory_budget

    assert memory_budget(None, "cuda", "7.3GB") == (int(7.3 * GiB), "gpu_memory_cap", False)
    assert memory_budget("6GB", "cuda", "7.3GB")[1] == "max_memory"
    assert cap_allocator("7.3GB", "cpu") is None and cap_allocator(None, "cuda") is None
    bad = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--set", "gpu_memory_cap=lots", "--dry-run")
    assert bad.exit_code == 2 and "'gpu_memory_cap'" in bad.output


# Peaks measured on an H100 (session 8, `gpu_train_bench.py --seq --steps 3 --cap-gib 7.3 --extra
# "--max-memory 7.8GB" --variant new=src --long-probe 16384`, with and without --full-attention):
# 3 steps of one 16,384-token row, torch.cuda.max_memory_allocated in GB.
MEASURED_16K_PEAK_GB = {4096: 5.676, None: 5.798}  # by the model's sliding window


@pytest.mark.parametrize("window", [4096, None])
def test_the_plan_for_one_16k_row_is_within_5_percent_of_the_h100_peak(cli, workspace, tmp_path, window):
    """The benchmark's Mistral-7B shape (vocabulary 32,000) at micro-batch 1 with offload and the tiled MLP:
    v0.1's window takes chunked attention, the whole-sequence model flash attention, whose backward holds
    a float32 dq and dk/dv at every query head."""
    config = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 4096, "sliding_window": window, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, plan = plan_json(cli, str(tmp_path), "--seq-len", "16384", "--batch-size", "1", "--rank", "16",
                           "--targets", "q_proj,k_proj,v_proj,o_proj", "--max-memory", "80GB", "--offload",
                           "--tiled-mlp", "--recompute-lora-dropout")  # as these runs did (session 8)
    assert code == 0 and plan["estimate"]["details"]["chunked_attention"] == (window is not None)
    assert plan["estimate"]["peak_allocated_gb"] == pytest.approx(MEASURED_16K_PEAK_GB[window], rel=0.05)
