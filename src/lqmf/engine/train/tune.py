"""`lqmf tune`: an Optuna study over training configs, on one base model loaded once.

start (one process creates tune/NAME/study.db, after the base has loaded, so a failed start leaves
nothing) -> the first trial is `lqmf train`'s own values (its defaults and small-data schedule), the
default space is centred on them -> for each trial: wrap the base with a fresh LoRA, train into
tune/NAME/trial-K/, report each evaluation to the pruner, unload the LoRA (a parameter set already
tried is not run again) -> save the best config as configs/NAME-best.yaml, and with keep_best register
the best trial's adapter: the defaults' unless another trial beats them on held-out data.
"""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lqmf.core import config as cfg
from lqmf.core import tune as spec
from lqmf.core.datasets import TaskDataset, load_task_dataset
from lqmf.core.derived import Gate
from lqmf.core.errors import ConflictError, InputError, LqmfError, NotFoundError, RuntimeFailure
from lqmf.core.fsutil import atomic_write_json, atomic_write_text, owner_alive, owner_tag
from lqmf.core.manifest import build_manifest
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.names import validate_name
from lqmf.core.registry import MANIFEST, Registry
from lqmf.core.workspace import Workspace
from lqmf.engine.loading import CLASSIFIER_HEADS, LoadedModel, first_line
from lqmf.engine.train import loop as trainer
from lqmf.engine.train import recipe

SETTINGS_ATTR = "lqmf_settings"
OWNER_ATTR = "lqmf_owner"  # host:PIDpSTART of the process running the trial (stale ones are marked failed)
TWIN_ATTR = "lqmf_same_as"  # this trial sampled the parameters of an earlier one: not run again
DEFAULTS_ATTR = "lqmf_defaults"  # the trial of `lqmf train`'s own values
MAX_TWINS_IN_A_ROW = 20
CENTRE_KEYS = ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "num_train_epochs",
               "max_steps")


@dataclass
class TuneRequest:
    """What a study tunes: the config values every trial shares, the space, the metric."""

    name: str
    values: dict[str, Any]  # resolved config values (file < options < --set), before each trial's params
    space: spec.SearchSpace
    metric: str = "loss"
    defaults: dict[str, Any] | None = None  # the first trial's params: `lqmf train`'s values

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "space": self.space.to_dict(), "metric": self.metric,
                "defaults": self.defaults}

    @classmethod
    def from_stored(cls, name: str, stored: Any, where: Path) -> TuneRequest:
        """The request a study's settings hold, checked (damaged settings get one line naming the file)."""
        try:
            values = {k: cfg.coerce_value(k, v, f"{where}: stored config") for k, v in stored["values"].items()}
            space = spec.SearchSpace(dict(stored["space"]["space"]), dict(stored["space"]["fixed"]), [],
                                     **{k: int(v) for k, v in stored["space"]["pruner"].items()})
            for key, choices in space.params.items():
                spec.check_param(key, choices, str(where))
            defaults = stored.get("defaults")
            request = cls(name, values, space, str(stored["metric"]), dict(defaults) if defaults else None)
            spec.check_metric(request.metric, values["task_type"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"{where}: the study's stored settings are damaged ({type(err).__name__}: {err}); "
                             "--force starts it over") from None
        return request


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


# ---------------------------------------------------------------------------------------- the study file

@contextmanager
def study_file(path: Path) -> Iterator[None]:
    """Turn whatever a damaged or foreign study.db raises in Optuna or SQLAlchemy into one line naming it."""
    try:
        yield
    except LqmfError:
        raise
    except Exception as err:  # noqa: BLE001 - sqlite, SQLAlchemy and Optuna errors of every kind
        raise InputError(f"{path}: not a study lqmf tune can read ({type(err).__name__}: {first_line(err)}); "
                         "--force starts it over") from None


def _storage(folder: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(spec.storage_url(folder), engine_kwargs={"connect_args": {"timeout": 60}})


def _stored_settings(folder: Path, name: str) -> Any:
    """The settings of study NAME in folder's study.db; None when it holds none (a start that never ended)."""
    import optuna

    with study_file(folder / spec.STUDY_FILE):
        storage = _storage(folder)
        if name not in [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]:
            return None
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get(SETTINGS_ATTR)


@contextmanager
def starting(workspace: Workspace, name: str) -> Iterator[None]:
    """Only one process creates study NAME: a second gets one line at once, not a half-made study."""
    from filelock import FileLock, Timeout

    path = workspace.root / spec.TUNE_DIR / f".{validate_name(name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConflictError(f"another lqmf tune is starting study '{name}' (it holds {path}); when it has "
                            f"started, --resume {name} joins it") from None
    try:
        yield
    finally:
        lock.release()


def clear_for_new_study(workspace: Workspace, name: str, force: bool) -> None:
    """Remove an old study NAME (with force) or one whose start never finished; refuse to replace a real one."""
    folder = spec.study_dir(workspace, name)
    if not folder.exists():
        return
    if not force and (folder / spec.STUDY_FILE).is_file() and _stored_settings(folder, name) is not None:
        raise ConflictError(f"a study named '{name}' exists ({folder / spec.STUDY_FILE}); --resume {name} "
                            "continues it, --force starts over")
    shutil.rmtree(folder)


def create_study(workspace: Workspace, session: Study):
    """The new study, its settings and first trials (the defaults first); on any failure nothing is left."""
    import optuna

    request = session.request
    folder = spec.study_dir(workspace, request.name)
    folder.mkdir(parents=True)
    try:
        with study_file(folder / spec.STUDY_FILE):
            study = optuna.create_study(
                study_name=request.name, storage=_storage(folder), direction=session.direction,
                sampler=optuna.samplers.TPESampler(seed=int(request.values.get("seed", 42))),
                pruner=_divergence_pruner(request.space.startup_trials, request.space.warmup_steps))
            for params in [request.defaults, *request.space.first_trials]:
                if params:
                    study.enqueue_trial(params, skip_if_exists=True)
            study.set_user_attr(SETTINGS_ATTR, request.to_dict())  # last: a study without it never started
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return study


def open_stored_study(workspace: Workspace, name: str):
    """(study, request) of study NAME to continue, its stale running trials marked failed."""
    import optuna

    folder = spec.study_dir(workspace, name)
    path = folder / spec.STUDY_FILE
    if not path.is_file():
        raise NotFoundError(f"no study named '{name}' in {folder.parent}")
    stored = _stored_settings(folder, name)
    if not stored:
        raise InputError(f"{path} holds no study '{name}' written by lqmf tune; --force starts it over")
    request = TuneRequest.from_stored(name, stored, path)
    with study_file(path):
        storage = _storage(folder)
        # Another process may resume at the same moment: its sampler must not draw the same parameters, so it
        # is seeded from the OS (a seed made of counts and pids coincided: 42 + 2 + pid == 42 + 1 + (pid + 1)).
        seed = random.SystemRandom().getrandbits(31)
        study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(seed=seed),
                                  pruner=_divergence_pruner(request.space.startup_trials,
                                                            request.space.warmup_steps))
        fail_stale_trials(study)
    return study, request


def fail_stale_trials(study) -> list[int]:
    """Mark failed the running trials whose process (on this host) is gone: killed, they never finish."""
    import optuna

    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, _, tag = str(trial.user_attrs.get(OWNER_ATTR, "")).rpartition(":")
        pid, _, started = tag.partition("p")
        if owner_host != host or not (pid.isdigit() and started.isdigit()) or owner_alive(int(pid), int(started)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            failed.append(trial.number)
        except (ValueError, RuntimeError):  # another resuming process marked it first
            pass
    return failed


def suggest(trial, key: str, choice_spec: Any) -> Any:
    if isinstance(choice_spec, list):
        return trial.suggest_categorical(key, choice_spec)
    low, high, log = choice_spec["low"], choice_spec["high"], bool(choice_spec.get("log"))
    if isinstance(cfg.coerce_value(key, low, key), int):  # an integer key: lora_r, not lora_dropout
        return trial.suggest_int(key, int(low), int(high), log=log)
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

    def __init__(self, workspace: Workspace, request: TuneRequest, study=None):
        self.workspace = workspace
        self.study = study
        self.request = request
        self.folder = spec.study_dir(workspace, request.name)
        self.model_ref: ResolvedModel = ModelCatalogue(workspace).resolve(request.values["base_model"])
        self.dataset: TaskDataset = load_task_dataset(Path(request.values["dataset_path"]), request.values["task_type"])
        self.direction = spec.check_metric(request.metric, request.values["task_type"])
        self.base: LoadedModel | None = None
        self.linear: list[str] = []
        self.centre: dict[str, Any] = {}

    def config_for(self, params: dict[str, Any], number: int) -> cfg.TrainConfig:
        values = {**self.request.values, **self.request.space.fixed,
                  **spec.trial_values(params, self.linear), "job_name": f"{self.request.name}-trial-{number}"}
        values = {k: cfg.coerce_value(k, v, f"trial {number}: {k}") if v is not None else None
                  for k, v in values.items()}
        config = cfg.resolve_config({}, values)
        cfg.check_complete(config)  # task defaults: the learning rate, the head's (from this trial's rate)
        if config.validation_split <= 0 or config.eval_strategy == "no":
            raise InputError("tune scores trials on the validation split: validation_split must be above 0 and "
                             "eval_strategy not 'no'")
        return config

    def load_base(self) -> None:
        """Load the base model once (as training would), before the first trial; note `lqmf train`'s values
        (with the small-data schedule) as the centre of the space."""
        config = self.config_for({}, 0)
        prepared = trainer.prepare(config, self.model_ref, self.dataset)
        if not prepared.validation:
            raise InputError(f"{self.dataset.path}: too few examples to hold out a validation split for tuning")
        self.centre = {key: getattr(config, key) for key in CENTRE_KEYS}  # prepare filled in the schedule
        self.base = trainer.load_base(config, self.model_ref, prepared, self.dataset.task)
        self.linear = linear_module_names(self.base.model)

    def centre_space(self) -> None:
        """A new study: the default space around the centre, and the centre as the first trial."""
        space = self.request.space
        if space.params is None:
            space.params = spec.centred_space(self.centre)
        self.request.defaults = spec.defaults_trial(space.params, self.centre)

    def objective(self, trial, params: dict[str, Any]) -> float:
        import optuna
        import torch

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

    def twin(self, number: int, params: dict[str, Any]) -> int | None:
        """An earlier trial (run, running or pruned) with exactly these parameters, if any."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        for other in self.study.get_trials(deepcopy=False, states=states):
            if other.number < number and other.params == params and TWIN_ATTR not in other.user_attrs:
                return other.number
        return None

    def run_trial(self, trial, params: dict[str, Any]):
        """Train one trial and tell the study how it ended (never left running); the frozen trial."""
        import optuna

        state = optuna.trial.TrialState
        try:
            value = self.objective(trial, params)
        except optuna.TrialPruned:
            return self.study.tell(trial, state=state.PRUNED)
        except RuntimeFailure as err:
            trial.set_user_attr("error", err.message)
            return self.study.tell(trial, state=state.FAIL)
        except BaseException:
            self.study.tell(trial, state=state.FAIL)
            raise
        return self.study.tell(trial, value)

    def run(self, n_trials: int | None, timeout: float | None, on_trial: Callable[[dict[str, Any]], None]) -> None:
        """Run n_trials (or until timeout); a parameter set already tried is told apart and not run."""
        import optuna

        started, ran, twins = time.monotonic(), 0, 0
        while (n_trials is None or ran < n_trials) and (timeout is None or time.monotonic() - started < timeout):
            trial = self.study.ask()
            trial.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{owner_tag()}")
            params = {key: suggest(trial, key, choices) for key, choices in self.request.space.params.items()}
            if params == self.request.defaults:
                trial.set_user_attr(DEFAULTS_ATTR, True)
            twin = self.twin(trial.number, params)
            if twin is not None:
                trial.set_user_attr(TWIN_ATTR, twin)
                frozen = self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                on_trial({**trial_row(frozen), "metric": self.request.metric})
                twins += 1
                if twins >= MAX_TWINS_IN_A_ROW:
                    break  # the space has (almost) no untried parameter sets left
                continue
            twins = 0
            frozen = self.run_trial(trial, params)
            ran += 1
            on_trial({**trial_row(frozen), "metric": self.request.metric})
            gc.collect()


def trial_row(trial) -> dict[str, Any]:
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    pruned_at = trial.last_step if trial.state.name == "PRUNED" else None
    twin = trial.user_attrs.get(TWIN_ATTR)
    return {"number": trial.number, "state": "same-as-earlier" if twin is not None else trial.state.name.lower(),
            "value": trial.value, "params": trial.params, "pruned_at_step": pruned_at, "seconds": seconds,
            "defaults": bool(trial.user_attrs.get(DEFAULTS_ATTR)), "same_as": twin}


def best_trial(study):
    """The trial to keep: the defaults' (`lqmf train`'s values) unless another completed trial beats them
    (strictly; among equals the earliest), or None when no trial completed."""
    import optuna

    complete = sorted((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                       if t.value is not None and math.isfinite(t.value)),
                      key=lambda t: (not t.user_attrs.get(DEFAULTS_ATTR), t.number))
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = None
    for trial in complete:
        if best is None or (trial.value > best.value if maximize else trial.value < best.value):
            best = trial
    return best


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


def open_session(workspace: Workspace, request: TuneRequest | None, name: str, resume: bool, force: bool) -> Study:
    """The study to run, with the base loaded: a stored one to continue, or a new one created (by one process
    only) after the base has loaded, so that a failed start leaves nothing behind."""
    if resume:
        study, stored = open_stored_study(workspace, name)
        session = Study(workspace, stored, study)
        session.load_base()
        return session
    assert request is not None
    with starting(workspace, name):
        clear_for_new_study(workspace, name, force)
        session = Study(workspace, request)
        session.load_base()
        session.centre_space()
        session.study = create_study(workspace, session)
    return session


def tune(workspace: Workspace, request: TuneRequest | None, name: str, *, trials: int | None, timeout: float | None,
         resume: bool = False, force: bool = False, keep_best: bool = False, gate: Gate | None = None,
         on_trial: Callable[[dict[str, Any]], None] = lambda row: None) -> dict[str, Any]:
    """Run (or continue) study NAME; returns its trials, the best one, and what was saved."""
    gate = gate or Gate()
    if keep_best and Registry(workspace).exists(name) and not force:
        raise ConflictError(f"adapter '{name}' already exists; --keep-best would replace it: use --force or --name")
    session = open_session(workspace, request, name, resume, force)
    study, request = session.study, session.request
    gate.check_task(request.values["task_type"])
    started = time.perf_counter()
    session.run(trials, timeout, on_trial)
    rows = [trial_row(t) for t in study.trials]
    best = best_trial(study)
    result: dict[str, Any] = {"study": name, "storage": spec.storage_url(spec.study_dir(workspace, name)),
                              "metric": request.metric, "direction": study.direction.name.lower(),
                              "seconds": round(time.perf_counter() - started, 2), "trials": rows, "best": None,
                              "best_config": None, "adapter": None, "refused": None, "kept_defaults": False}
    if best is None:
        raise LqmfError(f"no trial of study '{name}' completed ({len(rows)} run); nothing to save")
    folder = spec.study_dir(workspace, name) / f"trial-{best.number}"
    record = json.loads((folder / spec.TRIAL_FILE).read_text(encoding="utf-8"))
    result["best"] = trial_row(best)
    others = [r for r in rows if r["state"] == "complete" and r["number"] != best.number]
    result["kept_defaults"] = bool(best.user_attrs.get(DEFAULTS_ATTR)) and bool(others)
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
