"""Issue 22's cases, one test each: what a new user following the guide hit (cases numbered as in the issue)."""

from __future__ import annotations

import json

from tests.conftest import EXAMPLES
from tests.test_train import FAST, manifest


def _evals(workspace, name: str) -> list[dict]:
    log = workspace / "adapters" / name / "metrics.jsonl"
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "eval"]


def test_3_a_run_cut_between_evaluations_evaluates_its_final_weights(cli, workspace, tiny_model):
    result = cli("train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "cut", "--max-steps", "3",
                 "--no-4bit", "--set", "eval_strategy=steps", "--set", "eval_steps=2", *FAST)
    assert result.exit_code == 0, result.output
    evals = _evals(workspace, "cut")
    assert [r["step"] for r in evals] == [0, 2, 3]  # before training, every 2 steps, and the shipped weights
    assert manifest(workspace, "cut")["metrics"]["eval_loss"] == evals[-1]["eval_loss"]


def test_11_resume_below_the_checkpoint_step_is_refused(workspace, tiny_model, run_lqmf):
    args = ["train", tiny_model, EXAMPLES / "chat_training.csv", "chat", "--name", "over", "--max-steps", "3",
            "--no-4bit", *FAST]
    killed = run_lqmf(*args, cwd=workspace, env={"LQMF_FAULT_AT": "train.final_checkpoint"})
    assert killed.returncode != 0 and (workspace / "adapters" / ".staging-over" / "checkpoint").is_dir()
    refused = run_lqmf("train", "--resume", "over", "--max-steps", "2", cwd=workspace)
    assert refused.returncode == 2, refused.stderr
    assert "is at step 3, past this run's 2 steps" in refused.stderr and "Traceback" not in refused.stderr
    assert (workspace / "adapters" / ".staging-over" / "checkpoint").is_dir()  # nothing lost: resume still works
    finished = run_lqmf("train", "--resume", "over", cwd=workspace)
    assert finished.returncode == 0, finished.stderr
    assert manifest(workspace, "over")["metrics"]["steps"] == 3


