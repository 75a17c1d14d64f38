"""`lqmf tune`: the search space (YAML or defaults per task), study paths, and what a trial sets.

A space file:

    space:                      # config key: what to try
      learning_rate: {low: 5.0e-5, high: 5.0e-4, log: true}   # a range (float, or int when both ends are)
      lora_r: [8, 16, 32]                                      # a list of choices
      target_modules: [default, all-linear, "q_proj,v_proj"]   # module lists as comma-separated strings
    fixed:                      # config values for every trial (as --set)
      max_steps: 200
    first_trials:               # configs to try before the sampler picks (Optuna's enqueue_trial)
      - {learning_rate: 2.0e-4, lora_r: 16}
    pruner: {startup_trials: 2, warmup_steps: 0}              # median pruning: after 2 trials, from step 0

No torch, no optuna here: the engine turns these into Optuna's suggestions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lqmf.core import config as cfg
from lqmf.core.errors import InputError, did_you_mean
from lqmf.core.names import validate_name
from lqmf.core.workspace import Workspace

TUNE_DIR = "tune"
STUDY_FILE = "study.db"
TRIAL_FILE = "trial.json"
SPACE_KEYS = ("space", "fixed", "first_trials", "pruner")
PRUNER_KEYS = ("startup_trials", "warmup_steps")
METRICS = {"loss": "minimize", "perplexity": "minimize", "accuracy": "maximize", "macro_f1": "maximize"}
DEFAULT_TARGETS = "default"  # the model family's list
ALL_LINEAR = "all-linear"
# Tuning runs evaluate often and do not need the untrained base scored first.
TUNE_FIXED = {"eval_at_start": False}


# Keys a trial may not change: what the study is about, and how it is scored.
NOT_TUNABLE = ("base_model", "dataset_path", "task_type", "job_name", "validation_split", "eval_strategy")
CHOICE_TYPES = (str, int, float, bool)


def centred_space(centre: dict[str, Any]) -> dict[str, Any]:
    """The default space around what `lqmf train` would use (its defaults and the small-data schedule):
    a third to three times its learning rate, half to twice its rank and alpha, its epochs and their
    half and 1.5 times (only when epochs decide the length, not max_steps)."""
    lr, r, alpha = centre["learning_rate"], centre["lora_r"], centre["lora_alpha"]
    space: dict[str, Any] = {
        "learning_rate": {"low": lr / 3, "high": lr * 3, "log": True},
        "lora_r": sorted({max(1, r // 2), r, r * 2}),
        "lora_alpha": sorted({max(1, alpha // 2), alpha, alpha * 2}),
        "lora_dropout": {"low": 0.0, "high": max(0.1, 2 * centre["lora_dropout"])},
        "target_modules": [DEFAULT_TARGETS, ALL_LINEAR],
    }
    epochs = centre.get("num_train_epochs")
    if epochs and centre.get("max_steps", -1) <= 0:
        space["num_train_epochs"] = sorted({float(max(1, round(epochs / 2))), float(epochs),
                                            float(round(epochs * 1.5))})
    return space


def defaults_trial(params: dict[str, Any], centre: dict[str, Any]) -> dict[str, Any] | None:
    """The first trial: `lqmf train`'s values, or None when the space cannot hold them all."""
    trial = {}
    for key, choices in params.items():
        value = DEFAULT_TARGETS if key == "target_modules" and centre.get(key) is None else centre.get(key)
        if value is None:
            continue
        if isinstance(choices, list) and value in choices:
            trial[key] = value
        elif isinstance(choices, dict) and choices["low"] <= value <= choices["high"]:
            trial[key] = value
    return trial if len(trial) == len(params) else None


@dataclass
class SearchSpace:
    params: dict[str, Any] | None  # None: centred_space around the run's defaults, filled in by the engine
    fixed: dict[str, Any] = field(default_factory=dict)
    first_trials: list[dict[str, Any]] = field(default_factory=list)
    startup_trials: int = 2
    warmup_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.params, "fixed": self.fixed, "first_trials": self.first_trials,
                "pruner": {"startup_trials": self.startup_trials, "warmup_steps": self.warmup_steps}}


def check_param(key: Any, spec: Any, where: str) -> None:
    if not isinstance(key, str) or key not in cfg.TrainConfig.field_names():
        raise InputError(f"{where}: '{key}' is not a config key{did_you_mean(str(key), cfg.TrainConfig.field_names())}")
    if key in NOT_TUNABLE:
        raise InputError(f"{where}: '{key}' cannot vary between trials (set it as an option or under fixed:)")
    if isinstance(spec, list):
        if not spec:
            raise InputError(f"{where}: '{key}' has an empty list of choices")
        for choice in spec:
            if not isinstance(choice, CHOICE_TYPES):
                raise InputError(f"{where}: '{key}' choices must be single values, got {choice!r}")
            if key != "target_modules":
                cfg.coerce_value(key, choice, f"{where}: {key}")
            elif not isinstance(choice, str):
                raise InputError(f"{where}: target_modules choices are strings (default, all-linear or "
                                 f"'q_proj,v_proj'), got {choice!r}")
        return
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(spec):
            raise InputError(f"{where}: '{key}' range needs low and high (and optionally log), got "
                             f"{sorted(map(str, spec))}")
        for end in ("low", "high"):
            value = spec[end]
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value \
                    or value in (float("inf"), float("-inf")):
                raise InputError(f"{where}: '{key}.{end}' must be a finite number, got {value!r}")
            coerced = cfg.coerce_value(key, value, f"{where}: {key}.{end}")
            if coerced is None or isinstance(coerced, bool | list | str):
                raise InputError(f"{where}: '{key}' takes no range (give a list of choices)")
        low, high = spec["low"], spec["high"]
        if not low < high:
            raise InputError(f"{where}: '{key}' range has low {low} not below high {high}")
        if not isinstance(spec.get("log", False), bool):
            raise InputError(f"{where}: '{key}.log' must be true or false, got {spec['log']!r}")
        if spec.get("log") and low <= 0:
            raise InputError(f"{where}: '{key}' log range needs low > 0")
        return
    raise InputError(f"{where}: '{key}' must be a list of choices or a {{low, high}} range (fixed values go "
                     "under fixed:)")


def _mapping(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
    return value


def _check_first_trials(first: Any, params: dict[str, Any] | None, where: str) -> list[dict[str, Any]]:
    if not isinstance(first, list) or not all(isinstance(t, dict) for t in first):
        raise InputError(f"{where}: first_trials must be a list of mappings")
    for trial in first:
        for key, value in trial.items():
            if params is None or key not in params:
                raise InputError(f"{where}: first_trials sets '{key}', which is not in the space")
            choices = params[key]
            if isinstance(choices, list) and value not in choices:
                raise InputError(f"{where}: first_trials sets {key}={value!r}, not one of its choices {choices}")
            if isinstance(choices, dict):  # a value outside the range is tried as given
                cfg.coerce_value(key, value, f"{where}: first_trials {key}")
    return first


def _pruner(data: dict[str, Any], where: str) -> tuple[int, int]:
    pruner = _mapping(data, "pruner", where)
    bad = [k for k in pruner if k not in PRUNER_KEYS]
    if bad:
        raise InputError(f"{where}: unknown pruner key '{bad[0]}'{did_you_mean(str(bad[0]), PRUNER_KEYS)}")
    values = []
    for key, default in zip(PRUNER_KEYS, (2, 0), strict=True):
        value = pruner.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{where}: pruner.{key} must be a whole number of 0 or more, got {value!r}")
        values.append(value)
    return values[0], values[1]


def load_space(path: Path | None, task: str) -> SearchSpace:
    """The search space from a YAML file (see the module doc), or None params: centred on the defaults."""
    if path is None:
        return SearchSpace(None, dict(TUNE_FIXED))
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise InputError(f"cannot read search space {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping with {', '.join(SPACE_KEYS)}")
    unknown = [k for k in data if k not in SPACE_KEYS]
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}'{did_you_mean(str(unknown[0]), SPACE_KEYS)}")
    params = _mapping(data, "space", where) or None
    for key, spec in (params or {}).items():
        check_param(key, spec, where)
    fixed = {**TUNE_FIXED}
    for key, value in _mapping(data, "fixed", where).items():
        if not isinstance(key, str):
            raise InputError(f"{where}: fixed: '{key}' is not a config key")
        fixed[key] = cfg.coerce_value(key, value, f"{where}: fixed.{key}")
    first = _check_first_trials(data.get("first_trials") or [], params, where)
    startup, warmup = _pruner(data, where)
    return SearchSpace(params, fixed, first, startup, warmup)


def trial_values(params: dict[str, Any], linear_modules: list[str]) -> dict[str, Any]:
    """A trial's sampled params as config values (target_modules strings become lists)."""
    values = dict(params)
    targets = values.get("target_modules")
    if targets is not None:
        if targets == DEFAULT_TARGETS:
            values["target_modules"] = None
        elif targets == ALL_LINEAR:
            values["target_modules"] = list(linear_modules)
        else:
            values["target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
    return values


def default_metric(task: str) -> str:
    """What tune optimises unless told: held-out accuracy for classification (what users compare), else loss."""
    return "accuracy" if task == "classification" else "loss"


def check_metric(metric: str, task: str) -> str:
    """The study's direction for metric; accuracy and macro_f1 only for classification."""
    if metric not in METRICS:
        raise InputError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if metric in ("accuracy", "macro_f1") and task != "classification":
        raise InputError(f"--metric {metric} needs a classification task; use loss or perplexity")
    if metric == "perplexity" and task == "classification":
        raise InputError("--metric perplexity needs a generative task; use loss, accuracy or macro_f1")
    return METRICS[metric]


def study_dir(workspace: Workspace, name: str) -> Path:
    return workspace.root / TUNE_DIR / validate_name(name)


def storage_url(folder: Path) -> str:
    return f"sqlite:///{folder / STUDY_FILE}"


def best_config_path(workspace: Workspace, name: str) -> Path:
    return workspace.configs_dir / f"{name}-best.yaml"
