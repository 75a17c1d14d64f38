"""Activation offload (engine/train/offload.py) and its place in memory planning.

The CUDA copies themselves are measured on a GPU (docs/performance.md); here the saved-tensor
bookkeeping runs on the CPU, where the hook keeps host clones, against a checkpointed LoRA model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lqmf.core.memory_plan import (
    GiB,
    ModelShape,
    TrainSettings,
    estimate,
    fit_budget,
    kept_block_bytes,
    kept_layers_for,
    kept_mlps_for,
    largest_micro_batch,
    what_would_fit,
)
from lqmf.engine.train.offload import ActivationOffload
from tests.helpers import MISTRAL_7B, gradients, lora_model


def test_offloaded_backward_gives_the_same_gradients():
    import torch

    model = lora_model()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = gradients(model, ids)
    offload = ActivationOffload("cpu", min_bytes=1024)  # 2 x 32 x 64 fp32 block inputs are 16 KB
    offloaded = gradients(model, ids, offload)
    assert offload.offloaded_bytes >= 3 * 2 * 32 * 64 * 4  # at least every block's checkpointed input
    assert len(offload.host) >= 3 and not offload.arriving  # every one fetched back, none left in flight
    assert set(plain) == set(offloaded) and len(plain) == 3 * 4 * 2
    for name, grad in plain.items():
        assert torch.equal(grad, offloaded[name]), name
    offload.clear()
    assert not offload.host
    again = gradients(model, ids, offload)  # reusable across micro-batches
    assert all(torch.equal(again[name], plain[name]) for name in plain)


@pytest.mark.parametrize("lean", [False, True])
def test_kept_layers_offloaded_give_the_same_gradients(lean):
    """Kept layers (engine/train/offload.py: not recomputed) hand their saved tensors to the offload, which
    brings them back ahead of use (ahead_bytes): the same gradients as every layer checkpointed, more
    bytes offloaded, none left in flight, nothing fetched twice. With PEFT's LoRA forward and LQMF's."""
    import torch

    from lqmf.engine.train.offload import keep_layers

    model = lora_model(lean=lean)
    if lean:
        from lqmf.engine.lora.lean import use_lean_lora

        use_lean_lora(model)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    checkpointed = ActivationOffload("cpu", min_bytes=1024)
    plain = gradients(model, ids, checkpointed)
    assert keep_layers(model, 2) == [0, 1]
    offload = ActivationOffload("cpu", min_bytes=1024, ahead_bytes=64 << 10)
    fetched = []
    fetch = offload._fetch

    def counted(key):
        fetched.append(key)
        fetch(key)

    offload._fetch = counted
    kept = gradients(model, ids, offload)
    assert offload.offloaded_bytes > checkpointed.offloaded_bytes + 2 * 2 * 32 * 128 * 4  # their gate and up at least
    assert not offload.arriving and sorted(fetched) == sorted(set(fetched)) == sorted(offload.host)
    assert set(plain) == set(kept)
    for name, grad in plain.items():
        assert torch.allclose(grad, kept[name], atol=1e-6), name


MLP_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(("lean", "targets"), [(False, None), (True, None), (True, MLP_TARGETS)])
def test_kept_mlps_give_the_same_gradients_without_recomputing_gate_and_up(lean, targets):
    """Kept MLPs (engine/fused/blocks.py: KeptMLP) keep gate and up out of the checkpoint's hands: the
    same gradients and loss, with activation offload too, and each kept MLP's gate_proj runs once a
    step instead of twice (the block's recomputation stops before it). With LoRA on the MLP as well."""
    import torch

    from lqmf.engine.compat import checkpointed_layers
    from lqmf.engine.fused.blocks import keep_mlps

    model = lora_model(lean=lean, **({"targets": targets} if targets else {}))
    if lean:
        from lqmf.engine.lora.lean import use_lean_lora

        use_lean_lora(model)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    layers = checkpointed_layers(model)
    runs = []
    for index, layer in enumerate(layers):
        layer.mlp.gate_proj.register_forward_hook(lambda *_, index=index: runs.append(index))
    plain = gradients(model, ids)
    assert sorted(runs) == [0, 0, 1, 1, 2, 2]  # forward, then the recomputation in backward
    names = [name for name, _ in model.named_parameters()]
    assert keep_mlps(layers, 2, skip=[1]) == [0, 2]
    assert [name for name, _ in model.named_parameters()] == names  # adapter keys unchanged
    runs.clear()
    kept = gradients(model, ids)
    assert sorted(runs) == [0, 1, 1, 2]
    runs.clear()
    offloaded = gradients(model, ids, ActivationOffload("cpu", min_bytes=1024))
    assert sorted(runs) == [0, 1, 1, 2]
    assert set(plain) == set(kept) == set(offloaded)
    for name, grad in plain.items():
        assert torch.equal(grad, kept[name]) and torch.equal(grad, offloaded[name]), name
    assert keep_mlps(layers, 3) == [1]  # the others are kept already


def test_backward_fetches_ahead_by_bytes_past_what_it_used():
    """The look-ahead: the next key at least, more while under ahead_bytes; keys used already are not
    fetched again, and a key above left arriving does not hold the look-ahead back."""
    import torch

    offload = ActivationOffload("cpu", ahead_bytes=3 * 4096)
    offload.host = {key: torch.zeros(1024) for key in range(8)}  # 4 KB each
    offload.used = {5}
    offload._fetch(7)  # left arriving, never unpacked
    offload._fetch_ahead(6)
    assert sorted(offload.arriving) == [3, 4, 6, 7]  # 6, not 5 (used), then 4 and 3: three below 7
    offload._fetch_ahead(2)  # 3 and 4 arriving are above 2: three more
    assert sorted(offload.arriving) == [0, 1, 2, 3, 4, 6, 7]
    one_ahead = ActivationOffload("cpu")
    one_ahead.host = {key: torch.zeros(1024) for key in range(4)}
    one_ahead._fetch_ahead(2)
    one_ahead._fetch_ahead(2)
    assert sorted(one_ahead.arriving) == [2]


def test_small_tensors_and_parameters_stay_where_they_are():
    import torch

    offload = ActivationOffload("cpu", min_bytes=1 << 20)
    weight = torch.nn.Parameter(torch.randn(1024, 1024))
    with offload:
        (torch.randn(4, 4, requires_grad=True).sin() + (weight * 2).sum()).sum().backward()
    assert offload.offloaded_bytes == 0 and not offload.host


def test_planner_counts_offloaded_activations_only_where_they_apply():
    shape = ModelShape.from_config(MISTRAL_7B)
    base = TrainSettings(seq_len=2048, micro_batch=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    offloaded = replace(base, offload_activations=True)
    assert offloaded.offloaded
    assert not replace(offloaded, device="cpu").offloaded
    assert not replace(offloaded, gradient_checkpointing=False).offloaded
    plain, moved = estimate(shape, base), estimate(shape, offloaded)
    # 33 block boundaries and the answer tokens' hidden states leave; three boundaries stay in flight.
    boundary = 4 * 2048 * 4096 * 2
    assert plain.peak_allocated - moved.peak_allocated == pytest.approx(30 * boundary + 4 * 2047 * 4096 * 2)
    assert moved.peak_allocated < 7 * GiB < plain.peak_allocated
    assert largest_micro_batch(shape, offloaded, 8 * GiB) > largest_micro_batch(shape, base, 8 * GiB)
    tight = what_would_fit(shape, replace(base, seq_len=8192), 8 * GiB)
    assert any(alt.changes == {"offload_activations": "on"} for alt in tight)


def test_planner_counts_kept_layers_on_the_device_or_one_in_flight():
    """A kept block (engine/train/offload.py) holds what the planner counts for one block's saved tensors;
    on the device each kept block adds that much, offloaded one at a time does; auto keeps as many as
    fit on the device and none where activations are offloaded (slower there on an H100); off and no
    checkpointing keep none; a number is taken as asked (at most the layers)."""
    shape = ModelShape.from_config(MISTRAL_7B)
    base = TrainSettings(seq_len=512, micro_batch=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    block = kept_block_bytes(shape, base)
    assert 0.6 * GiB < block < 1.2 * GiB  # 8,192 tokens: attention's inputs and output, gate, act(gate), up
    for kept in (1, 3):
        assert estimate(shape, replace(base, kept_layers=kept)).peak_allocated == (
            estimate(shape, base).peak_allocated + kept * block)
    offloaded = replace(base, offload_activations=True)
    assert estimate(shape, replace(offloaded, kept_layers=10)).peak_allocated == (
        estimate(shape, offloaded).peak_allocated + block)
    roomy, tight = 12 * GiB, estimate(shape, offloaded).total + 0.5 * block
    assert kept_layers_for(shape, offloaded, roomy, asked="auto") == 0
    assert kept_layers_for(shape, offloaded, tight, asked="10") == 10
    on_device = kept_layers_for(shape, base, roomy, asked="auto")
    assert 1 <= on_device < 32 and estimate(shape, replace(base, kept_layers=on_device)).fits(roomy)
    assert not estimate(shape, replace(base, kept_layers=on_device + 1)).fits(roomy)
    assert kept_layers_for(shape, base, roomy, asked="off") == 0
    assert kept_layers_for(shape, replace(base, gradient_checkpointing=False), roomy, asked="auto") == 0
    assert kept_layers_for(shape, base, 1, asked="40") == 32
    assert kept_layers_for(shape, replace(base, gpus=2), roomy, asked="auto") == 0
    assert kept_layers_for(shape, replace(base, gpus=2), roomy, asked="4") == 4


def test_planner_counts_kept_mlps_on_the_device():
    """A kept MLP holds its gate and up (and act(gate) without liger-kernel's SwiGLU) for the micro-batch's
    tokens, on the device even with activation offload; auto keeps as many as fit; none with the tiled MLP,
    without checkpointing or in blocks kept whole; a number as asked, at most the blocks left."""
    shape = ModelShape.from_config(MISTRAL_7B)
    base = TrainSettings(seq_len=2048, micro_batch=1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                         offload_activations=True)
    tokens, inter = 2048, 14336
    for fused, tensors in (("off", 3), ("auto", 2)):
        settings = replace(base, fused_kernels=fused)
        for kept in (1, 5):
            assert estimate(shape, replace(settings, kept_mlps=kept)).peak_allocated == (
                estimate(shape, settings).peak_allocated + kept * tokens * tensors * inter * 2)
    assert not replace(base, fused_kernels="auto", device="cpu").fused
    assert not replace(base, fused_kernels="auto", gpus=2).fused and replace(base, fused_kernels="on", gpus=2).fused
    roomy = estimate(shape, base).total + 10.5 * tokens * 3 * inter * 2
    auto = kept_mlps_for(shape, base, roomy, asked="auto")
    assert 8 <= auto <= 10 and estimate(shape, replace(base, kept_mlps=auto)).fits(roomy)  # slack grows too
    assert not estimate(shape, replace(base, kept_mlps=auto + 1)).fits(roomy)
    assert kept_mlps_for(shape, base, roomy, asked="off") == 0
    assert kept_mlps_for(shape, base, 1, asked="40") == 32
    assert kept_mlps_for(shape, replace(base, kept_layers=30, offload_activations=False), 1, asked="40") == 2
    assert kept_mlps_for(shape, replace(base, tiled_mlp=True), roomy, asked="4") == 0
    assert kept_mlps_for(shape, replace(base, gradient_checkpointing=False), roomy, asked="4") == 0
    assert kept_mlps_for(shape, replace(base, gpus=2), roomy, asked="auto") == 0
    tiled = replace(base, tiled_mlp=True, kept_mlps=4)
    assert estimate(shape, tiled).details["kept_mlps"] == 0


def test_plan_reports_the_micro_batch_offload_allows(cli, workspace):
    import json

    report = json.loads(cli("plan", "mistral-7b", "--seq-len", "2048", "--batch-size", "16", "--max-memory", "8GB",
                            "--json").stdout)
    assert report["largest_micro_batch_offloaded"] > report["largest_micro_batch"] >= 1
    offloaded = json.loads(cli("plan", "mistral-7b", "--seq-len", "2048", "--batch-size", "4", "--offload",
                               "--max-memory", "8GB", "--json").stdout)
    assert offloaded["settings"]["offload_activations"] and offloaded["fits"]
    assert offloaded["estimate"]["details"]["activations_offloaded"]
    assert "largest_micro_batch_offloaded" not in offloaded
    assert json.loads(cli("plan", "mistral-7b", "--offload", "--device", "cpu", "--json").stdout)[
        "estimate"]["details"]["activations_offloaded"] is False


def test_plan_reports_the_layers_it_keeps(cli, workspace):
    import json

    run = ["plan", "mistral-7b", "--seq-len", "512", "--batch-size", "16", "--offload", "--max-memory", "12GB"]
    report = json.loads(cli(*run, "--kept-layers", "10", "--json").stdout)
    assert report["estimate"]["details"]["kept_layers"] == 10 and report["fits"]
    assert ", 10 layers kept," in cli(*run, "--kept-layers", "10").stdout
    assert json.loads(cli(*run, "--kept-layers", "auto", "--json").stdout)["estimate"]["details"]["kept_layers"] == 0
    not_offloaded = [arg for arg in run if arg != "--offload"]
    on_device = json.loads(cli(*not_offloaded, "--kept-layers", "auto", "--json").stdout)
    assert 0 < on_device["estimate"]["details"]["kept_layers"] < 32 and on_device["fits"]
    assert json.loads(cli(*run, "--json").stdout)["estimate"]["details"]["kept_layers"] == 0  # off by default
    bad = cli(*run, "--kept-layers", "most")
    assert bad.exit_code == 2 and "'kept_layers' must be off, auto or a number of layers, got 'most'" in bad.output


def test_plan_reports_the_mlps_it_keeps(cli, workspace):
    """`lqmf plan --kept-mlps`: auto keeps more MLPs at a smaller micro-batch; the text says how many."""
    import json

    run = ["plan", "mistral-7b", "--seq-len", "2048", "--offload", "--max-memory", "7.8GB", "--targets",
           "q_proj,k_proj,v_proj,o_proj"]
    kept = [json.loads(cli(*run, "--batch-size", str(micro), "--kept-mlps", "auto", "--json").stdout)
            for micro in (1, 4)]
    assert all(report["fits"] for report in kept)
    assert kept[0]["estimate"]["details"]["kept_mlps"] > kept[1]["estimate"]["details"]["kept_mlps"]
    assert ", 6 MLPs kept," in cli(*run, "--batch-size", "1", "--kept-mlps", "6").stdout
    assert json.loads(cli(*run, "--json").stdout)["estimate"]["details"]["kept_mlps"] == 0  # off by default
    bad = cli(*run, "--kept-mlps", "half")
    assert bad.exit_code == 2 and "'kept_mlps' must be off, auto or a number of layers, got 'half'" in bad.output


def test_offload_on_where_it_cannot_apply_says_so(cli, workspace, tiny_model):
    from tests.helpers import EXAMPLES

    result = cli("train", str(tiny_model), str(EXAMPLES / "chat_training.csv"), "chat", "--name", "no-offload",
                 "--max-steps", "1", "--max-seq-length", "64", "--no-4bit", "--set", "validation_split=0",
                 "--set", "offload_activations=on")
    assert result.exit_code == 0, result.output
    assert "offload_activations=on needs CUDA and gradient checkpointing; not offloading on cpu" in result.output
    manifest = (workspace / "adapters" / "no-offload" / "lqmf.json").read_text()
    assert '"offload_activations": false' in manifest


def test_the_budget_fit_offloads_only_when_that_fits_a_larger_micro_batch():
    """The choices `lqmf train --max-memory 8GB --batch-size 16 --grad-accum 1` made on the H200
    (docs/performance.md), and what the other policies and devices give."""
    shape = ModelShape.from_config(MISTRAL_7B)
    asked = TrainSettings(micro_batch=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))

    def fit(seq: int, policy: str = "auto", **changes) -> tuple[int, bool]:
        settings = replace(asked, seq_len=seq, offload_activations=policy == "on", **changes)
        micro, chosen = fit_budget(shape, settings, 16, 8 * GiB, offload=policy)
        return micro, chosen.offloaded

    assert fit(2048) == (4, True) and fit(512) == (16, True)
    assert fit(2048, "off") == (2, False) and fit(512, "off") == (8, False)
    assert fit(2048, "on") == (4, True)
    assert fit(128) == (16, False)  # fits as asked: nothing to gain
    assert fit(2048, device="cpu")[1] is False  # no offload off CUDA
    assert fit(2048, gradient_checkpointing=False)[1] is False
