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
