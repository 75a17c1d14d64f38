"""LQMF: the Local Quantized Model Factory.

`from lqmf import MemoryOptimizer` and `from lqmf import train` work without importing anything heavy
up front: public names load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MemoryOptimizer", "TrainResult", "__version__", "train"]

_LAZY = {"MemoryOptimizer": "lqmf.memory", "TrainResult": "lqmf.engine.train.run"}
RANK_ENTRY = "lqmf.cli.rank"  # what each process of a multi-GPU run starts as (`python -m`)


def train(config: Any, workspace: Any = None, **options: Any) -> Any:
    """Train a LoRA/QLoRA adapter and register it (lqmf.engine.train.run.train); returns its TrainResult."""
    from lqmf.engine.train.run import train as train_run

    options.setdefault("rank_entry", RANK_ENTRY)
    return train_run(config, workspace, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lqmf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
