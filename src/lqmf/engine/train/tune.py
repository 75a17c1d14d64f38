"""`lqmf tune`: an Optuna study over training configs, on one base model loaded once.

setup (study in tune/NAME/study.db, base loaded once) -> for each trial: wrap the base with a fresh
LoRA, train into tune/NAME/trial-K/, report each evaluation to the pruner, unload the LoRA -> save
the best config as configs/NAME-best.yaml, and with keep_best register the best trial's adapter.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core import tune as spec
from lqmf.core.datasets import TaskDataset, load_task_dataset
from lqmf.core.derived import Gate
from lqmf.core.errors import ConflictError, InputError, LqmfError, NotFoundError, RuntimeFailure
from lqmf.core.fsutil import atomic_write_json, atomic_write_text
from lqmf.core.manifest import build_manifest
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.registry import MANIFEST, Registry
from lqmf.core.workspace import Workspace
from lqmf.engine.loading import CLASSIFIER_HEADS, LoadedModel
from lqmf.engine.train import loop as trainer
from lqmf.engine.train import recipe

SETTINGS_ATTR = "lqmf_settings"


@dataclass
class TuneRequest:
    """What a study tunes: the config values every trial shares, the space, the metric."""

    name: str
    values: dict[str, Any]  # resolved config values (file < options < --set), before each trial's params
    space: spec.SearchSpace
    metric: str = "loss"

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "space": self.space.to_dict(), "metric": self.metric}


def _divergence_pruner(startup_trials: int, warmup_steps: int):
    """Median pruning, and any trial whose metric is no longer a finite number (a diverging learning rate)."""
    import optuna

    class DivergenceOrMedianPruner(optuna.pruners.BasePruner):
        def __init__(self) -> None:
            self.median = optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)

        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is not None and not math.isfinite(trial.intermediate_values[step]):
                return True
            return self.median.prune(study, trial)

    return DivergenceOrMedianPruner()


def open_study(workspace: Workspace, request: TuneRequest | None, name: str, resume: bool, force: bool):
    """(study, request): a new study for request, or (resume) the stored one with its stored settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = spec.study_dir(workspace, name)
    exists = (folder / spec.STUDY_FILE).is_file()
    if resume and not exists:
        raise NotFoundError(f"no study named '{name}' in {folder.parent}")
    if exists and not resume:
        if not force:
            raise ConflictError(f"a study named '{name}' exists ({folder}); --resume {name} continues it, "
                                "--force starts over")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(spec.storage_url(folder), engine_kwargs={"connect_args": {"timeout": 60}})
    done = 0
    if resume:
        stored_study = optuna.load_study(study_name=name, storage=storage)
        stored, done = stored_study.user_attrs.get(SETTINGS_ATTR), len(stored_study.trials)
        if not stored:
            raise InputError(f"{folder / spec.STUDY_FILE} was not written by lqmf tune")
        space = spec.SearchSpace(stored["space"]["space"], stored["space"]["fixed"], [],
                                 **{k: int(v) for k, v in stored["space"]["pruner"].items()})
        request = TuneRequest(name, stored["values"], space, stored["metric"])
    assert request is not None
    direction = spec.check_metric(request.metric, request.values["task_type"])
    seed = int(request.values.get("seed", 42))
    study = optuna.create_study(
        study_name=name, storage=storage, direction=direction, load_if_exists=resume,
        sampler=optuna.samplers.TPESampler(seed=seed + done),  # a resumed study samples anew, not from the start
        pruner=_divergence_pruner(request.space.startup_trials, request.space.warmup_steps))
    if not resume:
        study.set_user_attr(SETTINGS_ATTR, request.to_dict())
        for params in request.space.first_trials:
            study.enqueue_trial(params)
    return study, request


def suggest(trial, key: str, choice_spec: Any) -> Any:
    if isinstance(choice_spec, list):
        return trial.suggest_categorical(key, choice_spec)
    low, high, log = choice_spec["low"], choice_spec["high"], bool(choice_spec.get("log"))
    if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
        return trial.suggest_int(key, low, high, log=log)
    return trial.suggest_float(key, float(low), float(high), log=log)


def linear_module_names(model) -> list[str]:
    """The names of the model's linear layers that LoRA can adapt (what PEFT's all-linear picks)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf not in ("lm_head", *CLASSIFIER_HEADS):
            names.add(leaf)
    return sorted(names)


class TrialEvents(trainer.Events):
    """Reports each evaluation to the study; a trial the pruner stops ends with optuna.TrialPruned."""

    def __init__(self, trial, metric: str):
        self.trial = trial
        self.key = f"eval_{metric}"

    def on_eval(self, record: dict[str, Any]) -> None:
        import optuna

        value = float(record.get(self.key, math.nan))
        self.trial.report(value, record["step"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.key} {value:.4g} at step {record['step']}")


class Study:
    """One process's part of a study: the base model loaded once, trials run on it."""

    def __init__(self, workspace: Workspace, study, request: TuneRequest):
        self.workspace = workspace
        self.study = study
        self.request = request
        self.folder = spec.study_dir(workspace, request.name)
        self.model_ref: ResolvedModel = ModelCatalogue(workspace).resolve(request.values["base_model"])
        self.dataset: TaskDataset = load_task_dataset(Path(request.values["dataset_path"]), request.values["task_type"])
        self.base: LoadedModel | None = None
        self.linear: list[str] = []

    def config_for(self, params: dict[str, Any], number: int) -> cfg.TrainConfig:
        values = {**self.request.values, **self.request.space.fixed,
                  **spec.trial_values(params, self.linear), "job_name": f"{self.request.name}-trial-{number}"}
        values = {k: cfg.coerce_value(k, v, f"trial {number}: {k}") if v is not None else None
                  for k, v in values.items()}
        config = cfg.resolve_config({}, values)
        if config.validation_split <= 0 or config.eval_strategy == "no":
            raise InputError("tune scores trials on the validation split: validation_split must be above 0 and "
                             "eval_strategy not 'no'")
        return config

    def load_base(self) -> None:
        """Load the base model once (as training would), before the first trial."""
        config = self.config_for({}, 0)
        prepared = trainer.prepare(config, self.model_ref, self.dataset)
        if not prepared.validation:
            raise InputError(f"{self.dataset.path}: too few examples to hold out a validation split for tuning")
        self.base = trainer.load_base(config, self.model_ref, prepared, self.dataset.task)
        self.linear = linear_module_names(self.base.model)

    def objective(self, trial) -> float:
        import optuna
        import torch

        params = {key: suggest(trial, key, choices) for key, choices in self.request.space.params.items()}
        config = self.config_for(params, trial.number)
        staging = self.folder / f"trial-{trial.number}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        prepared = trainer.prepare(config, self.model_ref, self.dataset)
        memory = trainer.plan_memory(config, self.model_ref, prepared)
        torch.manual_seed(config.seed)  # the same LoRA initialisation as `lqmf train` with this config
        # PEFT trains a copy of a classification head and unload() puts the trained copy in its place:
        # keep the untouched originals to put back.
        heads = {name: getattr(self.base.model, name) for name in CLASSIFIER_HEADS if hasattr(self.base.model, name)}
        loaded = trainer.setup_model(config, self.model_ref, prepared, self.dataset.task, base=self.base)
        try:
            outcome = recipe.train(config, self.model_ref, self.dataset, staging, prepared=prepared, memory=memory,
                                    events=TrialEvents(trial, self.request.metric), loaded=loaded)
        except optuna.TrialPruned:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self.base.model = loaded.model.unload()
            for name, head in heads.items():
                setattr(self.base.model, name, head)
        atomic_write_json(staging / spec.TRIAL_FILE, {"config": config.to_dict(), "plan": prepared.plan(),
                                                      "metrics": outcome.metrics, "runtime": outcome.runtime})
        value = outcome.metrics.get(f"eval_{self.request.metric}")
        if value is None:
            raise RuntimeFailure(f"trial {trial.number} reported no eval_{self.request.metric}")
        return float(value)

    def run(self, n_trials: int | None, timeout: float | None, on_trial: Callable[[dict[str, Any]], None]) -> None:
        self.load_base()
        def report(study, trial) -> None:
            on_trial({**trial_row(trial), "metric": self.request.metric})

        self.study.optimize(self.objective, n_trials=n_trials, timeout=timeout, catch=(RuntimeFailure,),
                            callbacks=[report], gc_after_trial=True)


def trial_row(trial) -> dict[str, Any]:
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    pruned_at = trial.last_step if trial.state.name == "PRUNED" else None
    return {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
            "params": trial.params, "pruned_at_step": pruned_at, "seconds": seconds}


def best_trial(study):
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return study.best_trial if complete else None


def save_best_config(workspace: Workspace, name: str, record: dict[str, Any]) -> Path:
    """configs/NAME-best.yaml: the best trial's config, loadable by `lqmf train --config`."""
    config = cfg.resolve_config({}, {k: v for k, v in record["config"].items() if v is not None})
    config.job_name = name
    path = spec.best_config_path(workspace, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cfg.dump_config(config))
    return path


def register_best(workspace: Workspace, name: str, folder: Path, record: dict[str, Any], trial_number: int,
                  request: TuneRequest, study_row: dict[str, Any], force: bool) -> Path:
    """Copy the best trial's adapter into the registry as NAME (staging + rename)."""
    registry = Registry(workspace)
    config = cfg.resolve_config({}, {k: v for k, v in record["config"].items() if v is not None})
    config.job_name = name
    model_ref = ModelCatalogue(workspace).resolve(request.values["base_model"])
    dataset = load_task_dataset(Path(request.values["dataset_path"]), request.values["task_type"])
    with registry.training_run(name, wait=5.0):
        staging = registry.staging_path(name)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(spec.TRIAL_FILE, MANIFEST))
            manifest = build_manifest(name, config, model_ref, dataset, record["plan"], record["metrics"],
                                      record["runtime"])
            manifest["lineage"] = {"operation": "tune", "study": str(spec.study_dir(workspace, request.name)),
                                   "trial": trial_number, "metric": request.metric, "value": study_row["value"]}
            return registry.finalize(name, staging, manifest, force=force)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def tune(workspace: Workspace, request: TuneRequest | None, name: str, *, trials: int | None, timeout: float | None,
         resume: bool = False, force: bool = False, keep_best: bool = False, gate: Gate | None = None,
         on_trial: Callable[[dict[str, Any]], None] = lambda row: None) -> dict[str, Any]:
    """Run (or continue) study NAME; returns its trials, the best one, and what was saved."""
    gate = gate or Gate()
    if keep_best and Registry(workspace).exists(name) and not force:
        raise ConflictError(f"adapter '{name}' already exists; --keep-best would replace it: use --force or --name")
    study, request = open_study(workspace, request, name, resume, force)
    gate.check_task(request.values["task_type"])
    started = time.perf_counter()
    Study(workspace, study, request).run(trials, timeout, on_trial)
    rows = [trial_row(t) for t in study.trials]
    best = best_trial(study)
    result: dict[str, Any] = {"study": name, "storage": spec.storage_url(spec.study_dir(workspace, name)),
                              "metric": request.metric, "direction": study.direction.name.lower(),
                              "seconds": round(time.perf_counter() - started, 2), "trials": rows, "best": None,
                              "best_config": None, "adapter": None, "refused": None}
    if best is None:
        raise LqmfError(f"no trial of study '{name}' completed ({len(rows)} run); nothing to save")
    folder = spec.study_dir(workspace, name) / f"trial-{best.number}"
    record = json.loads((folder / spec.TRIAL_FILE).read_text(encoding="utf-8"))
    result["best"] = trial_row(best)
    result["best_config"] = str(save_best_config(workspace, name, record))
    if keep_best:
        metrics = record["metrics"]
        refusal = gate.refusal({k[5:]: v for k, v in metrics.items() if k.startswith("eval_")})
        if refusal:
            result["refused"] = f"best trial {best.number} not registered: {refusal}"
            return result
        result["adapter"] = str(register_best(workspace, name, folder, record, best.number, request,
                                              result["best"], force))
    return result
