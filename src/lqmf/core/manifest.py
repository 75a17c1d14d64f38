"""The manifest (lqmf.json) that LQMF writes beside PEFT's files in every adapter folder."""

from __future__ import annotations

import platform
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from lqmf.core.config import TrainConfig
from lqmf.core.datasets import TaskDataset
from lqmf.core.metrics import learning_check
from lqmf.core.models import ResolvedModel
from lqmf.core.names import slug
from lqmf.core.system import library_versions

MANIFEST_VERSION = 1
TASK_SHORT = {"instruction_following": "instruction"}


def default_adapter_name(model: ResolvedModel, task: str, dataset_sha256: str,
                         taken: Callable[[str], bool] = lambda name: False) -> str:
    """<model>-<task>-<5 chars of the dataset's hash>, as the guide names adapters (mistral-7b-chat-x1y2z).

    Deterministic, so that --dry-run announces the name the run uses; a name already taken gets
    the first free suffix -2, -3, ...
    """
    name = f"{slug(model.display_name)}-{TASK_SHORT.get(task, task)}-{dataset_sha256[:5]}"
    suffix = 1
    candidate = name
    while taken(candidate):
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(name: str, config: TrainConfig, model: ResolvedModel, dataset: TaskDataset,
                   plan: dict[str, Any], metrics: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "lqmf_manifest": MANIFEST_VERSION,
        "name": name,
        "task": dataset.task,
        "base_model": {
            "reference": model.reference, "alias": model.alias, "source": model.source, "kind": model.kind,
            "path": str(model.path) if model.path else None, "family": model.family,
        },
        "created": now_iso(),
        "dataset": {
            "path": str(dataset.path), "sha256": dataset.sha256, "format": dataset.format,
            "rows": len(dataset.examples), "train_examples": plan["train_examples"],
            "validation_examples": plan["validation_examples"],
        },
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                 "target_modules": config.target_modules or model.target_modules or "all-linear"},
        "config": config.to_dict(),
        "metrics": metrics,
        "learning": learning_check(dataset.task, metrics),
        "runtime": {**runtime, "python": platform.python_version(), "platform": platform.platform()},
        "versions": library_versions(),
    }
    if dataset.labels:
        manifest["id2label"] = {str(i): label for i, label in enumerate(dataset.labels)}
    return manifest
