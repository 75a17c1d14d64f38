"""The dry run's time estimate, measured on this machine: a few real optimizer steps of the run, timed.

A FLOP count at an assumed throughput misses what dominates small models on a CPU (per-layer
overhead, the optimizer, evaluation), so where the model is local and small enough to load in
seconds, `lqmf train --dry-run` trains PROBE_STEPS steps into a temporary folder and scales their
time to the whole run: starting (imports), loading, every step, and every evaluation the run will make.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lqmf.core.config import TrainConfig
from lqmf.core.datasets import TaskDataset
from lqmf.core.fsutil import process_started
from lqmf.core.memory_plan import approx_parameters
from lqmf.core.models import ResolvedModel
from lqmf.core.progress import phase
from lqmf.engine.train import loop as trainer
from lqmf.engine.train import recipe

PROBE_ENV = "LQMF_DRY_RUN_PROBE"  # "0": no timed steps, the FLOP estimate (the test suite's default)
PROBE_STEPS = 6  # the first step warms up; the others are timed
PROBE_MAX_PARAMETERS = 400_000_000  # larger models take too long to load for a dry run: FLOP estimate
FORWARD_SHARE = 0.5  # an evaluation pass costs about half a training pass (no backward)


class _StepTimes(trainer.Events):
    def __init__(self) -> None:
        self.elapsed: list[float] = []
        self.planned = 0.0  # when the loop was about to start

    def on_plan(self, plan: dict[str, Any]) -> None:
        self.planned = time.perf_counter()

    def on_step(self, record: dict[str, Any]) -> None:
        self.elapsed.append(record["elapsed_s"])


def evaluations(config: TrainConfig, prepared: trainer.Prepared) -> int:
    """How many held-out evaluations the run makes (before training, by its strategy, and at the end)."""
    if not prepared.validation or config.eval_strategy == "no":
        return 0
    total = prepared.total_steps
    periodic = (total // config.eval_steps if config.eval_strategy == "steps" and config.eval_steps
                else total // prepared.steps_per_epoch)
    final = 0 if periodic and (total % (config.eval_steps or prepared.steps_per_epoch) == 0) else 1
    return int(config.eval_at_start) + periodic + final


def measured_seconds(config: TrainConfig, model_ref: ResolvedModel, dataset: TaskDataset,
                     prepared: trainer.Prepared) -> dict[str, Any] | None:
    """{"seconds", "seconds_per_step", "setup_seconds", "source"} from timing PROBE_STEPS real steps, or
    None when the model is not local, too large to load for a dry run, or $LQMF_DRY_RUN_PROBE is 0."""
    parameters = approx_parameters(model_ref.config) if model_ref.available else None
    too_large = parameters is None or parameters > PROBE_MAX_PARAMETERS
    if os.environ.get(PROBE_ENV, "1") == "0" or too_large or prepared.total_steps < 1:
        return None
    started_process = process_started(os.getpid())
    startup = time.time() - started_process if started_process else 0.0  # imports, as the real run makes
    phase(f"timing {PROBE_STEPS} training steps on this machine for the time estimate")
    probe = dataclasses.replace(config, max_steps=PROBE_STEPS, eval_strategy="no", eval_at_start=False,
                                save_steps=0, logging_steps=1)
    started = time.perf_counter()
    probe_prepared = trainer.prepare(probe, model_ref, dataset)
    memory = trainer.plan_memory(probe, model_ref, probe_prepared)
    times = _StepTimes()
    with tempfile.TemporaryDirectory(prefix="lqmf-estimate-") as staging:
        recipe.train(probe, model_ref, dataset, Path(staging), prepared=probe_prepared, memory=memory,
                      events=times)
    # what the last step's checkpoint and the adapter's save took: the run checkpoints at each epoch's end
    checkpoint = max(0.0, time.perf_counter() - times.planned - times.elapsed[-1])
    if len(times.elapsed) < 2:
        return None
    per_step = (times.elapsed[-1] - times.elapsed[0]) / (len(times.elapsed) - 1)
    setup = times.planned - started  # tokenizing and loading, as the run will
    per_example = per_step / prepared.effective_batch
    evaluation = FORWARD_SHARE * per_example * len(prepared.validation)
    checkpoints = math.ceil(prepared.total_steps / prepared.steps_per_epoch) + (
        prepared.total_steps // config.save_steps if config.save_steps else 0)
    seconds = (startup + setup + prepared.total_steps * per_step + evaluations(config, prepared) * evaluation
               + checkpoints * checkpoint)
    return {"seconds": round(seconds, 1), "seconds_per_step": round(per_step, 4),
            "setup_seconds": round(startup + setup, 2),
            "source": f"{len(times.elapsed)} training steps timed on this machine"}
