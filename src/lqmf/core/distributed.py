"""Several GPUs: how many, which strategy, and the checks that must pass before any process starts.

No torch here: the engine passes in what it sees (visible GPUs, dtypes) and these functions decide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lqmf.core.errors import InputError

# The environment a launcher (torch.distributed.run, accelerate launch) gives each process.
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
QUANT_STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Topology:
    """Where this process stands in a run: rank 0 of 1 without a launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> Topology:
        env = os.environ if env is None else env
        if not all(name in env for name in RANK_VARS):
            return cls()
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))


def requested_gpus(value: str | int | None, visible: int, device: str = "auto") -> int:
    """How many processes `--gpus` / `gpus:` asks for (1 when not given), checked against the visible GPUs.

    One GPU means one GPU: without the setting a run uses one device however many are visible.
    """
    if value is None or str(value).strip() == "":
        return 1
    text = str(value).strip().lower()
    if text == "all":
        if visible < 1:
            raise InputError("gpus=all: torch sees no CUDA GPU on this machine")
        return visible
    try:
        count = int(text)
    except ValueError:
        raise InputError(f"gpus must be a number of GPUs or 'all', got {value!r}") from None
    if count < 1:
        raise InputError(f"gpus must be at least 1, got {count}")
    if count > 1 and device == "cpu":
        return count  # several CPU processes (gloo): how the suite checks the distributed loop
    if count > visible:
        hint = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={hint})" if hint is not None else ""
        raise InputError(f"gpus={count} asks for more GPUs than the {visible} visible{where}")
    return count


def check_batch_split(effective_batch: int, world_size: int) -> None:
    """Each process takes an equal share of every optimizer step's examples."""
    if effective_batch % world_size:
        raise InputError(
            f"the effective batch ({effective_batch} = per_device_train_batch_size x gradient_accumulation_steps) "
            f"must divide evenly over gpus={world_size}; change gradient_accumulation_steps")


def quant_storage_for(setting: str, sharded: bool, compute_dtype: str) -> str:
    """bnb_4bit_quant_storage to load with: auto is the compute dtype under FSDP, uint8 otherwise."""
    if setting != "auto":
        return setting
    return compute_dtype if sharded else "uint8"


def check_fsdp_settings(quant_storage: str, mixed_precision: str, lora_dtype: str, lora_wrapped_apart: bool) -> None:
    """FSDP-QLoRA's known traps, caught before launch with the setting named.

    FSDP flattens each unit's parameters into one tensor of one floating dtype: 4-bit weights stored
    as uint8 fail with "Cannot flatten integer dtype tensors", and LoRA weights of another dtype in
    the same unit fail with "Must flatten tensors with uniform dtype".
    """
    if quant_storage != mixed_precision:
        raise InputError(
            f"bnb_4bit_quant_storage={quant_storage} must equal the FSDP mixed-precision dtype {mixed_precision} "
            f"(FSDP cannot flatten {'integer' if quant_storage == 'uint8' else 'mixed'} dtype tensors); "
            f"set bnb_4bit_quant_storage={mixed_precision} or auto")
    if lora_dtype != quant_storage and not lora_wrapped_apart:
        raise InputError(
            f"LoRA weights in {lora_dtype} share FSDP units with 4-bit storage in {quant_storage} (FSDP must flatten "
            f"tensors of one dtype); wrap LoRA layers apart or set bnb_4bit_quant_storage={lora_dtype}")
