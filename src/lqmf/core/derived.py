"""Adapters made from other adapters (combine, compress, tune): checks, lineage and the quality gate.

No torch here: the engine builds the weights, this module decides what is allowed and what the
manifest says about where an adapter came from.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from lqmf.core.errors import InputError
from lqmf.core.manifest import now_iso
from lqmf.core.registry import ADAPTER_WEIGHTS, AdapterEntry

COMBINE_METHODS = ("linear", "svd", "cat", "ties", "dare_ties", "dare_linear")
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")
SAME_RANK_METHODS = ("linear", "ties", "dare_ties", "dare_linear")
MAX_WEIGHT = 100.0  # a combination weight's largest magnitude (offline combine and serve's A:0.7+B:0.3)
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def parse_weights(text: str | None, count: int) -> list[float]:
    """--weights 0.7,0.3 -> [0.7, 0.3]; default: equal weights summing to 1."""
    if not text:
        return [1.0 / count] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--weights: '{text}' is not a comma-separated list of numbers") from None
    if len(weights) != count:
        raise InputError(f"--weights: {len(weights)} weight(s) for {count} adapters")
    return [check_weight(weight, "--weights") for weight in weights]


def check_weight(value: float, where: str) -> float:
    """value if it is a usable combination weight: finite and at most MAX_WEIGHT in magnitude (so it
    scales float32/bfloat16 weights without overflowing them); InputError naming where otherwise."""
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise InputError(f"{where}: weight {value:g} is not a finite number between -{MAX_WEIGHT:g} and "
                         f"{MAX_WEIGHT:g}")
    return value


def check_finite_option(value: float | None, option: str) -> float | None:
    """value (or None) if it is a finite number; InputError naming the option otherwise."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, got {value}")
    return value


def check_combinable(entries: list[AdapterEntry], method: str, density: float | None) -> None:
    """Same base model and task, a known method, and no classification heads to mix."""
    if method not in COMBINE_METHODS:
        raise InputError(f"--method must be one of {', '.join(COMBINE_METHODS)}, got '{method}'")
    if len(entries) < 2:
        raise InputError("combine needs at least two source adapters")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise InputError(f"an adapter is named twice: {', '.join(names)}")
    first = entries[0]
    for entry in entries[1:]:
        if entry.base_id != first.base_id:
            raise InputError(f"'{entry.name}' was trained on {entry.base_model.get('reference')}, "
                             f"'{first.name}' on {first.base_model.get('reference')}: only adapters of one base "
                             "model combine")
        if entry.manifest.get("task") != first.manifest.get("task"):
            raise InputError(f"'{entry.name}' is a {entry.manifest.get('task')} adapter, '{first.name}' a "
                             f"{first.manifest.get('task')} one: only adapters of one task combine")
    if first.manifest.get("task") == "classification":
        raise InputError("classification adapters each carry their own trained head, which PEFT cannot mix; "
                         "combine works on generative adapters")
    ranks = {e.name: (e.manifest.get("lora") or {}).get("r") for e in entries}
    if method in SAME_RANK_METHODS and len(set(ranks.values())) > 1:
        listing = ", ".join(f"{k} r={v}" for k, v in ranks.items())
        raise InputError(f"--method {method} needs adapters of one rank ({listing}); use svd or cat")
    if method in DENSITY_METHODS and not (density and 0 < density <= 1):
        raise InputError(f"--method {method} needs --density in (0, 1], got {density}")


def check_compress(rank: int | None, energy: float | None, dtype: str | None, name: str | None,
                   in_place: bool) -> str | None:
    """Validate compress's options; returns the storage dtype's torch name (None: keep)."""
    if rank is not None and energy is not None:
        raise InputError("give --rank or --energy, not both")
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise InputError(f"--energy must be in (0, 1], got {energy}")
    if rank is None and energy is None and dtype is None:
        raise InputError("nothing to do: give --rank, --energy or --dtype")
    if bool(name) == in_place:
        raise InputError("give --name NEW (a new adapter) or --in-place")
    if dtype is None:
        return None
    if dtype.lower() not in DTYPES:
        raise InputError(f"--dtype must be one of bf16, fp16, fp32, got '{dtype}'")
    return DTYPES[dtype.lower()]


@dataclass
class Gate:
    """The quality gate: --min-metric (accuracy, classification) and --max-loss (any task)."""

    min_metric: float | None = None
    max_loss: float | None = None

    def check_task(self, task: str) -> None:
        check_finite_option(self.min_metric, "--min-metric")
        check_finite_option(self.max_loss, "--max-loss")
        if self.min_metric is not None and task != "classification":
            raise InputError("--min-metric applies to classification accuracy; for a "
                             f"{task} adapter gate on --max-loss")

    @property
    def active(self) -> bool:
        return self.min_metric is not None or self.max_loss is not None

    def refusal(self, scores: dict[str, float] | None) -> str | None:
        """Why a result with these held-out scores must not be registered; None when it passes."""
        if not self.active:
            return None
        if not scores:
            return "the quality gate needs held-out data: the source has no validation split; pass --eval-file"
        accuracy, loss = scores.get("accuracy", float("nan")), scores.get("loss", float("nan"))
        if self.min_metric is not None and not accuracy >= self.min_metric:
            return f"held-out accuracy {accuracy:.4f} is below --min-metric {self.min_metric}"
        if self.max_loss is not None and not loss <= self.max_loss:
            return f"held-out loss {loss:.4f} is above --max-loss {self.max_loss}"
        return None


def source_record(entry: AdapterEntry) -> dict[str, Any]:
    files = (entry.manifest or {}).get("files") or {}
    return {"name": entry.name, "weights_sha256": (files.get(ADAPTER_WEIGHTS) or {}).get("sha256")}


def derived_manifest(name: str, sources: list[AdapterEntry], lora: dict[str, Any],
                     lineage: dict[str, Any], quality: dict[str, Any] | None) -> dict[str, Any]:
    """The first source's manifest, renamed, with the new LoRA shape, its lineage and measured quality.

    The first source's config stays (dataset, split, seed), so `lqmf bench` rebuilds the same held-out split.
    """
    manifest = copy.deepcopy(sources[0].manifest or {})
    manifest.pop("files", None)
    config = manifest.get("config") or {}
    config.update(job_name=name, lora_r=lora["r"], lora_alpha=lora["alpha"])
    metrics: dict[str, Any] = {}
    if quality and quality.get("scores"):
        metrics = {f"eval_{k}": v for k, v in quality["scores"].items()}
    manifest.update(name=name, created=now_iso(), lora={**(manifest.get("lora") or {}), **lora}, config=config,
                    metrics=metrics, quality=quality,
                    lineage={**lineage, "sources": [source_record(e) for e in sources]})
    return manifest
