"""MemoryOptimizer: the guide's Python API for watching and planning training memory.

    from lqmf import MemoryOptimizer

    optimizer = MemoryOptimizer(target_gpu_memory_gb=7.5, model="mistral-7b")
    with optimizer.memory_monitor("Training"):
        ...  # your training code
    for suggestion in optimizer.suggest_optimizations():
        print(suggestion)

On a CUDA GPU the monitor reads PyTorch's allocator (allocated VRAM, its peak); elsewhere it reads
the process's resident set size (RSS). Importing this module imports no torch; the monitor imports
it only when it runs on a GPU. Suggestions come from the estimator in lqmf.core.memory_plan.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lqmf.core.config import TrainConfig, coerce_value
from lqmf.core.memory_plan import (
    GiB,
    MemoryEstimate,
    ModelShape,
    TrainSettings,
    estimate,
    largest_micro_batch,
    require_shape,
    settings_for,
    what_would_fit,
)
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.workspace import Workspace
from lqmf.engine.train.memory import PROC_CLEAR_REFS, memory_in_use_gb, peak_memory_gb, reset_peak_memory

log = logging.getLogger("lqmf.memory")
SAMPLE_INTERVAL_S = 0.005
# Aim for this share of the target: the guide's "80-90% GPU memory usage".
GOOD_USE = 0.8


@dataclass
class MemoryRecord:
    """What one monitored block did to memory (GB)."""

    label: str
    device: str
    start_gb: float
    peak_gb: float
    end_gb: float
    seconds: float
    target_gb: float

    @property
    def peak_increase_gb(self) -> float:
        return self.peak_gb - self.start_gb

    @property
    def leaked_gb(self) -> float:
        """Memory still held at the end that was not held at the start."""
        return self.end_gb - self.start_gb

    @property
    def over_target(self) -> bool:
        return self.peak_gb > self.target_gb

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_increase_gb": self.peak_increase_gb, "leaked_gb": self.leaked_gb,
                "over_target": self.over_target}


@dataclass(frozen=True)
class Suggestion:
    """One concrete change: config keys and values, the estimated peak with it, and why."""

    changes: dict[str, Any]
    reason: str
    estimated_gb: float | None = None

    def __str__(self) -> str:
        keys = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.changes.items())
        estimate_text = f" (~{self.estimated_gb:.2f} GB)" if self.estimated_gb is not None else ""
        return f"{keys}{estimate_text}: {self.reason}" if keys else self.reason


class _Reader:
    """Current and peak memory (GB) of this process on one device: engine.memory's readings, with a
    sampling thread for the CPU peak where the kernel's RSS high-water mark cannot be reset."""

    def __init__(self, device: str):
        self.device = device
        self._sample = device != "cuda" and not os.access(PROC_CLEAR_REFS, os.W_OK)
        self._sampler: threading.Thread | None = None
        self._sampled = 0.0
        self._stop = threading.Event()

    def current(self) -> float:
        return memory_in_use_gb(self.device)

    def start_peak(self) -> None:
        reset_peak_memory(self.device)
        if self._sample:
            self._sampled = self.current()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._poll, daemon=True)
            self._sampler.start()

    def peak(self) -> float:
        return max(self._sampled, self.current()) if self._sample else peak_memory_gb(self.device)

    def stop_peak(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None

    def _poll(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sampled = max(self._sampled, self.current())


def _return_freed_memory(device: str) -> None:
    """Free what is unreferenced, so that the end reading shows only what the block kept."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        return
    try:  # glibc keeps freed heap pages until asked; without this a CPU "leak" may be the allocator's cache
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _detect_device() -> str:
    """cuda when PyTorch sees a GPU; torch is not imported just to learn that there is no NVIDIA GPU."""
    if "torch" not in sys.modules and not shutil.which("nvidia-smi"):
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class MemoryOptimizer:
    """Monitor memory by block and suggest settings that keep training within a target.

    model: an alias, folder or hub id (resolved in workspace), a config.json dict, or a loaded
    transformers model; config: a TrainConfig or a dict of its keys (lora_r, max_seq_length, ...).
    Both are optional and can also be given to suggest_optimizations().
    """

    def __init__(self, target_gpu_memory_gb: float = 7.5, *, model: Any = None,
                 config: TrainConfig | dict[str, Any] | None = None, device: str = "auto",
                 workspace: str | Path | None = None, leak_threshold_gb: float = 0.05):
        if target_gpu_memory_gb <= 0:
            raise ValueError(f"target_gpu_memory_gb must be positive, got {target_gpu_memory_gb}")
        self.target_gpu_memory_gb = float(target_gpu_memory_gb)
        self.model = model
        self.config = config
        self.workspace = Workspace.resolve(workspace)
        self.leak_threshold_gb = leak_threshold_gb
        self._requested_device = device
        self._device = None if device == "auto" else device
        self.records: list[MemoryRecord] = []
        self._open: list[MemoryRecord] = []

    @property
    def device(self) -> str:
        """cuda when PyTorch sees a GPU, else cpu (decided at first use)."""
        if self._device is None:
            self._device = _detect_device()
        return self._device

    # ------------------------------------------------------------------ monitoring

    @contextmanager
    def memory_monitor(self, label: str = "block") -> Iterator[MemoryRecord]:
        """Record the start, peak and end memory of the block (VRAM on a GPU, RSS otherwise).

        The record is appended to self.records and yielded (its numbers are filled in on exit).
        Monitors nest: an outer block's peak includes its inner blocks'.
        """
        reader = _Reader(self.device)
        _return_freed_memory(self.device)
        for outer in self._open:  # this block's reset must not hide what the outer blocks saw so far
            outer.peak_gb = max(outer.peak_gb, reader.peak())
        start = reader.current()
        record = MemoryRecord(label, self.device, start, start, start, 0.0, self.target_gpu_memory_gb)
        self._open.append(record)
        began = time.perf_counter()
        reader.start_peak()
        try:
            yield record
        finally:
            record.peak_gb = max(record.peak_gb, reader.peak())
            reader.stop_peak()
            record.seconds = time.perf_counter() - began
            self._open.remove(record)
            for outer in self._open:
                outer.peak_gb = max(outer.peak_gb, record.peak_gb)
            _return_freed_memory(self.device)
            record.end_gb = reader.current()
            self.records.append(record)
            self._report(record)

    def _report(self, record: MemoryRecord) -> None:
        log.info("%s: peak %.2f GB (+%.2f GB) on %s, %.2f GB still held after it (%+.2f GB), %.1f s",
                 record.label, record.peak_gb, record.peak_increase_gb, record.device, record.end_gb,
                 record.leaked_gb, record.seconds)
        if record.over_target:
            log.warning("%s: peak %.2f GB is over the %.2f GB target", record.label, record.peak_gb,
                        record.target_gb)
        if record.leaked_gb > self.leak_threshold_gb:
            log.warning("%s: %.2f GB more is held after the block than before it (a leak?)", record.label,
                        record.leaked_gb)

    # ------------------------------------------------------------------ planning

    def estimate(self, model: Any = None, config: TrainConfig | dict[str, Any] | None = None,
                 **settings: Any) -> MemoryEstimate:
        """The estimated peak of training model with config (and TrainSettings overrides) on a GPU."""
        shape, train_settings = self._plan_inputs(model, config, settings)
        return estimate(shape, train_settings)

    def suggest_optimizations(self, model: Any = None, config: TrainConfig | dict[str, Any] | None = None,
                              **settings: Any) -> list[Suggestion]:
        """Concrete changes for the current model and settings, best first.

        With a model: what the estimator says about fitting target_gpu_memory_gb (a smaller
        micro-batch with more accumulation, 4-bit, checkpointing, shorter sequences, a lower rank),
        or how much larger a micro-batch would still fit. From the monitored blocks: peaks over the
        target and memory left held after a block.
        """
        suggestions: list[Suggestion] = []
        if (model or self.model) is not None:
            suggestions += self._estimator_suggestions(model, config, settings)
        for record in self.records:
            if record.over_target:
                suggestions.append(Suggestion({}, f"'{record.label}' peaked at {record.peak_gb:.2f} GB, "
                                                  f"{record.peak_gb - record.target_gb:.2f} GB over the target",
                                              record.peak_gb))
            if record.leaked_gb > self.leak_threshold_gb:
                suggestions.append(Suggestion({}, f"'{record.label}' left {record.leaked_gb:.2f} GB held: drop "
                                                  "references to its tensors (outputs, losses kept for logging "
                                                  "without .item()) before the next block"))
        return suggestions

    def _estimator_suggestions(self, model: Any, config: Any, settings: dict[str, Any]) -> list[Suggestion]:
        shape, current = self._plan_inputs(model, config, settings)
        budget = self.target_gpu_memory_gb * GiB
        now = estimate(shape, current)
        now_gb = now.total / GiB
        if now.fits(budget):
            bigger = largest_micro_batch(shape, current, budget * GOOD_USE)
            if bigger > current.micro_batch:
                at = estimate(shape, replace(current, micro_batch=bigger)).total / GiB
                return [Suggestion({"per_device_train_batch_size": bigger},
                                   f"fits {GOOD_USE:.0%} of the {self.target_gpu_memory_gb:.2f} GB target (now "
                                   f"~{now_gb:.2f} GB); lower gradient_accumulation_steps by the same factor for "
                                   "faster steps", at)]
            return [Suggestion({}, f"fits: ~{now_gb:.2f} GB of the {self.target_gpu_memory_gb:.2f} GB target",
                               now_gb)]
        out: list[Suggestion] = []
        micro = largest_micro_batch(shape, current, budget, limit=current.micro_batch)
        if micro:
            factor = current.micro_batch / micro
            out.append(Suggestion({"per_device_train_batch_size": micro},
                                  f"~{now_gb:.2f} GB now; multiply gradient_accumulation_steps by {factor:g} to "
                                  "keep the effective batch", estimate(shape, replace(current, micro_batch=micro))
                                  .total / GiB))
        else:
            for alternative in what_would_fit(shape, current, budget):
                out.append(Suggestion({**alternative.changes, "per_device_train_batch_size": 1},
                                      f"~{now_gb:.2f} GB now, over the {self.target_gpu_memory_gb:.2f} GB target",
                                      alternative.total / GiB))
            if not out:
                out.append(Suggestion({}, f"~{now_gb:.2f} GB even at micro-batch 1 with 4-bit weights and short "
                                          "sequences: use a smaller model or a larger GPU", now_gb))
        return out

    def _plan_inputs(self, model: Any, config: Any, overrides: dict[str, Any]) -> tuple[ModelShape, TrainSettings]:
        model = model if model is not None else self.model
        config = config if config is not None else self.config
        if model is None:
            raise ValueError("give a model (alias, folder, config.json dict or transformers model) to estimate")
        train_config = _train_config(config)
        catalogue = ModelCatalogue(self.workspace)
        if isinstance(model, ResolvedModel):
            resolved = model
        elif isinstance(model, str | Path):
            resolved = catalogue.resolve(str(model))
        else:
            raw = model if isinstance(model, dict) else model.config.to_dict()
            family = raw.get("model_type")
            resolved = ResolvedModel("in-memory model", "in-memory model", "local", None, family,
                                     target_modules=catalogue.families.get(family or "", {}).get("target_modules"),
                                     config=raw)
        shape = require_shape(resolved)
        if train_config.task_type is None:
            train_config.task_type = "classification" if shape.encoder else "chat"
        # The target is GPU memory: plan for a GPU unless the CPU was asked for.
        device = "cpu" if self._requested_device == "cpu" else "cuda"
        return shape, replace(settings_for(train_config, resolved, device=device), **overrides)


def _train_config(config: TrainConfig | dict[str, Any] | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return replace(config)
    return TrainConfig(**{key: coerce_value(key, value, "MemoryOptimizer config")
                          for key, value in (config or {}).items()})
