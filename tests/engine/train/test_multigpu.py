"""Several GPUs on paper: per-GPU memory plans, strategy choice and the checks made before launch."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lqmf.core.distributed import Topology, check_batch_split, check_fsdp_settings, requested_gpus
from lqmf.core.errors import InputError
from lqmf.core.memory_plan import GiB, ModelShape, TrainSettings, choose_strategy, estimate, fit_strategies
from lqmf.core.models import ModelCatalogue
from lqmf.core.workspace import Workspace


@pytest.fixture
def mistral_shape(workspace):
    from lqmf.core.memory_plan import require_shape

    return require_shape(ModelCatalogue(Workspace(workspace)).resolve("mistral-7b"))


SEQ2048 = TrainSettings(micro_batch=4, seq_len=2048, lora_r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def test_ddp_holds_the_whole_model_and_fsdp_shards_it(mistral_shape):
    single = estimate(mistral_shape, SEQ2048)
    ddp = estimate(mistral_shape, replace(SEQ2048, gpus=2, strategy="ddp"))
    fsdp2 = estimate(mistral_shape, replace(SEQ2048, gpus=2, strategy="fsdp"))
    fsdp4 = estimate(mistral_shape, replace(SEQ2048, gpus=4, strategy="fsdp"))
    assert ddp.weights == single.weights and ddp.activations == single.activations
    assert ddp.lora > single.lora  # the flat gradient buffer of the all-reduce
    assert fsdp4.weights < fsdp2.weights < single.weights
    assert fsdp2.optimizer < single.optimizer * 4  # fp32 AdamW, but only half of it
    # each GPU still runs its whole micro-batch; PEFT's LoRA forward (FSDP) also keeps its dropout outputs
    assert fsdp2.activations > single.activations
    no_dropout = replace(SEQ2048, lora_dropout=0)
    assert estimate(mistral_shape, replace(no_dropout, gpus=2, strategy="fsdp")).activations == \
        estimate(mistral_shape, no_dropout).activations
    assert fsdp2.peak_allocated < ddp.peak_allocated
    assert fsdp2.allocator_slack > ddp.allocator_slack  # FSDP's streams keep their own freed blocks
    # The 4-bit storage halves; the quantization constants, the root unit and two gathered blocks do not.
    quantized = fsdp2.details["quantized_params"]
    assert single.weights - fsdp2.weights < quantized * 0.25


# A 70B-class shape: its 4-bit weights alone (~37 GB) fill a 40 GB GPU.
LARGE = ModelShape.from_config({"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
                                "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                                "num_key_value_heads": 8, "max_position_embeddings": 8192})


def test_auto_takes_ddp_when_it_fits_and_fsdp_when_only_sharding_does():
    settings = TrainSettings(micro_batch=4, seq_len=1024, lora_r=16, gpus=2)
    roomy = fit_strategies(LARGE, settings, 16, 80 * GiB)
    assert roomy["ddp"].micro_batch and choose_strategy(roomy) == "ddp"
    assert choose_strategy(roomy, "fsdp") == "fsdp"
    assert 16 // 2 % roomy["ddp"].micro_batch == 0  # the per-GPU share splits into whole micro-batches
    tight = fit_strategies(LARGE, settings, 16, 40 * GiB)
    assert not tight["ddp"].micro_batch and tight["fsdp"].micro_batch
    assert tight["fsdp"].estimate.total <= 40 * GiB < tight["ddp"].estimate.total
    assert choose_strategy(tight) == "fsdp"
    assert choose_strategy(fit_strategies(LARGE, settings, 16, 10 * GiB)) is None


def test_gpu_count_and_batch_checks(monkeypatch):
    assert requested_gpus(None, 8) == 1  # one GPU means one GPU
    assert requested_gpus("all", 2) == 2 and requested_gpus("2", 2) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(InputError, match=r"gpus=4 asks for more GPUs than the 1 visible \(CUDA_VISIBLE_DEVICES=0\)"):
        requested_gpus("4", 1)
    with pytest.raises(InputError, match="no CUDA GPU"):
        requested_gpus("all", 0)
    assert requested_gpus("2", 0, device="cpu") == 2  # gloo processes on the CPU
    check_batch_split(16, 2)
    with pytest.raises(InputError, match="gradient_accumulation_steps"):
        check_batch_split(6, 4)
    assert Topology.from_environment({}) == Topology()
    ranked = Topology.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert ranked.distributed and not ranked.is_main


def test_fsdp_traps_are_named_before_launch():
    check_fsdp_settings("bfloat16", "bfloat16", "float32", lora_wrapped_apart=True)
    with pytest.raises(InputError, match=r"^bnb_4bit_quant_storage=uint8 must equal the FSDP mixed-precision "
                                         r"dtype bfloat16 \(FSDP cannot flatten integer dtype tensors\)"):
        check_fsdp_settings("uint8", "bfloat16", "float32", lora_wrapped_apart=True)
    with pytest.raises(InputError, match="LoRA weights in float32 share FSDP units with 4-bit storage in bfloat16"):
        check_fsdp_settings("bfloat16", "bfloat16", "float32", lora_wrapped_apart=False)


def test_plan_per_gpu(cli, workspace):
    args = ["plan", "mistral-7b", "--seq-len", "2048", "--batch-size", "8", "--max-memory", "8GB",
            "--targets", "q_proj,k_proj,v_proj,o_proj", "--json"]
    report = json.loads(cli(*args, "--gpus", "2").stdout)
    strategies = report["strategies"]
    assert report["gpus"] == 2 and strategies["per_gpu_batch"] == 8 * 8 // 2
    assert strategies["chosen"] == "ddp" and strategies["ddp"]["fits"] and strategies["fsdp"]["fits"]
    assert report["settings"]["strategy"] == "ddp" and report["settings"]["gpus"] == 2
    forced = json.loads(cli(*args, "--gpus", "2", "--strategy", "fsdp").stdout)
    assert forced["strategies"]["chosen"] == "fsdp" and forced["settings"]["strategy"] == "fsdp"
    assert forced["estimate"]["weights_gb"] < report["estimate"]["weights_gb"]
    single = json.loads(cli(*args).stdout)
    assert "strategies" not in single and single["settings"]["gpus"] == 1
    text = cli(*args[:-1], "--gpus", "2").stdout
    assert "ddp   fits at micro-batch" in text and "strategy: ddp" in text
    assert cli(*args, "--gpus", "0").exit_code == 2
    assert cli(*args, "--gpus", "3").exit_code == 2  # 64 examples per step do not split over 3
    bad = cli(*args, "--gpus", "2", "--strategy", "pipeline")
    assert bad.exit_code == 2 and "strategy" in bad.output


def test_train_refuses_more_gpus_than_visible_before_loading_anything(cli, workspace, tiny_model, monkeypatch):
    from tests.helpers import EXAMPLES

    data = EXAMPLES / "chat_training.csv"
    monkeypatch.setattr("lqmf.engine.loading.visible_gpus", lambda: 1)
    result = cli("train", tiny_model, data, "chat", "--name", "x", "--gpus", "2")
    assert result.exit_code == 2 and "gpus=2 asks for more GPUs than the 1 visible" in result.output
    bad = cli("train", tiny_model, data, "chat", "--name", "x", "--gpus", "two")
    assert bad.exit_code == 2 and "'gpus' must be a number of GPUs" in bad.output
    split = cli("train", tiny_model, data, "chat", "--name", "x", "--device", "cpu", "--gpus", "3", "--dry-run",
                "--batch-size", "2", "--grad-accum", "8")
    assert split.exit_code == 2 and "gradient_accumulation_steps" in split.output
    chosen = cli("train", tiny_model, data, "chat", "--name", "x", "--device", "cpu", "--gpus", "3", "--dry-run",
                 "--batch-size", "2", "--json")
    assert chosen.exit_code == 0 and json.loads(chosen.stdout)["effective_batch"] % 3 == 0
    assert not (workspace / "adapters").exists() or not any((workspace / "adapters").iterdir())


def test_dry_run_plans_each_process(cli, workspace, tiny_model):
    from tests.helpers import EXAMPLES

    result = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "x", "--device", "cpu",
                 "--gpus", "2", "--batch-size", "4", "--grad-accum", "4", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["effective_batch"] == 16 and plan["processes"] == 2
    assert plan["micro_batch"] * plan["gradient_accumulation"] == 8
    assert plan["memory"]["gpus"] == 2 and plan["memory"]["strategy"] == "ddp"
