"""Defaults that learn on small data sets, and the no-improvement warning."""

from __future__ import annotations

import json

import pytest

from lqmf.core.metrics import learning_check, no_improvement_warning
from lqmf.core.schedule import MAX_AUTO_EPOCHS, MIN_STEPS, MIN_STEPS_PER_EPOCH, plan_schedule
from tests.helpers import sentences_csv

WORDS = {
    "sports": (["The striker", "Our goalkeeper", "The home team", "The coach"],
               ["scored twice in the second half", "won the championship final", "broke the league record"]),
    "weather": (["A heavy storm", "The morning fog", "Strong winds", "Freezing rain"],
                ["is expected along the coast tonight", "closed the mountain roads", "will bring snow by Friday"]),
}


def topic_csv(path, n: int, seed: int = 0):
    return sentences_csv(path, WORDS, n, seed)


@pytest.mark.parametrize("n_train", [45, 108, 180, 450, 900])
def test_small_sets_get_enough_steps(n_train):
    schedule = plan_schedule(n_train, micro_batch=2, accumulation=None, epochs=None, max_steps=-1)
    assert schedule.steps_per_epoch >= min(MIN_STEPS_PER_EPOCH, n_train // 2)
    assert schedule.total_steps >= MIN_STEPS or schedule.epochs == MAX_AUTO_EPOCHS
    assert schedule.epochs >= 3 and schedule.accumulation <= 8


def test_large_sets_keep_the_plain_defaults():
    schedule = plan_schedule(5000, micro_batch=2, accumulation=None, epochs=None, max_steps=-1)
    assert (schedule.accumulation, schedule.epochs, schedule.notes) == (8, 3.0, ())


def test_explicit_values_are_never_changed():
    schedule = plan_schedule(40, micro_batch=2, accumulation=8, epochs=2.0, max_steps=-1)
    assert (schedule.accumulation, schedule.epochs, schedule.total_steps) == (8, 2.0, 6)
    assert schedule.notes == ()
    capped = plan_schedule(40, micro_batch=2, accumulation=None, epochs=None, max_steps=7)
    assert capped.total_steps == 7 and capped.epochs == 3.0  # max_steps decides the length


@pytest.mark.parametrize(("n_train", "micro", "processes"), [(30, 1, 2), (45, 1, 4), (70, 3, 2), (5000, 1, 3)])
def test_chosen_accumulation_splits_over_the_processes(n_train, micro, processes):
    schedule = plan_schedule(n_train, micro_batch=micro, accumulation=None, epochs=None, max_steps=-1,
                             processes=processes)
    assert (micro * schedule.accumulation) % processes == 0
    alone = plan_schedule(n_train, micro_batch=micro, accumulation=None, epochs=None, max_steps=-1)
    assert alone.accumulation <= schedule.accumulation < alone.accumulation + processes


def test_learning_check_by_task():
    better = {"eval_accuracy": 0.9, "initial": {"eval_accuracy": 0.5}}
    same = {"eval_accuracy": 0.5, "initial": {"eval_accuracy": 0.5}}
    worse_loss = {"eval_loss": 2.1, "initial": {"eval_loss": 2.0}}
    assert learning_check("classification", better)["improved"] is True
    assert learning_check("classification", same)["improved"] is False
    assert learning_check("chat", worse_loss) == {"metric": "loss", "before": 2.0, "after": 2.1, "improved": False}
    assert learning_check("chat", {"eval_loss": 1.0}) is None  # no evaluation before training
    assert no_improvement_warning("x", learning_check("classification", better)) is None
    assert "did not improve held-out accuracy" in no_improvement_warning("x", learning_check("classification", same))


def test_dry_run_shows_and_saves_the_small_set_schedule(cli, workspace, minilm):
    data = topic_csv(workspace / "topics.csv", 120)
    result = cli("train", "minilm", data, "classification", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    config = plan["config"]
    assert plan["total_steps"] >= MIN_STEPS
    assert config["gradient_accumulation_steps"] < 8 and config["num_train_epochs"] > 3
    assert config["head_learning_rate"] > config["learning_rate"]
    assert any("small data set" in note for note in plan["notes"])
    chosen = cli("train", "minilm", data, "classification", "--dry-run", "--json", "--epochs", "2",
                 "--grad-accum", "8", "--set", "head_learning_rate=0.002")
    config = json.loads(chosen.stdout)["config"]
    assert (config["num_train_epochs"], config["gradient_accumulation_steps"], config["head_learning_rate"]) == \
        (2.0, 8, 0.002)
    text = cli("train", "minilm", data, "classification", "--dry-run")
    assert "classifier head" in text.stdout and "epochs)" in text.stdout


@pytest.mark.slow
def test_defaults_learn_a_small_classification_set(cli, workspace, minilm):
    """50 rows at the defaults (only the quantization off, for speed): held-out accuracy must rise."""
    data = topic_csv(workspace / "topics.csv", 50, seed=1)
    result = cli("train", "minilm", data, "classification", "--name", "topics", "--no-4bit", "--json")
    assert result.exit_code == 0, result.output
    learning = json.loads(result.stdout)["learning"]
    assert learning["metric"] == "accuracy"
    assert learning["improved"] and learning["after"] >= 0.8, learning


def test_no_improvement_is_warned_recorded_and_listed(cli, workspace, minilm):
    data = topic_csv(workspace / "topics.csv", 40, seed=2)
    result = cli("train", "minilm", data, "classification", "--name", "stuck", "--no-4bit", "--max-steps", "1",
                 "--lr", "1e-9", "--set", "head_learning_rate=1e-9")
    assert result.exit_code == 0, result.output
    assert "WARNING: adapter 'stuck' did not improve held-out accuracy" in result.stderr
    manifest = json.loads((workspace / "adapters" / "stuck" / "lqmf.json").read_text())
    assert manifest["learning"]["improved"] is False
    rows = json.loads(cli("adapters", "list", "--json").stdout)
    assert rows[0]["improved"] is False
    assert "no gain" in cli("adapters", "list").stdout
