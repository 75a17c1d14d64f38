"""The training use case: one resolved config in, one registered adapter out.

`lqmf train`, every rank of a multi-GPU run and Python callers (`from lqmf import train`) all go
through `train()`: resume and conflict checks, data preparation, the memory plan, the run lock,
the staging folder, the recipe (engine/train/recipe.py), the manifest and the atomic rename into
adapters/NAME. With `gpus` above one, `train()` launches itself once per GPU
(engine/train/distributed.py) and returns rank 0's result; in a rank, rank 0 alone takes the lock and
writes; the others wait for its word.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core.datasets import TaskDataset, load_task_dataset
from lqmf.core.distributed import Topology, requested_gpus
from lqmf.core.errors import ConflictError, InputError, Interrupted, LqmfError, NotFoundError, RankFailure
from lqmf.core.fsutil import atomic_write_text, process_started
from lqmf.core.manifest import build_manifest, default_adapter_name
from lqmf.core.memory_plan import approx_parameters
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.progress import phase
from lqmf.core.registry import Registry
from lqmf.core.timing import estimate_train_seconds
from lqmf.core.workspace import Workspace

STAGED_CONFIG = "config.yaml"


@dataclass
class TrainResult:
    """What a run made (or, for a dry run, would make)."""

    adapter: str
    task: str
    path: Path | None = None  # adapters/NAME; None for a dry run
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # the dry run's plan
    learning: dict[str, Any] = field(default_factory=dict)  # did the held-out metric improve (manifest)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "path": str(self.path) if self.path else None, "task": self.task,
                "metrics": self.metrics, "learning": self.learning, "runtime": self.runtime,
                "resumed_from_step": self.runtime.get("resumed_from_step")}


def resolve_config(workspace: Workspace, values: dict[str, Any], *, resume: str | None = None,
                   config_name: str | None = None) -> cfg.TrainConfig:
    """Defaults < the saved config (or, resuming, the run's staged one) < values (checked keys)."""
    registry = Registry(workspace)
    if resume:
        staging = registry.staging_path(resume)
        if not (staging / STAGED_CONFIG).is_file():
            raise NotFoundError(f"no unfinished run named '{resume}' in {workspace.adapters_dir}")
        file_values = cfg.read_config_file(staging / STAGED_CONFIG)
    else:
        file_values = cfg.read_config_file(cfg.config_path(workspace.configs_dir, config_name)) if config_name else {}
    checked = {k: cfg.coerce_value(k, v, "the TASK argument" if k == "task_type" else f"option for {k}")
               for k, v in values.items() if v is not None}
    config = cfg.resolve_config(file_values, checked)
    cfg.check_complete(config)
    return config


def train(config: cfg.TrainConfig | dict[str, Any], workspace: str | Path | Workspace | None = None, *,
          resume: bool = False, force: bool = False, dry_run: bool = False, events: Any = None,
          loaded: Any = None, rank_entry: str | None = None) -> TrainResult:
    """Train a LoRA/QLoRA adapter and register it; returns its metrics.

    config: a TrainConfig, or a dict of its keys (base_model, dataset_path, task_type at least).
    resume: continue the unfinished run config.job_name names. events: an engine.train.Events.
    loaded: a LoadedModel the caller already holds (engine.train.setup_model), trained in place.
    With gpus > 1 (or "all") the run launches one process per GPU, each `python -m rank_entry` (the
    caller's module that runs `run_launch_request`, as the CLI's rank module does), and
    this call waits for them.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    if isinstance(config, dict):
        config = resolve_config(ws, config, resume=config.get("job_name") if resume else None)
    return TrainingRun(config, ws, resume=resume, force=force, events=events,
                       rank_entry=rank_entry).run(dry_run=dry_run, loaded=loaded)


class TrainingRun:
    """One run's decisions, from the resolved config to the registered adapter."""

    def __init__(self, config: cfg.TrainConfig, workspace: Workspace, *, resume: bool = False,
                 force: bool = False, events: Any = None, rank_entry: str | None = None):
        self.config, self.workspace, self.resume, self.force = config, workspace, resume, force
        self.events, self.rank_entry = events, rank_entry
        self.registry = Registry(workspace)
        self.model: ResolvedModel = ModelCatalogue(workspace).resolve(config.base_model)
        self.data: TaskDataset = load_task_dataset(workspace.resolve_path(config.dataset_path), config.task_type)
        config.dataset_path = str(self.data.path)
        config.job_name = config.job_name or default_adapter_name(
            self.model, self.data.task, self.data.sha256,
            lambda name: self.registry.exists(name) or self.registry.staging_path(name).exists())
        self.adapter = config.job_name
        self.staging = self.registry.staging_path(self.adapter)
        self.topology = Topology.from_environment()

    def check_conflicts(self, dry_run: bool) -> None:
        if self.resume:
            return
        if self.registry.exists(self.adapter) and not self.force:
            raise ConflictError(f"adapter '{self.adapter}' already exists; use --force to replace it or --name")
        if self.staging.exists() and not self.force and not dry_run:
            raise ConflictError(f"an unfinished run of '{self.adapter}' exists; use --resume {self.adapter} or --force")

    def run(self, dry_run: bool = False, loaded: Any = None) -> TrainResult:
        from lqmf.engine.loading import visible_gpus
        from lqmf.engine.train import loop as engine

        if self.topology.distributed:
            return self.run_rank(loaded)
        gpus = 1
        if self.config.gpus is not None:  # one GPU means one GPU: without the setting, one device
            gpus = requested_gpus(self.config.gpus, 0 if self.config.device == "cpu" else visible_gpus(),
                                  self.config.device)
        self.check_conflicts(dry_run)
        if gpus > 1 and loaded is not None:
            raise InputError(f"gpus={self.config.gpus}: a model loaded by the caller trains in its own process only; "
                             "leave gpus unset")
        if gpus > 1 and not dry_run and self.rank_entry is None:
            raise InputError(f"gpus={self.config.gpus}: this caller gives no entry module for the ranks; "
                             "train through `lqmf train` or `lqmf.train`")
        if gpus > 1 and not dry_run:
            return self.launch(gpus)  # the ranks prepare and plan; rank 0's plan holds for all
        prepared = engine.prepare(self.config, self.model, self.data, gpus)
        memory = engine.plan_memory(self.config, self.model, prepared, gpus)
        if dry_run:
            return self.plan_only(prepared, memory)
        from lqmf.engine.train.distributed import Collective

        return self.execute(prepared, memory, Collective(), loaded)

    def plan_only(self, prepared, memory) -> TrainResult:
        """The dry run's answer: what the run would do, nothing trained."""
        measured = measured_seconds(self.config, self.model, self.data, prepared) if prepared.world_size == 1 \
            else None
        estimate = {"this machine": measured["seconds"]} if measured else estimate_train_seconds(
            self.model.config, prepared.train_tokens * prepared.total_steps / prepared.steps_per_epoch,
            self.config.use_gradient_checkpointing)
        plan = {"adapter": self.adapter, "dry_run": True, "task": self.data.task, "base_model": self.model.reference,
                "model_source": self.model.source, "dataset": str(self.data.path), **prepared.plan(),
                "label_counts": self.data.label_counts or None, "estimated_seconds": estimate,
                "estimate": measured or {"source": "FLOP count at assumed throughputs (model not local, or too "
                                                   "large to time steps of in a dry run)"},
                "memory": memory.to_dict(), "config": self.config.to_dict()}
        return TrainResult(self.adapter, self.data.task, plan=plan)

    def launch(self, gpus: int) -> TrainResult:
        """One process per GPU, each running this service; rank 0's result."""
        from lqmf.engine.train.distributed import launch

        quiet = getattr(self.events, "quiet", self.events is None)
        result = launch(gpus, {"workspace": str(self.workspace.root), "config": self.config.to_dict(),
                               "resume": self.resume, "force": self.force, "quiet": quiet},
                        "cpu" if self.config.device == "cpu" else "cuda", self.rank_entry)
        return TrainResult(result["adapter"], result["task"], Path(result["path"]), result["metrics"],
                           result["runtime"], learning=result["learning"])

    def run_rank(self, loaded: Any = None) -> TrainResult:
        """This process is one rank of several: plan with rank 0's word, then run together."""
        from lqmf.engine.train import loop as engine
        from lqmf.engine.train.distributed import Collective

        collective = Collective(self.topology, "cpu" if self.config.device == "cpu" else "cuda")
        try:
            prepared = engine.prepare(self.config, self.model, self.data, self.topology.world_size)
            memory = engine.plan_memory(self.config, self.model, prepared, self.topology.world_size)
            memory, prepared.micro_batch, prepared.accumulation = collective.from_main(
                (memory, prepared.micro_batch, prepared.accumulation))
            return self.execute(prepared, memory, collective, loaded)
        finally:
            collective.close()

    def execute(self, prepared, memory, collective, loaded: Any = None) -> TrainResult:
        """Lock, staging, the recipe, manifest and finalize: rank 0 (or the one process) writes."""
        from lqmf.engine.train import loop as engine
        from lqmf.engine.train.recipe import Recipe

        with ExitStack() as stack:
            refusal = None
            if collective.is_main:
                try:  # While the run lock is held, `adapters list` shows the run as training.
                    stack.enter_context(self.registry.training_run(self.adapter, wait=5.0))
                    stack.enter_context(terminate_as_interrupt())
                    self.check_conflicts(dry_run=False)  # again, now under the lock (and for ranks launched by others)
                    if self.resume:  # before the staged config takes this run's settings
                        engine.check_resumable(self.staging, prepared.total_steps, self.config.max_steps)
                    self.open_staging()
                except LqmfError as err:
                    refusal = err
            word = collective.from_main((refusal.message, refusal.exit_code) if refusal else None)
            if refusal:
                raise refusal
            if word:
                raise RankFailure(word[0], exit_code=word[1])
            try:
                recipe = Recipe(self.config, self.model, self.data, self.staging, prepared=prepared, memory=memory,
                                events=self.events, resume=self.resume, collective=collective)
                outcome = recipe.run(loaded)
                target, runtime, learning = None, outcome.runtime, {}
                if collective.is_main:
                    manifest = build_manifest(self.adapter, self.config, self.model, self.data, prepared.plan(),
                                              outcome.metrics, outcome.runtime)
                    runtime, learning = manifest["runtime"], manifest["learning"]
                    target = self.registry.finalize(self.adapter, self.staging, manifest,
                                                    force=self.force or self.resume, scratch=engine.CHECKPOINT_FOLDERS)
            except BaseException:
                if collective.is_main and not engine.has_checkpoint(self.staging):
                    shutil.rmtree(self.staging, ignore_errors=True)  # nothing to resume: no unfinished run left
                raise
        collective.barrier()
        return TrainResult(self.adapter, self.data.task, target, outcome.metrics, runtime, learning=learning)

    def open_staging(self) -> None:
        if not self.resume and self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.staging / STAGED_CONFIG, cfg.dump_config(self.config))


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM before or after the training loop stops the run as Ctrl-C does (exit 143, one line);
    inside the loop the engine's StopFlag takes over and checkpoints first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted("terminated (SIGTERM)", exit_code=128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_launch_request(path: str | Path, events: Any) -> None:
    """A rank started by engine.distributed.launch: run the request. Rank 0 writes its result (or its
    error) where the launcher reads it; another rank raises its own failures, naming itself."""
    from lqmf.engine.loading import first_line
    from lqmf.engine.train.distributed import use_launcher_console

    use_launcher_console()
    request = json.loads(Path(path).read_text())
    topology = Topology.from_environment()
    try:
        config = cfg.resolve_config({}, {k: cfg.coerce_value(k, v, "launch request")
                                         for k, v in request["config"].items()})
        answer: dict[str, Any] = train(config, request["workspace"], resume=request["resume"],
                                       force=request["force"], events=events).to_dict()
    except RankFailure:
        raise
    except LqmfError as err:
        if not topology.is_main:
            raise type(err)(f"rank {topology.rank}: {err.message}", exit_code=err.exit_code) from None
        answer = {"error": err.message, "exit_code": err.exit_code}
    except Exception as err:  # noqa: BLE001 - reported through the launcher as one line
        if not topology.is_main:
            raise
        answer = {"error": f"{type(err).__name__}: {first_line(err)}", "exit_code": 1}
    if topology.is_main:
        atomic_write_text(Path(request["result_path"]), json.dumps(answer))


# ----------------------------------------------------------------------------- the dry run's time estimate
# Measured on this machine: a FLOP count at an assumed throughput misses what dominates small models on a
# CPU (per-layer overhead, the optimizer, evaluation), so where the model is local and small enough to load
# in seconds, the dry run trains PROBE_STEPS steps into a temporary folder and scales their time to the
# whole run: starting (imports), loading, every step, every evaluation and checkpoint the run will make.

PROBE_ENV = "LQMF_DRY_RUN_PROBE"  # "0": no timed steps, the FLOP estimate (the test suite's default)
PROBE_STEPS = 6  # the first step warms up; the others are timed
PROBE_MAX_PARAMETERS = 400_000_000  # larger models take too long to load for a dry run: FLOP estimate
FORWARD_SHARE = 0.5  # an evaluation pass costs about half a training pass (no backward)


def evaluations(config: cfg.TrainConfig, prepared: Any) -> int:
    """How many held-out evaluations the run makes (before training, by its strategy, and at the end)."""
    if not prepared.validation or config.eval_strategy == "no":
        return 0
    total = prepared.total_steps
    periodic = (total // config.eval_steps if config.eval_strategy == "steps" and config.eval_steps
                else total // prepared.steps_per_epoch)
    final = 0 if periodic and (total % (config.eval_steps or prepared.steps_per_epoch) == 0) else 1
    return int(config.eval_at_start) + periodic + final


def measured_seconds(config: cfg.TrainConfig, model_ref: ResolvedModel, dataset: TaskDataset,
                     prepared: Any) -> dict[str, Any] | None:
    """{"seconds", "seconds_per_step", "setup_seconds", "source"} from timing PROBE_STEPS real steps, or
    None when the model is not local, too large to load for a dry run, or $LQMF_DRY_RUN_PROBE is 0."""
    parameters = approx_parameters(model_ref.config) if model_ref.available else None
    too_large = parameters is None or parameters > PROBE_MAX_PARAMETERS
    if os.environ.get(PROBE_ENV, "1") == "0" or too_large or prepared.total_steps < 1:
        return None
    started_process = process_started(os.getpid())
    startup = time.time() - started_process if started_process else 0.0  # imports, as the real run makes
    from lqmf.engine.train import loop as trainer
    from lqmf.engine.train import recipe

    class StepTimes(trainer.Events):
        def __init__(self) -> None:
            self.elapsed: list[float] = []
            self.planned = 0.0  # when the loop was about to start

        def on_plan(self, plan: dict[str, Any]) -> None:
            self.planned = time.perf_counter()

        def on_step(self, record: dict[str, Any]) -> None:
            self.elapsed.append(record["elapsed_s"])

    phase(f"timing {PROBE_STEPS} training steps on this machine for the time estimate")
    probe = dataclasses.replace(config, max_steps=PROBE_STEPS, eval_strategy="no", eval_at_start=False,
                                save_steps=0, logging_steps=1)
    started = time.perf_counter()
    probe_prepared = trainer.prepare(probe, model_ref, dataset)
    memory = trainer.plan_memory(probe, model_ref, probe_prepared)
    times = StepTimes()
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
