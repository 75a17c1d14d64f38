"""Rough training-time estimates from a model's config.json, before any weights load."""

from __future__ import annotations

from typing import Any

from lqmf.core.memory_plan import approx_parameters

# Sustained training throughput assumed for the estimate (FLOP/s): deliberately round numbers.
ASSUMED_THROUGHPUT = {"cpu (2 cores)": 1.0e11, "8 GB GPU": 1.0e13}


def estimate_train_seconds(config: dict[str, Any], tokens: float, checkpointing: bool) -> dict[str, float]:
    """{hardware: seconds} for training on `tokens` tokens.

    A frozen base needs no weight gradients: about 4 FLOPs per parameter per token (forward and
    input-gradient backward), 6 when gradient checkpointing recomputes the forward pass.
    """
    params = approx_parameters(config)
    if params is None:
        return {}
    flops = (6 if checkpointing else 4) * params * tokens
    return {name: flops / rate for name, rate in ASSUMED_THROUGHPUT.items()}
