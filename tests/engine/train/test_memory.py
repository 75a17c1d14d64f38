"""Memory planning: the estimator against a real training step, smart micro-batch sizing, OOM
recovery inside the real loop, `lqmf plan`, `lqmf status`, `lqmf models list` and MemoryOptimizer."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lqmf.core.memory_plan import (
    GiB,
    ModelShape,
    TrainSettings,
    approx_parameters,
    estimate,
    largest_micro_batch,
    largest_seq_len,
    parse_size,
)
from lqmf.core.models import ModelCatalogue
from lqmf.core.system import parse_cuda_version, parse_gpu_query
from lqmf.core.workspace import Workspace
from tests.helpers import EXAMPLES, MISTRAL_7B, REPO, lqmf_env

CHAT = EXAMPLES / "chat_training.csv"
FAST = ["--max-seq-length", "128", "--lr", "5e-3", "-q", "--no-4bit", "--set", "validation_split=0"]


def log_records(workspace: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (workspace / "adapters" / name / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the estimator

def test_parameter_count_and_sizes():
    assert approx_parameters(MISTRAL_7B) == 7_241_732_096  # the published count of Mistral-7B-v0.1
    assert parse_size("8GB") == parse_size("8 GiB") == parse_size(8) == parse_size("8192MB") == 8 * GiB
    assert parse_size("7.5G") == int(7.5 * GiB)
    for bad in ("lots", "-1GB", "0", "8XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


PROBE_CASES = [
    # fp32 with gradient checkpointing, a padded batch: one block's recompute working set dominates
    {"hidden": 256, "inter": 704, "layers": 3, "heads": 4, "kv_heads": 2, "vocab": 2048, "batch": 4, "seq": 256,
     "rank": 16, "four_bit": False, "checkpointing": True, "padded": True},
    # no checkpointing: every block keeps its tensors
    {"hidden": 256, "inter": 704, "layers": 3, "heads": 4, "kv_heads": 2, "vocab": 2048, "batch": 4, "seq": 256,
     "rank": 16, "four_bit": False, "checkpointing": False, "padded": False},
    # a wide MLP over 4,096 tokens, in tiles of 2,048 (engine/fused/blocks.py): one tile's MLP tensors at a time
    {"hidden": 256, "inter": 1408, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 2048, "batch": 2, "seq": 2048,
     "rank": 8, "four_bit": False, "checkpointing": True, "padded": False, "tiled": True},
    # 4-bit NF4 weights and a larger vocabulary: the chunked logits dominate
    {"hidden": 256, "inter": 704, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 8192, "batch": 4, "seq": 256,
     "rank": 8, "four_bit": True, "checkpointing": True, "padded": False},
]
STEP_TOLERANCE = 0.15  # measured at 0.95-1.05 of the estimate when this test was written


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's RSS high-water reset")
def test_estimator_matches_a_real_cpu_training_step():
    """Weights: the estimate equals the model's tensors (within 1%). One training step: the estimate
    of gradients + saved activations + max(one block's working set, logits) is within 15% of the rise
    in the RSS high-water mark over a real forward and backward (glibc told to mmap large blocks, so
    RSS follows the live tensors). CPU only: the CUDA context, allocator slack and bf16 casts are
    checked on a GPU by benchmarks/memory_check.py."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cpu_memory_probe.py"), json.dumps(PROBE_CASES)],
        env=lqmf_env({"MALLOC_MMAP_THRESHOLD_": "65536"}), capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    for case, got in zip(PROBE_CASES, measured, strict=True):
        shape = ModelShape.from_config({
            "model_type": "llama", "hidden_size": case["hidden"], "intermediate_size": case["inter"],
            "num_hidden_layers": case["layers"], "num_attention_heads": case["heads"],
            "num_key_value_heads": case["kv_heads"], "vocab_size": case["vocab"], "tie_word_embeddings": False,
            "max_position_embeddings": 2048})
        settings = TrainSettings(micro_batch=case["batch"], seq_len=case["seq"], lora_r=case["rank"],
                                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), device="cpu",
                                 quantize_4bit=case["four_bit"], gradient_checkpointing=case["checkpointing"],
                                 padded=case["padded"], tiled_mlp=case.get("tiled", False))
        est = estimate(shape, settings)
        lora_params = est.lora // 2
        assert got["weights_bytes"] == pytest.approx(est.weights + lora_params, rel=0.01), case
        step = est.peak_allocated - est.weights - lora_params - est.optimizer
        assert got["step_bytes"] == pytest.approx(step, rel=STEP_TOLERANCE), (case, got, est.to_dict())


def test_estimates_grow_with_batch_and_sequence_and_fit_search_is_tight():
    shape = ModelShape.from_config(MISTRAL_7B)
    base = TrainSettings(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    totals = [estimate(shape, replace(base, micro_batch=m)).total for m in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    assert estimate(shape, replace(base, quantize_4bit=False)).weights > 3 * estimate(shape, base).weights
    no_checkpointing = estimate(shape, replace(base, gradient_checkpointing=False))
    assert no_checkpointing.activations > 5 * estimate(shape, base).activations
    budget = 8 * GiB
    micro = largest_micro_batch(shape, base, budget)
    assert estimate(shape, replace(base, micro_batch=micro)).fits(budget)
    assert not estimate(shape, replace(base, micro_batch=micro + 1)).fits(budget)
    longest = largest_seq_len(shape, base, budget)
    assert longest % 64 == 0 and estimate(shape, replace(base, seq_len=longest)).fits(budget)
    assert not estimate(shape, replace(base, seq_len=longest + 64)).fits(budget)


# ----------------------------------------------------------------------------- training

# These tests count micro-batches of examples as the unpacked planner does (packing: tests/test_long_context.py).
UNPACKED = ["--set", "packing=off"]


def _run_out_of_memory(engine, monkeypatch, when) -> None:
    """Make the real loop's loss raise CUDA's out-of-memory error on the calls where when(n, batch) holds."""
    import torch

    real_loss = engine.answer_loss_sum
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if when(calls["n"], batch["input_ids"].shape[0]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_loss(model, batch)

    monkeypatch.setattr(engine, "answer_loss_sum", loss)


def test_oom_in_the_loop_halves_the_micro_batch_and_redoes_the_step(cli, workspace, tiny_model, monkeypatch):
    """A CUDA out-of-memory error raised by the loss of the real loop, once, in the second micro-batch
    of step 2 (after the first one's backward): the run finishes, the log and the progress output say
    what changed, and the half-done step's gradients were discarded (the weights equal those of a run
    that never ran out)."""
    import torch
    from safetensors.torch import load_file

    from lqmf.engine.train import loop as engine

    args = ["train", tiny_model, CHAT, "chat", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "3",
            *FAST, "--set", "lora_dropout=0", *UNPACKED]
    assert cli(*args, "--name", "steady").exit_code == 0
    _run_out_of_memory(engine, monkeypatch, lambda n, size: n == 4 and size > 1)  # step 1: calls 1-2
    result = cli(*[a for a in args if a != "-q"], "--name", "squeezed")
    assert result.exit_code == 0, result.output
    assert ("out of memory in step 2 at micro-batch 4: micro-batch 4 -> 2, gradient accumulation 2 -> 4 "
            "(effective batch 8 unchanged); redoing step 2") in result.output
    manifest = json.loads((workspace / "adapters" / "squeezed" / "lqmf.json").read_text())
    assert manifest["metrics"]["steps"] == 3
    assert manifest["runtime"]["micro_batch"] == 2 and manifest["runtime"]["gradient_accumulation"] == 4
    log = log_records(workspace, "squeezed")
    events = [r for r in log if r["type"] == "memory"]
    assert len(events) == 1
    assert events[0]["event"] == "out_of_memory" and events[0]["step"] == 2
    assert events[0]["micro_batch"] == [4, 2] and events[0]["gradient_accumulation"] == [2, 4]
    assert events[0]["effective_batch"] == 8 and "simulated" in events[0]["error"]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3]
    steady = load_file(workspace / "adapters" / "steady" / "adapter_model.safetensors")
    squeezed = load_file(workspace / "adapters" / "squeezed" / "adapter_model.safetensors")
    for key, value in steady.items():
        assert torch.allclose(value, squeezed[key], atol=1e-5), key


def test_oom_at_micro_batch_one_stops_with_a_checkpoint(cli, workspace, tiny_model, monkeypatch):
    from lqmf.engine.train import loop as engine

    _run_out_of_memory(engine, monkeypatch, lambda n, size: n > 2)  # step 1 (calls 1-2) fits, then nothing
    result = cli("train", tiny_model, CHAT, "chat", "--name", "starved", "--batch-size", "4", "--grad-accum", "2",
                 "--max-steps", "3", *FAST, *UNPACKED)
    assert result.exit_code == 5, result.output
    assert "out of memory in step 2 even at micro-batch 1" in result.output
    assert "lqmf train --resume starved" in result.output
    staging = workspace / "adapters" / ".staging-starved"
    assert (staging / "checkpoint" / "training_state.pt").is_file()
    log = [json.loads(line) for line in (staging / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch"] for r in log if r["type"] == "memory"] == [[4, 2], [2, 1]]


def _tiny_estimates(cli, tiny_model: Path, workspace: Path, **changes) -> dict[int, int]:
    """Estimated totals of the tiny model at micro-batches 1..4 for the sample chat set on the CPU."""
    from lqmf.engine.train.memory import process_baseline_bytes

    plan = json.loads(cli("train", tiny_model, CHAT, "chat", "--dry-run", "--json", *FAST, *UNPACKED).stdout)
    resolved = ModelCatalogue(Workspace(workspace)).resolve(str(tiny_model))
    shape = ModelShape.from_config(resolved.config)
    settings = TrainSettings(device="cpu", quantize_4bit=False, seq_len=plan["longest_example_tokens"],
                             target_modules=tuple(resolved.target_modules),
                             process_baseline=process_baseline_bytes("cpu"))  # the same once-measured value
    settings = replace(settings, **changes)
    return {m: estimate(shape, replace(settings, micro_batch=m)).total for m in (1, 2, 3, 4)}


def test_micro_batch_is_picked_to_fit_max_memory(cli, workspace, tiny_model):
    totals = _tiny_estimates(cli, tiny_model, workspace)
    budget = (totals[2] + totals[3]) // 2  # 2 fits, 3 and 4 do not
    args = ["train", tiny_model, CHAT, "chat", "--batch-size", "4", "--grad-accum", "2", *FAST, *UNPACKED,
            "--max-memory", f"{budget / 2**20:.3f}MB"]
    dry = cli(*args, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert (plan["micro_batch"], plan["gradient_accumulation"], plan["effective_batch"]) == (2, 4, 8)
    memory = plan["memory"]
    assert memory["requested_micro_batch"] == 4 and memory["micro_batch"] == 2
    assert memory["budget_source"] == "max_memory" and memory["device"] == "cpu"
    assert memory["estimate"]["total_gb"] * GiB == pytest.approx(totals[2], abs=1e-4 * GiB)
    result = cli(*args, "--name", "fitted", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    fit = [r for r in log_records(workspace, "fitted") if r["type"] == "memory"]
    assert fit and fit[0]["event"] == "fit" and fit[0]["micro_batch"] == [4, 2]
    manifest = json.loads((workspace / "adapters" / "fitted" / "lqmf.json").read_text())
    assert manifest["runtime"]["micro_batch"] == 2 and manifest["runtime"]["gradient_accumulation"] == 4


def test_nothing_fits_fails_before_loading_weights(cli, workspace, tiny_model, tmp_path):
    """The weights file is gone: if the memory check did not come first, loading would fail instead."""
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    totals = _tiny_estimates(cli, tiny_model, workspace)
    shorter = _tiny_estimates(cli, tiny_model, workspace, seq_len=64)
    budget = (shorter[1] + totals[1]) // 2  # only a shorter sequence fits
    result = cli("train", no_weights, CHAT, "chat", "--name", "nofit", *FAST, *UNPACKED, "--max-memory",
                 f"{budget / 2**20:.3f}MB")
    assert result.exit_code == 5, result.output
    assert "even at micro-batch 1" in result.output and "max_seq_length=64" in result.output
    assert not (workspace / "adapters").exists() or not any((workspace / "adapters").iterdir())


def test_max_memory_is_checked_like_any_key(cli, workspace, tiny_model):
    result = cli("train", tiny_model, CHAT, "chat", "--dry-run", "--set", "max_memory=lots")
    assert result.exit_code == 2 and "max_memory" in result.output


def test_dry_run_prints_the_memory_breakdown(cli, workspace, tiny_model):
    text = cli("train", tiny_model, CHAT, "chat", "--dry-run", "--max-seq-length", "128")
    assert text.exit_code == 0, text.output
    assert "memory:      ~" in text.stdout and "activations" in text.stdout and "logits and loss" in text.stdout
    plan = json.loads(cli("train", tiny_model, CHAT, "chat", "--dry-run", "--json").stdout)
    est = plan["memory"]["estimate"]
    for key in ("weights_gb", "lora_gb", "optimizer_gb", "activations_gb", "logits_loss_gb", "peak_allocated_gb",
                "allocator_slack_gb", "cuda_context_gb", "total_gb"):
        assert est[key] >= 0, key
    assert est["total_gb"] > est["weights_gb"] > 0
    assert plan["memory"]["budget_gb"] is None  # CPU, no max_memory: nothing to fit


# ----------------------------------------------------------------------------- lqmf plan / models list

def test_plan_json_for_a_catalogue_model_offline(cli, workspace):
    result = cli("plan", "mistral-7b", "--seq-len", "512", "--batch-size", "2", "--max-memory", "8GB", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["shape_from"] == "LQMF's table of catalogue models" and report["parameters"] == 7_241_732_096
    assert report["settings"]["quantize_4bit"] and report["settings"]["micro_batch"] == 2
    assert report["budget_gb"] == 8 and report["budget_source"] == "--max-memory"
    assert report["fits"] and 5 < report["estimate"]["total_gb"] < 8
    shape = ModelShape(**report["shape"])
    settings = TrainSettings(**{**report["settings"], "target_modules": tuple(report["settings"]["target_modules"])})
    micro = report["largest_micro_batch"]
    assert estimate(shape, replace(settings, micro_batch=micro)).fits(8 * GiB)
    assert not estimate(shape, replace(settings, micro_batch=micro + 1)).fits(8 * GiB)
    assert report["longest_seq_len"] == largest_seq_len(shape, settings, 8 * GiB) > 512


def test_plan_counts_the_adapter_tables_lqmf_serve_holds(cli, workspace):
    """--serve-adapters K: the serving estimate holds the tables of K + 1 slots and index 0's zeros, at the
    plan's rank and modules, as `lqmf serve --max-adapters K` does; 64 r16 q/k/v/o adapters on a 7B model
    leave room for fewer sequences in 8 GB than 8 do."""
    def serving(*extra):
        result = cli("plan", "mistral-7b", "--rank", "16", "--targets", "q_proj,k_proj,v_proj,o_proj",
                     "--max-memory", "8GB", "--json", *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["serving"]

    default, many = serving(), serving("--serve-adapters", "64")
    one_adapter = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024)) * 2 / GiB  # q, o and k, v in bf16
    assert default["resident_adapters"] == 8 and default["adapters"] == pytest.approx(10 * one_adapter, abs=1e-3)
    assert many["resident_adapters"] == 64 and many["adapters"] == pytest.approx(66 * one_adapter, abs=1e-3)
    assert 0 < many["largest_batch"] < default["largest_batch"]
    text = cli("plan", "mistral-7b", "--max-memory", "8GB", "--serve-adapters", "64").stdout
    assert ", 64 adapters " in [row for row in text.splitlines() if row.startswith("serving")][0]


def test_plan_says_what_would_fit(cli, workspace):
    report = json.loads(cli("plan", "mistral-7b", "--seq-len", "4096", "--no-4bit", "--max-memory", "8GB",
                            "--json").stdout)
    assert not report["fits"] and report["largest_micro_batch"] == 0
    assert report["would_fit_with"] and all(alt["total_gb"] <= 8 for alt in report["would_fit_with"])
    assert all(alt["changes"].get("use_4bit_quantization") for alt in report["would_fit_with"])
    text = cli("plan", "mistral-7b", "--seq-len", "4096", "--no-4bit", "--max-memory", "8GB")
    assert "does not fit" in text.stdout and "use_4bit_quantization=true" in text.stdout
    assert "weights" in text.stdout and "CUDA context" in text.stdout


def test_plan_errors(cli, workspace):
    unknown = cli("plan", "someorg/never-downloaded")
    assert unknown.exit_code == 3 and "not available locally" in unknown.output
    assert cli("plan", "mistral-7b", "--rank", "0").exit_code == 2
    assert cli("plan", "mistral-7b", "--max-memory", "lots").exit_code == 2


def test_models_list_shows_the_qlora_footprint(cli, workspace, tiny_model):
    assert cli("models", "add", "tiny", str(tiny_model)).exit_code == 0
    rows = {r["alias"]: r for r in json.loads(cli("models", "list", "--json").stdout)}
    planned = json.loads(cli("plan", "mistral-7b", "--json").stdout)["estimate"]["total_gb"]
    assert rows["mistral-7b"]["qlora_estimate_gb"] == pytest.approx(planned, abs=0.01)
    assert 0 < rows["tiny"]["qlora_estimate_gb"] < 1
    assert rows["llama3-8b"]["qlora_estimate_gb"] > rows["mistral-7b"]["qlora_estimate_gb"]
    assert "QLoRA est." in cli("models", "list").stdout


# ----------------------------------------------------------------------------- lqmf status

def test_status_json_fields(cli, workspace):
    (workspace / "adapters" / "half").mkdir(parents=True)
    report = json.loads(cli("status", "--json").stdout)
    for key in ("lqmf", "python", "gpus", "cuda_version", "cpu", "ram", "disk", "versions", "adapters", "serve"):
        assert key in report, key
    assert report["cpu"]["logical_cores"] >= 1 and report["ram"]["total_gb"] > 0
    assert report["disk"]["free_gb"] > 0 and report["disk"]["path"] == str(workspace)
    assert set(report["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    assert report["adapters"]["count"] == 0
    assert report["adapters"]["broken"] == [{"name": "half", "problem": "missing adapter_config.json, "
                                             "adapter_model.safetensors, lqmf.json"}]
    assert "torch" not in report
    if platform.processor() in ("", platform.machine()):  # what status leaves out of platform.platform()
        assert report["platform"] == platform.platform()
    if not shutil.which("nvidia-smi"):
        assert report["gpus"] == [] and "nvidia-smi not found" in report["gpu_problem"]


def test_status_reads_nvidia_smi_without_torch(workspace, tmp_path):
    """A stand-in nvidia-smi (this machine has no GPU) printing what a real one prints on an H200."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    'case "$1" in\n'
                    '  --version) printf "NVIDIA-SMI version  : 580.159.03\\nDRIVER version      : 580.159.03\\n'
                    'CUDA Version        : 13.0\\n" ;;\n'
                    '  *) echo "0, NVIDIA H200, 143771, 1024, 142747, 580.159.03, 3" ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    code = ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from lqmf.cli.app import app\n"
            "result = CliRunner().invoke(app, ['status', '--json'])\n"
            "assert result.exit_code == 0, result.output\n"
            "print(json.dumps({'report': json.loads(result.stdout), 'torch': 'torch' in sys.modules}))\n")
    env = lqmf_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LQMF_HOME": str(workspace)})
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["torch"] is False, "lqmf status imported torch"
    report = out["report"]
    assert report["cuda_version"] == "13.0" and report["gpu_problem"] is None
    gpu = report["gpus"][0]
    assert gpu["name"] == "NVIDIA H200" and gpu["driver"] == "580.159.03"
    assert gpu["memory_total_gb"] == pytest.approx(140.4, abs=0.1) and gpu["utilization_pct"] == 3


def test_nvidia_smi_parsers():
    rows = parse_gpu_query("0, NVIDIA GeForce RTX 4060, 8188, [N/A], 7900, 550.54, [N/A]\nnot a row\n")
    assert len(rows) == 1 and rows[0]["memory_used_gb"] is None and rows[0]["utilization_pct"] is None
    assert rows[0]["memory_total_gb"] == pytest.approx(8.0, abs=0.01)
    assert parse_cuda_version("| NVIDIA-SMI 550.54   Driver Version: 550.54   CUDA Version: 12.4 |") == "12.4"
    assert parse_cuda_version("no version here") is None


def test_status_gpu_asks_torch(cli, workspace):
    report = json.loads(cli("status", "--gpu", "--json").stdout)
    import torch

    assert report["torch"]["torch"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()


# ----------------------------------------------------------------------------- MemoryOptimizer

def test_memory_optimizer_monitors_peak_and_leaks_on_cpu(workspace):
    from lqmf import MemoryOptimizer

    optimizer = MemoryOptimizer(target_gpu_memory_gb=7.5, device="cpu")
    with optimizer.memory_monitor("Training") as outer:
        with optimizer.memory_monitor("spike") as spike:
            scratch = bytearray(96 * 2**20)
            del scratch
        kept = bytearray(80 * 2**20)
    assert spike.peak_increase_gb * 1024 >= 90 and abs(spike.leaked_gb * 1024) < 8
    assert outer.peak_gb >= spike.peak_gb and 72 <= outer.leaked_gb * 1024 < 90
    assert [r.label for r in optimizer.records] == ["spike", "Training"]
    assert not outer.over_target
    advice = [str(s) for s in optimizer.suggest_optimizations()]
    assert any("'Training' left 0.08 GB held" in line for line in advice), advice
    del kept


def test_memory_optimizer_suggestions_use_the_estimator(workspace):
    from lqmf import MemoryOptimizer

    optimizer = MemoryOptimizer(target_gpu_memory_gb=7.5, model="mistral-7b")
    fits = optimizer.suggest_optimizations()
    assert len(fits) == 1 and fits[0].estimated_gb < 7.5
    longer = optimizer.suggest_optimizations(config={"max_seq_length": 3072})
    assert longer[0].changes == {"per_device_train_batch_size": 1} and longer[0].estimated_gb <= 7.5
    assert "gradient_accumulation_steps by 2" in str(longer[0])
    longest = optimizer.suggest_optimizations(config={"max_seq_length": 8192})
    assert longest and all(s.changes["per_device_train_batch_size"] == 1 and s.estimated_gb <= 7.5 for s in longest)
    unquantized = optimizer.suggest_optimizations(config={"use_4bit_quantization": False, "max_seq_length": 2048})
    assert unquantized and all(s.changes.get("use_4bit_quantization") is True for s in unquantized)
    assert all(s.estimated_gb <= 7.5 for s in unquantized)
    assert optimizer.estimate(micro_batch=1).total < optimizer.estimate().total


def test_memory_optimizer_accepts_a_loaded_model(workspace, tiny_model):
    from transformers import AutoModelForCausalLM

    from lqmf.memory import MemoryOptimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    optimizer = MemoryOptimizer(target_gpu_memory_gb=0.001, device="cpu")
    assert optimizer.estimate(model).details["parameters"] == sum(p.numel() for p in model.parameters())
    assert optimizer.suggest_optimizations(model, config={"max_seq_length": 512})


def test_import_lqmf_stays_light():
    code = ("import sys, lqmf\n"
            "assert 'lqmf.memory' not in sys.modules\n"
            "from lqmf import MemoryOptimizer\n"
            "assert MemoryOptimizer.__module__ == 'lqmf.memory'\n"
            "print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], env=lqmf_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plan_and_status_do_not_import_torch(workspace):
    from tests.helpers import modules_after

    for args in (["plan", "mistral-7b", "--json"], ["status", "--json"], ["models", "list", "--json"]):
        heavy = {"torch", "transformers", "peft", "bitsandbytes"} & modules_after(args)
        assert not heavy, f"lqmf {' '.join(args)} imported {heavy}"


def test_lora_dropout_is_kept_where_it_fits_at_the_micro_batch_chosen_with_it_recomputed():
    """recompute_lora_dropout: auto keeps the dropout's output and mask (engine/lora/lean.py) when the
    estimate with them fits the budget, recomputes when it does not or no budget is known; on and off as
    asked; without dropout there is nothing to keep."""
    from lqmf.core.memory_plan import recompute_lora_dropout_for

    shape = ModelShape.from_config(MISTRAL_7B)
    base = TrainSettings(micro_batch=4, seq_len=2048, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                         offload_activations=True)
    kept, recomputed = estimate(shape, replace(base, recompute_lora_dropout=False)), estimate(shape, base)
    assert kept.details["lora_dropout_kept"] and not recomputed.details["lora_dropout_kept"]
    # three q/k/v dropout outputs and masks in place of their shared input, and o_proj's: 4 x 4096 x 3 - 4096 x 2
    per_token = 4 * 4096 * 3 - 4096 * 2
    assert kept.peak_allocated - recomputed.peak_allocated == pytest.approx(per_token * 4 * 2048, rel=0.01)
    assert recompute_lora_dropout_for(shape, base, kept.total) is False
    assert recompute_lora_dropout_for(shape, base, kept.total - 1) is True
    assert recompute_lora_dropout_for(shape, base, None) is True
    assert recompute_lora_dropout_for(shape, base, 1, asked="off") is False
    assert recompute_lora_dropout_for(shape, base, 1 << 50, asked="on") is True
    assert recompute_lora_dropout_for(shape, replace(base, lora_dropout=0), 1 << 50, asked="on") is False
    # with the fused kernels the mask is drawn in the rank-r product's kernel: nothing to keep, whatever is asked
    fused = replace(base, fused_kernels="auto")
    assert fused.fused and recompute_lora_dropout_for(shape, fused, kept.total, asked="off") is True
    assert not estimate(shape, replace(fused, recompute_lora_dropout=False)).details["lora_dropout_kept"]


def test_training_with_the_lora_dropout_kept_gives_the_recomputed_losses(cli, workspace, tiny_model):
    """lqmf train: the dropout recomputed (no budget known on the CPU: auto recomputes) and kept (off) give
    the same losses; the manifest says which it did."""
    args = ["train", tiny_model, CHAT, "chat", "--batch-size", "2", "--grad-accum", "2", *FAST, *UNPACKED,
            "--max-steps", "2", "--set", "lora_dropout=0.1"]
    losses = {}
    for name, extra in (("recomputed", []), ("kept", ["--set", "recompute_lora_dropout=off"])):
        result = cli(*args, "--name", name, *extra)
        assert result.exit_code == 0, result.output
        manifest = json.loads((workspace / "adapters" / name / "lqmf.json").read_text())
        assert manifest["runtime"]["lora_dropout_kept"] == (name == "kept")
        losses[name] = [r["loss"] for r in log_records(workspace, name) if r["type"] == "train"]
    assert len(losses["kept"]) == 2 and losses["kept"] == losses["recomputed"]
