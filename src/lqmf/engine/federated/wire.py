"""What every side shares: the run's fixed settings, Flower's import, adapter tensors on the wire."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from lqmf.core.errors import InputError

# TrainConfig keys the server decides for every site (a site may set the others with --set).
SITE_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "head_learning_rate",
             "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "seed")
# A round trains a fixed number of steps from the global adapter: no warm-up, no decay, no local validation.
ROUND_SETTINGS = {"validation_split": 0.0, "eval_strategy": "no", "eval_at_start": False, "warmup_ratio": 0.0,
                  "lr_scheduler_type": "constant", "save_steps": 0}

Progress = Callable[[str], None]


class SiteRefused(InputError):
    """This site cannot join the server's run (another base model, task or label set)."""


def flower():
    """Import Flower with its telemetry off and its log at errors only (LQMF_DEBUG: all of it)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import flwr

    debug = os.environ.get("LQMF_DEBUG", "") not in ("", "0", "false")
    logging.getLogger("flwr").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    return flwr


# ----------------------------------------------------------------------------- tensors on the wire


def encode(arrays: list[Any], transport: str) -> list[Any]:
    """fp32 as is; bf16 as its 16-bit patterns (numpy has no bfloat16), half the bytes."""
    import numpy as np

    if transport == "fp32":
        return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
            for a in arrays]


def decode(arrays: list[Any], transport: str) -> list[Any]:
    import numpy as np

    if transport == "fp32":
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    import torch

    return [torch.from_numpy(np.array(a, dtype=np.int16)).view(torch.bfloat16).float().numpy() for a in arrays]


def adapter_arrays(model, keys: list[str] | None = None) -> tuple[list[str], list[Any]]:
    """The PEFT adapter state (LoRA pairs and a trained classifier head) as float32 arrays, in key order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    keys = keys or sorted(state)
    return keys, [state[k].detach().float().cpu().numpy() for k in keys]


def load_arrays(model, keys: list[str], arrays: list[Any]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)})


def payload_bytes(parameters) -> int:
    """Bytes of a Flower Parameters message's tensors (what crosses the network, less gRPC framing)."""
    return sum(len(tensor) for tensor in parameters.tensors)
