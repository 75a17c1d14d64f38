"""Training under faults: kills at every danger point, stop signals, planted checkpoints."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lqmf.core.faults import POINTS
from tests.helpers import STEPS, finished_ok, run_forked, start_forked, train_args, train_steps_logged

# (point, what a kill there must leave): "resumable" continues from a checkpoint, "restart" has none
# yet (resume says it starts from step 0), "finished" is the adapter in place.
TRAIN_POINTS = [
    ("checkpoint.written", "restart"),
    ("checkpoint.written#2", "resumable"),
    ("checkpoint.moved_aside", "resumable"),
    ("checkpoint.replaced#2", "resumable"),
    ("train.final_checkpoint", "resumable"),
    ("train.adapter_saved", "resumable"),
    ("finalize.manifest_written", "resumable"),
    ("finalize.renamed", "finished"),
]


def _check_resume(workspace, tiny_model, expected: str, steps: int = STEPS) -> None:
    staging = workspace / "adapters" / ".staging-run"
    if expected == "finished":
        assert finished_ok(workspace, "run") and not staging.exists()
        return
    assert staging.is_dir() and not (workspace / "adapters" / "run").exists()
    resumed = run_forked(["train", "--resume", "run", "--max-steps", str(steps)], workspace)
    assert resumed.returncode == 0, resumed.stderr
    said = "starting again from step 0" if expected == "restart" else "resumed from step"
    assert said in resumed.stderr, resumed.stderr
    assert finished_ok(workspace, "run")
    assert train_steps_logged(workspace / "adapters" / "run") == list(range(1, steps + 1))


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize(("point", "expected"), TRAIN_POINTS, ids=[p for p, _ in TRAIN_POINTS])
def test_kill_during_training(workspace, tiny_model, point, expected, signame):
    assert point.split("#")[0] in POINTS
    run = run_forked(train_args(tiny_model), workspace, fault=f"{point}:{signame}")
    if signame == "SIGKILL":
        assert run.returncode == -signal.SIGKILL, run.stderr
    elif point.startswith("checkpoint.") and expected != "restart":
        line = run.assert_clean_error(143)  # the loop finishes the step, checkpoints, and stops
        assert "terminated after step 2/3" in line and "--resume run" in line
    else:
        run.assert_clean_error(143)
    if signame == "SIGTERM" and expected == "restart":
        expected = "resumable"  # SIGTERM in step 1 still finishes step 1 and checkpoints it
    _check_resume(workspace, tiny_model, expected)


def test_force_rerun_killed_while_replacing(workspace, tiny_model):
    assert run_forked(train_args(tiny_model), workspace).returncode == 0
    killed = run_forked(train_args(tiny_model, "run", "--force"), workspace, fault="finalize.old_trashed")
    assert killed.killed
    _check_resume(workspace, tiny_model, "resumable")


class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_planted_pickle(workspace, tiny_model):
    """Regression: --resume unpickled training_state.pt (weights_only=False), running its code."""
    assert run_forked(train_args(tiny_model), workspace, fault="train.adapter_saved").killed
    state = workspace / "adapters" / ".staging-run" / "checkpoint" / "training_state.pt"
    marker = workspace.parent / "code-ran"
    import torch

    torch.save({"optimizer": {}, "scheduler": {}, "progress": _Planted(str(marker)), "rng": {}}, state)
    with open(state, "rb") as handle:
        assert b"system" in handle.read()  # the file really holds the call
    refused = run_forked(["train", "--resume", "run"], workspace)
    line = refused.assert_clean_error(2)
    assert "training_state.pt" in line and "refused" in line
    assert not marker.exists(), "the planted pickle ran code"


def test_second_ctrl_c_stops_at_once_without_traceback(workspace, tiny_model):
    child = start_forked(train_args(tiny_model, "run", "--max-steps", "400"), workspace)
    log = workspace / "adapters" / ".staging-run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count('"train"') >= 2):
        time.sleep(0.05)
    while child.running():  # Ctrl-C, again and again, until it stops: often enough that the second one
        os.kill(child.pid, signal.SIGINT)  # lands while the first one's checkpoint is being saved (a tiny
        time.sleep(0.002)  # model's takes a few ms: at 20 ms apart, CI once saw the graceful stop finish first)
    run = child.wait(120)
    line = run.assert_clean_error(130)
    assert "stopped at once" in line
    _check_resume(workspace, tiny_model, "resumable", steps=8)


def test_failure_after_loading_leaves_no_unfinished_run(cli, workspace, tiny_model):
    """Regression: an error found after the model loaded left .staging-NAME, blocking the next run."""
    failed = cli(*train_args(tiny_model, "run", "--set", "target_modules=no_such_proj", "-q"))
    assert failed.exit_code == 5 and "no_such_proj" in failed.output
    assert not (workspace / "adapters" / ".staging-run").exists()
    again = cli(*train_args(tiny_model, "run", "-q"))
    assert again.exit_code == 0, again.output
