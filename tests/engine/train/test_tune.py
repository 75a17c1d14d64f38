"""`lqmf tune`: an Optuna study on the tiny Llama that finishes, prunes, resumes and registers the best."""

from __future__ import annotations

import json

import pytest

from lqmf.core import tune as spec
from lqmf.core.errors import InputError
from tests.helpers import EXAMPLES, out_json

SPACE = """
space:
  learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
  lora_r: [4, 8]
  target_modules: [default, all-linear]
fixed:
  max_steps: 4
  eval_strategy: steps
  eval_steps: 2
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  max_seq_length: 128
  use_4bit_quantization: false
first_trials:
  - {learning_rate: 5.0e-3, lora_r: 8}
  - {learning_rate: 1.0, lora_r: 8}   # far too large: pruned at its first evaluation
pruner: {startup_trials: 1}
"""


def test_study_prunes_registers_the_best_and_resumes(cli, workspace, tiny_model, monkeypatch):
    from lqmf.engine.train import loop as trainer

    loads = []
    real_load = trainer.load_model
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    (workspace / "space.yaml").write_text(SPACE)
    dataset = EXAMPLES / "chat_training.csv"
    result = out_json(cli("tune", tiny_model, dataset, "chat", "--name", "tt", "--space", "space.yaml",
                          "--trials", "3", "--keep-best", "--json"))
    assert len(loads) == 1  # one base model for every trial
    states = [t["state"] for t in result["trials"]]
    assert len(states) == 3 and states[0] == "complete" and states[1] == "pruned"
    assert result["trials"][1]["pruned_at_step"] == 2
    assert not (workspace / "tune" / "tt" / "trial-1").exists()
    best = result["best"]
    assert best["value"] == min(t["value"] for t in result["trials"] if t["state"] == "complete")
    manifest = json.loads((workspace / "adapters" / "tt" / "lqmf.json").read_text())
    assert manifest["lineage"] == {"operation": "tune", "study": str(workspace / "tune" / "tt"),
                                   "trial": best["number"], "metric": "loss", "value": best["value"]}
    assert manifest["metrics"]["eval_loss"] == pytest.approx(best["value"])
    assert manifest["config"]["learning_rate"] == best["params"]["learning_rate"]
    plan = out_json(cli("train", "--config", "tt-best", "--name", "again", "--dry-run", "--json"))
    assert plan["config"]["learning_rate"] == best["params"]["learning_rate"] and plan["config"]["max_steps"] == 4

    resumed = out_json(cli("tune", "--resume", "tt", "--trials", "1", "--json"))
    assert [t["number"] for t in resumed["trials"]] == [0, 1, 2, 3]
    again = cli("tune", tiny_model, dataset, "chat", "--name", "tt", "--space", "space.yaml")
    assert again.exit_code == 4 and "--resume tt continues it" in again.stderr


def test_gate_refuses_the_best_without_registering(cli, workspace, tiny_model):
    (workspace / "space.yaml").write_text(SPACE.replace("  - {learning_rate: 1.0e+4, lora_r: 8}", ""))
    result = cli("tune", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "tg", "--space",
                 "space.yaml", "--trials", "1", "--keep-best", "--max-loss", "0.001")
    assert result.exit_code == 1 and "not registered: held-out loss" in result.stderr
    assert not (workspace / "adapters" / "tg").exists()
    assert (workspace / "configs" / "tg-best.yaml").is_file()


@pytest.mark.parametrize(("text", "message"), [
    ("space: {learning_rat: [0.1]}", "did you mean 'learning_rate'"),
    ("space: {lora_r: {low: 8, high: 4}}", "low 8 not below high 4"),
    ("space: {lora_r: 8}", "fixed values go under fixed:"),
    ("spaces: {}", "unknown key 'spaces'"),
    ("space: {lora_r: [4]}\nfirst_trials: [{lora_alpha: 8}]", "not in the space"),
])
def test_bad_space_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        spec.load_space(path, "chat")


def test_metric_must_fit_the_task():
    assert spec.check_metric("accuracy", "classification") == "maximize"
    with pytest.raises(InputError, match="needs a classification task"):
        spec.check_metric("accuracy", "chat")
