"""`lqmf tune` against hostile input (issue 20, item 5) and tuning that cannot lose to `lqmf train` (issue 22)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from lqmf.core import tune as spec
from lqmf.core.errors import InputError
from tests.helpers import EXAMPLES, lqmf_env, out_json, sentences_csv

FIXED = """
fixed:
  max_steps: 2
  eval_strategy: steps
  eval_steps: 1
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  max_seq_length: 128
  use_4bit_quantization: false
"""
NO_LEARNING_RATE = "space:\n  lora_r: [4, 8]\n" + FIXED
ONE_CHOICE = "space:\n  lora_r: [4]\n" + FIXED


def _tune(cli, model, name: str, space: str, workspace, *extra: str):
    (workspace / f"{name}.yaml").write_text(space)
    return cli("tune", model, EXAMPLES / "chat_training.csv", "chat", "--name", name, "--space", f"{name}.yaml",
               *extra)


def test_a_space_without_learning_rate_runs_and_a_repeated_set_is_not_run_again(cli, workspace, tiny_model):
    result = out_json(_tune(cli, tiny_model, "nolr", ONE_CHOICE, workspace, "--trials", "2", "--json"))
    states = [t["state"] for t in result["trials"]]
    # lora_r: [4] has one parameter set: trial 0 trains it, the sampler's later picks are the same set
    assert states[0] == "complete" and set(states[1:]) == {"same-as-earlier"}
    assert all(t["same_as"] == 0 for t in result["trials"][1:])
    assert not (workspace / "tune" / "nolr" / "trial-1").exists()
    config = json.loads((workspace / "tune" / "nolr" / "trial-0" / "trial.json").read_text())["config"]
    assert config["learning_rate"] == 2e-4  # the task's default, as `lqmf train` uses


MALFORMED = [
    "space: [1, 2]", "space: 5", "fixed: [max_steps]", "fixed: {max_steps: many}", "pruner: 3",
    "pruner: {startup_trials: two}", "pruner: {startup_trials: -1}", "pruner: {warmup: 1}",
    "first_trials: {lora_r: 4}", "space: {lora_r: [4]}\nfirst_trials: [{lora_r: 5}]",
    "space: {lora_r: [4]}\nfirst_trials: [[4]]", "space: {lora_r: [[4, 8]]}", "space: {lora_r: [{a: 1}]}",
    "space: {lora_r: {low: a, high: 8}}", "space: {lora_r: {low: 4, high: .nan}}",
    "space: {lora_dropout: {low: 0, high: .inf}}", "space: {lora_r: {low: null, high: 8}}",
    "space: {lora_r: {low: true, high: 8}}", "space: {lora_r: {low: 4, high: 8, log: maybe}}",
    "space: {target_modules: {low: 1, high: 2}}", "space: {use_4bit_quantization: {low: 0, high: 1}}",
    "space: {1: [4]}", "space: {task_type: [chat, classification]}", "space: {lora_r: []}", "{", "- a\n- b",
    "space: {learning_rate: {low: 0, high: 1, log: true}}", "space: {lora_r: [4, 0]}",
    "space: {lora_r: {low: 4.5, high: 8}}", "7: 1", "space: {lora_r: 4}", "fixed: {1: 2}",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_space_files_get_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        spec.load_space(path, "chat")
    assert str(path) in caught.value.message and "\n" not in caught.value.message


def test_a_space_file_not_utf8_is_named(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"space: {lora_r: [\xff]}")
    with pytest.raises(InputError, match="not UTF-8"):
        spec.load_space(path, "chat")


def _damaged_databases(folder, good_db) -> dict[str, callable]:
    def garbage(path):
        path.write_bytes(b"\x00not sqlite at all" * 100)

    def empty(path):
        path.write_bytes(b"")

    def truncated(path):
        path.write_bytes(good_db[: len(good_db) // 3])

    def foreign(path):
        with sqlite3.connect(path) as db:
            db.execute("create table studies (x text)")

    def settings_damaged(path):
        path.write_bytes(good_db)
        with sqlite3.connect(path) as db:
            db.execute("update study_user_attributes set value_json = '{\"values\": 3}'")

    def settings_not_json(path):
        path.write_bytes(good_db)
        with sqlite3.connect(path) as db:
            db.execute("update study_user_attributes set value_json = '{{{'")

    return {f.__name__: f for f in (garbage, empty, truncated, foreign, settings_damaged, settings_not_json)}


def test_damaged_study_files_get_one_line_naming_the_file(cli, workspace, tiny_model):
    out_json(_tune(cli, tiny_model, "good", NO_LEARNING_RATE, workspace, "--trials", "1", "--json"))
    db = workspace / "tune" / "good" / "study.db"
    good = db.read_bytes()
    for what, damage in _damaged_databases(db.parent, good).items():
        db.unlink()
        damage(db)
        for args in (["tune", "--resume", "good", "--trials", "1"],
                     ["tune", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "good", "--space",
                      "good.yaml", "--trials", "1"]):
            result = cli(*args)
            if what == "empty" and "--resume" not in args:  # a start that never stored a study: replaced
                assert result.exit_code == 0, result.output
                damage(db)
                continue
            assert result.exit_code in (2, 3, 4), (what, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and str(db) in lines[0] and "Traceback" not in result.output, (what, lines)


def test_a_second_fresh_start_of_one_name_is_refused_at_once(cli, workspace, tiny_model):
    lock = workspace / "tune" / ".busy.lock"
    lock.parent.mkdir()
    hold = f"held = FileLock({str(lock)!r}); held.acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; " + hold],
                              stdout=subprocess.PIPE, text=True, env=lqmf_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = _tune(cli, tiny_model, "busy", NO_LEARNING_RATE, workspace, "--trials", "1")
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 4 and result.stderr.strip().splitlines() == [
        f"error: another lqmf tune is starting study 'busy' (it holds {lock}); when it has started, "
        "--resume busy joins it"]
    assert not (workspace / "tune" / "busy").exists()


def test_a_failed_start_leaves_nothing_that_blocks_the_retry(cli, workspace, tiny_model):
    import optuna

    tiny_set = workspace / "two.csv"
    tiny_set.write_text("input,output\nhi,hello\nbye,goodbye\n")
    (workspace / "s.yaml").write_text(NO_LEARNING_RATE)
    failed = cli("tune", tiny_model, tiny_set, "chat", "--name", "retry", "--space", "s.yaml", "--trials", "1")
    assert failed.exit_code == 2 and "too few examples" in failed.stderr
    assert not (workspace / "tune" / "retry").exists()
    # a start killed before its settings were stored leaves a study.db without them: not a study to keep
    folder = workspace / "tune" / "retry"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="retry", storage=spec.storage_url(folder))
    result = out_json(_tune(cli, tiny_model, "retry", NO_LEARNING_RATE, workspace, "--trials", "1", "--json"))
    assert [t["state"] for t in result["trials"]] == ["complete"]


def test_a_killed_trial_is_marked_failed_on_resume(cli, workspace, tiny_model):
    import optuna

    from lqmf.core.fsutil import owner_tag
    from lqmf.engine.train import tune as engine

    out_json(_tune(cli, tiny_model, "stale", NO_LEARNING_RATE, workspace, "--trials", "1", "--json"))
    storage = spec.storage_url(workspace / "tune" / "stale")
    dead = subprocess.run([sys.executable, "-c", "import socket; from lqmf.core.fsutil import owner_tag; "
                           "print(socket.gethostname() + ':' + owner_tag())"],
                          capture_output=True, text=True, env=lqmf_env(), check=True).stdout.strip()
    study = optuna.load_study(study_name="stale", storage=storage)
    killed = study.ask()
    killed.suggest_categorical("lora_r", [4, 8])
    killed.set_user_attr(engine.OWNER_ATTR, dead)
    alive = study.ask()  # still running in this (live) process: left alone
    alive.set_user_attr(engine.OWNER_ATTR, f"{__import__('socket').gethostname()}:{owner_tag()}")
    resumed = out_json(cli("tune", "--resume", "stale", "--trials", "1", "--json"))
    states = {t["number"]: t["state"] for t in resumed["trials"]}
    assert states[killed.number] == "fail" and states[alive.number] == "running"


SAMPLE = """
import json, sys
from pathlib import Path
from lqmf.core.workspace import Workspace
from lqmf.engine.train.tune import open_stored_study, suggest
study, request = open_stored_study(Workspace(Path(sys.argv[1])), "pair")
trial = study.ask()
print(json.dumps({k: suggest(trial, k, c) for k, c in request.space.params.items()}))
"""


def test_two_resuming_processes_sample_different_parameters(cli, workspace, tiny_model):
    space = NO_LEARNING_RATE.replace("lora_r: [4, 8]", "learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}")
    out_json(_tune(cli, tiny_model, "pair", space, workspace, "--trials", "1", "--json"))
    runs = [subprocess.Popen([sys.executable, "-c", SAMPLE, str(workspace)], stdout=subprocess.PIPE, text=True,
                             env=lqmf_env()) for _ in range(2)]
    picks = [json.loads(run.communicate(timeout=120)[0]) for run in runs]
    assert picks[0] != picks[1]


TOPICS = {
    "sports": (["The striker", "Our goalkeeper", "The home team", "The coach"],
               ["scored twice in the second half", "won the championship final", "broke the league record"]),
    "weather": (["A heavy storm", "The morning fog", "Strong winds", "Freezing rain"],
                ["is expected along the coast tonight", "closed the mountain roads", "will bring snow by Friday"]),
    "cooking": (["The chef", "My grandmother", "This recipe", "The bakery"],
                ["simmers the sauce for an hour", "kneads the dough by hand", "adds fresh basil at the end"]),
}


def three_class_csv(path, n: int = 36, seed: int = 3):
    return sentences_csv(path, TOPICS, n, seed)


@pytest.mark.slow
def test_tune_keep_best_is_never_worse_than_train(cli, workspace, minilm):
    """On a 3-class set at the defaults: trial 0 is `lqmf train`'s run, so the kept adapter is at least as good."""
    data = three_class_csv(workspace / "topics3.csv")
    trained = out_json(cli("train", "minilm", data, "classification", "--name", "plain", "--no-4bit", "--json"))
    tuned = out_json(cli("tune", "minilm", data, "classification", "--name", "tuned", "--trials", "3",
                         "--keep-best", "--set", "use_4bit_quantization=false", "--json"))
    first = tuned["trials"][0]
    assert first["defaults"] and first["state"] == "complete" and tuned["metric"] == "accuracy"
    assert tuned["trials"][0]["value"] == pytest.approx(trained["metrics"]["eval_accuracy"])
    kept = json.loads((workspace / "adapters" / "tuned" / "lqmf.json").read_text())["metrics"]
    assert kept["eval_accuracy"] >= trained["metrics"]["eval_accuracy"]
    if tuned["best"]["number"] == 0:
        assert tuned["kept_defaults"]
