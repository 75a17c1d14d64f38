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


def default_space(task: str) -> dict[str, Any]:
    classification = task == "classification"
    return {
        "learning_rate": {"low": 1e-4 if classification else 5e-5, "high": 3e-3 if classification else 5e-4,
                          "log": True},
        "lora_r": [8, 16, 32],
        "lora_alpha": [16, 32, 64],
        "lora_dropout": {"low": 0.0, "high": 0.1},
        "target_modules": [DEFAULT_TARGETS, ALL_LINEAR],
        "num_train_epochs": [1, 2, 3],
        "per_device_train_batch_size": [2, 4, 8],
    }


@dataclass
class SearchSpace:
    params: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    first_trials: list[dict[str, Any]] = field(default_factory=list)
    startup_trials: int = 2
    warmup_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.params, "fixed": self.fixed, "first_trials": self.first_trials,
                "pruner": {"startup_trials": self.startup_trials, "warmup_steps": self.warmup_steps}}


def _check_param(key: str, spec: Any, where: str) -> None:
    if key not in cfg.TrainConfig.field_names():
        raise InputError(f"{where}: '{key}' is not a config key{did_you_mean(key, cfg.TrainConfig.field_names())}")
    if isinstance(spec, list):
        if not spec:
            raise InputError(f"{where}: '{key}' has an empty list of choices")
        for choice in spec:
            if key != "target_modules":
                cfg.coerce_value(key, choice, f"{where}: {key}")
            elif not isinstance(choice, str):
                raise InputError(f"{where}: target_modules choices are strings (default, all-linear or "
                                 f"'q_proj,v_proj'), got {choice!r}")
        return
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(spec):
            raise InputError(f"{where}: '{key}' range needs low and high (and optionally log), got {sorted(spec)}")
        low, high = (cfg.coerce_value(key, spec[k], f"{where}: {key}.{k}") for k in ("low", "high"))
        if not low < high:
            raise InputError(f"{where}: '{key}' range has low {low} not below high {high}")
        if spec.get("log") and low <= 0:
            raise InputError(f"{where}: '{key}' log range needs low > 0")
        return
    raise InputError(f"{where}: '{key}' must be a list of choices or a {{low, high}} range (fixed values go "
                     "under fixed:)")


def load_space(path: Path | None, task: str) -> SearchSpace:
    """The search space from a YAML file (see the module doc), or the task's defaults."""
    if path is None:
        return SearchSpace(default_space(task), dict(TUNE_FIXED))
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise InputError(f"cannot read search space {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping with {', '.join(SPACE_KEYS)}")
    unknown = [k for k in data if k not in SPACE_KEYS]
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}'{did_you_mean(unknown[0], SPACE_KEYS)}")
    params = data.get("space") or default_space(task)
    for key, spec in params.items():
        _check_param(key, spec, where)
    fixed = {**TUNE_FIXED, **{k: cfg.coerce_value(k, v, f"{where}: fixed.{k}")
                              for k, v in (data.get("fixed") or {}).items()}}
    first = data.get("first_trials") or []
    if not isinstance(first, list) or not all(isinstance(t, dict) for t in first):
        raise InputError(f"{where}: first_trials must be a list of mappings")
    for trial in first:
        for key in trial:
            if key not in params:
                raise InputError(f"{where}: first_trials sets '{key}', which is not in the space")
    pruner = data.get("pruner") or {}
    bad = [k for k in pruner if k not in PRUNER_KEYS]
    if bad:
        raise InputError(f"{where}: unknown pruner key '{bad[0]}'{did_you_mean(bad[0], PRUNER_KEYS)}")
    return SearchSpace(params, fixed, first, int(pruner.get("startup_trials", 2)), int(pruner.get("warmup_steps", 0)))


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
