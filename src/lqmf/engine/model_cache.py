"""The model a long-lived process keeps loaded between commands (`lqmf shell`); importing this imports no torch.

The model kept is an `inference.InferenceModel`; this module stays below inference.py (which asks it
first), so it names that class only in words."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lqmf.core.registry import AdapterEntry

InferenceModel = Any  # lqmf.engine.inference.InferenceModel


class KeptModel:
    """The one adapter model a long-lived process (`lqmf shell`) keeps loaded between commands.

    Off until `keep()` turns it on: a one-shot command loads, answers and exits. While on,
    `load_for_inference` of an adapter whose base, task, device, quantization and labels match the
    kept model's returns that model (adding the adapter beside the ones already resident) instead of
    loading the base again; anything else replaces it, so at most one base stays in memory.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.report: Callable[[str], None] = lambda message: None
        self.key: tuple | None = None
        self.model: InferenceModel | None = None
        self.resident: dict[str, str] = {}  # adapter -> its folder and created stamp when attached
        self.loads = 0
        self.reuses = 0
        self.last_reused = False

    def keep(self, report: Callable[[str], None] | None = None) -> None:
        self.enabled = True
        if report is not None:
            self.report = report

    def release(self) -> None:
        """Forget the kept model (its memory goes with the last reference)."""
        if self.model is not None:
            device = self.model.loaded.device
            self.key, self.model, self.resident = None, None, {}
            gc.collect()
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()

    def lookup(self, key: tuple, entry: AdapterEntry,
               attach: Callable[[InferenceModel, Path, str], None]) -> InferenceModel | None:
        """The kept model with entry's adapter resident (attach(model, path, name) adds it when new),
        or None (and nothing kept) when it does not match."""
        if not self.enabled or self.model is None:
            return None
        stamp = _adapter_stamp(entry)
        if self.key != key or self.resident.get(entry.name, stamp) != stamp:  # other base, or retrained
            self.release()
            return None
        if entry.name not in self.resident:
            attach(self.model, entry.path, entry.name)
            self.resident[entry.name] = stamp
        self.reuses += 1
        self.last_reused = True
        self.report(f"reusing the model loaded in this process: {self.model.base.display_name} with "
                    f"{', '.join(self.resident)} ({self.loads} load{'s' if self.loads != 1 else ''}, "
                    f"{self.reuses} reuse{'s' if self.reuses != 1 else ''})")
        return self.model

    def store(self, key: tuple, entry: AdapterEntry, model: InferenceModel) -> None:
        if self.enabled:
            self.key, self.model, self.resident = key, model, {entry.name: _adapter_stamp(entry)}
            self.loads += 1


def _adapter_stamp(entry: AdapterEntry) -> str:
    return f"{entry.path}@{entry.manifest.get('created')}"


KEPT = KeptModel()
