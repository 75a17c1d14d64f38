"""LQMF: the Local Quantized Model Factory.

`from lqmf import MemoryOptimizer` and `from lqmf import train` work without importing anything heavy
up front: public names load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MemoryOptimizer", "TrainResult", "__version__", "train"]

_LAZY = {"MemoryOptimizer": "lqmf.memory", "train": "lqmf.engine.service", "TrainResult": "lqmf.engine.service"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lqmf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
