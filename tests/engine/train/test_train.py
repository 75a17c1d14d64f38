"""`lqmf train` end to end on tiny local models (CPU), the MiniLM quality check, resume and staging."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, logged_steps, start_training, wait_for

FAST = ["--max-seq-length", "256", "--batch-size", "4", "--grad-accum", "2", "--lr", "5e-3", "-q"]


def manifest(workspace: Path, name: str) -> dict:
    return json.loads((workspace / "adapters" / name / "lqmf.json").read_text())


@pytest.mark.parametrize(
    ("dataset", "task"),
    [("chat_training.csv", "chat"), ("chat_messages.jsonl", "chat"),
     ("instructions.jsonl", "instruction"), ("summarization.csv", "summarization")],
)
def test_generative_tasks_train_and_loss_falls(cli, workspace, tiny_model, dataset, task):
    result = cli("train", tiny_model, EXAMPLES / dataset, task, "--name", "a1", "--epochs", "2", *FAST, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["adapter"] == "a1"
    metrics = out["metrics"]
    assert metrics["train_loss"] < metrics["first_train_loss"]
    assert metrics["eval_loss"] < metrics["initial"]["eval_loss"]
    folder = workspace / "adapters" / "a1"
    for name in ("adapter_config.json", "adapter_model.safetensors", "lqmf.json", "config.yaml", "metrics.jsonl"):
        assert (folder / name).is_file(), name
    assert not any(p.name.startswith(".staging") for p in (workspace / "adapters").iterdir())
    m = manifest(workspace, "a1")
    assert m["task"] == ("instruction_following" if task == "instruction" else task)
    assert m["runtime"]["device"] == "cpu" and m["runtime"]["quantized_4bit"] is True
    assert m["dataset"]["sha256"] and m["versions"]["peft"]
    assert set(m["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in log} == {"train", "eval"}


def test_adapter_loads_with_plain_peft(cli, workspace, tiny_model):
    result = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "plain", "--max-steps", "2",
                 "--no-4bit", *FAST)
    assert result.exit_code == 0, result.output
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, workspace / "adapters" / "plain")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(adapted, plain), "the trained LoRA weights change the output"


def test_default_name_and_template_fallback(cli, workspace, tiny_model_no_template):
    result = cli("train", tiny_model_no_template, EXAMPLES / "chat_training.csv", "chat", "--max-steps", "1",
                 "--no-4bit", *FAST)
    assert result.exit_code == 0, result.output
    name = result.stdout.strip().splitlines()[-1]
    assert name.startswith("tiny-plain-chat-") and len(name) == len("tiny-plain-chat-") + 5
    assert manifest(workspace, name)["runtime"]["chat_template"] == "lqmf-default"


def test_classification_on_a_decoder(cli, workspace, tiny_model):
    result = cli("train", tiny_model, EXAMPLES / "sentiment.csv", "classification", "--name", "dec",
                 "--max-steps", "3", *FAST)
    assert result.exit_code == 0, result.output
    m = manifest(workspace, "dec")
    assert m["id2label"] == {"0": "negative", "1": "positive"}
    assert 0.0 <= m["metrics"]["eval_accuracy"] <= 1.0 and "eval_macro_f1" in m["metrics"]


def test_minilm_learns_sentiment(cli, workspace, minilm):
    """A LoRA adapter on the real pretrained MiniLM clearly beats chance on the held-out split."""
    result = cli("train", "minilm", EXAMPLES / "sentiment.csv", "classification", "--name", "sent",
                 "--epochs", "2", "--no-4bit", "--json", "-q")  # 0.55 -> 0.875; 4-bit: a third slower on CPUs
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["eval_accuracy"] >= 0.8, metrics
    assert metrics["eval_macro_f1"] >= 0.8, metrics
    assert metrics["eval_accuracy"] > metrics["initial"]["eval_accuracy"] + 0.15


def test_dry_run_writes_nothing(cli, workspace, tiny_model):
    result = cli("train", tiny_model, EXAMPLES / "summarization.csv", "summarization", "--name", "dry",
                 "--dry-run", "--json", "--max-seq-length", "64")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["train_examples"] + plan["validation_examples"] + plan["dropped_examples"] == 80
    assert plan["total_steps"] == plan["steps_per_epoch"] * plan["config"]["num_train_epochs"]
    assert plan["train_tokens_per_epoch"] > 0 and plan["estimated_seconds"]
    assert any("exceed max_seq_length=64" in note for note in plan["notes"])
    assert not (workspace / "adapters").exists() or not any((workspace / "adapters").iterdir())


def test_overlong_error_policy(cli, workspace, tiny_model):
    result = cli("train", tiny_model, EXAMPLES / "summarization.csv", "summarization", "--dry-run",
                 "--set", "overlong=error", "--max-seq-length", "64")
    assert result.exit_code == 2
    assert "longer than max_seq_length=64" in result.output


def test_name_checks_and_force(cli, workspace, tiny_model):
    bad = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "../evil", "--dry-run")
    assert bad.exit_code == 2 and "job_name" in bad.output
    args = ["train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "dup", "--max-steps", "1",
            "--no-4bit", *FAST]
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 4 and "already exists" in again.output
    assert cli(*args, "--force").exit_code == 0


def test_config_file_and_precedence_in_train(cli, workspace, tiny_model):
    (workspace / "configs").mkdir()
    (workspace / "configs" / "mine.yaml").write_text(
        f"base_model: {tiny_model}\ntask_type: chat\ndataset_path: {EXAMPLES / 'chat_training.csv'}\n"
        "lora_r: 4\nmax_steps: 1\nuse_4bit_quantization: false\n")
    result = cli("train", "--config", "mine", "--name", "fromcfg", "--set", "lora_r=8", *FAST)
    assert result.exit_code == 0, result.output
    m = manifest(workspace, "fromcfg")
    assert m["lora"]["r"] == 8 and m["config"]["max_steps"] == 1
    saved = (workspace / "adapters" / "fromcfg" / "config.yaml").read_text()
    assert "lora_r: 8" in saved


def test_ctrl_c_checkpoints_and_resume_finishes(workspace, tiny_model, run_lqmf):
    staging = workspace / "adapters" / ".staging-resumable"
    proc = start_training(workspace, tiny_model, "resumable", steps=400)
    wait_for(lambda: logged_steps(staging) >= 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after step" in err
    assert (staging / "checkpoint" / "training_state.pt").is_file()
    assert not (workspace / "adapters" / "resumable").exists()
    done_before = logged_steps(staging)
    refused = run_lqmf("train", "--resume", "resumable", "--set", "lora_rr=1", cwd=workspace)
    assert refused.returncode == 2 and "did you mean 'lora_r'" in refused.stderr
    resumed = run_lqmf("train", "--resume", "resumable", "--max-steps", str(done_before + 3), cwd=workspace)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {done_before}" in resumed.stderr
    folder = workspace / "adapters" / "resumable"
    assert (folder / "lqmf.json").is_file() and not staging.exists()
    assert manifest(workspace, "resumable")["metrics"]["steps"] == done_before + 3


def test_sigkill_leaves_no_half_adapter(workspace, tiny_model):
    proc = start_training(workspace, tiny_model, "killed", steps=400)
    staging = workspace / "adapters" / ".staging-killed"
    wait_for(lambda: logged_steps(staging) >= 1)
    proc.kill()
    proc.wait(timeout=30)
    assert not (workspace / "adapters" / "killed").exists()
    assert staging.is_dir() and not (staging / "lqmf.json").exists()
    from lqmf.core.registry import Registry
    from lqmf.core.workspace import Workspace

    entries = Registry(Workspace(workspace)).entries()
    assert [(e.name, e.complete) for e in entries] == [("killed", False)]


def test_pretokenized_dataset_trains(cli, workspace, tiny_model):
    rows = [{"input_ids": [(7 * i + j) % 500 + 10 for j in range(48)]} for i in range(40)]
    (workspace / "tokens.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = cli("train", tiny_model, "tokens.jsonl", "chat", "--name", "tok", "--epochs", "2", *FAST, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["train_loss"] < metrics["first_train_loss"]
    rows.append({"input_ids": [999999]})
    (workspace / "tokens.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bad = cli("train", tiny_model, "tokens.jsonl", "chat", "--dry-run")
    assert bad.exit_code == 2 and "outside the tokenizer's vocabulary" in bad.output
