"""FSDP-QLoRA: the 4-bit base sharded over the GPUs, as PEFT and Answer.AI's fsdp_qlora set it up.

4-bit weights load with `bnb_4bit_quant_storage` equal to the compute dtype, so that FSDP can
flatten them; every trainable leaf (LoRA A and B, a classification head) is an FSDP unit of its
own, so fp32 LoRA weights never share a flat tensor with bf16 storage; each transformer block is
a unit; `use_orig_params=False`. LQMF's lean LoRA forward and activation offload stay off under
FSDP (they read weights outside the module calls that gather them).
"""

from __future__ import annotations

import functools
from typing import Any

from lqmf.core.distributed import check_fsdp_settings
from lqmf.core.errors import RuntimeFailure
from lqmf.engine.compat import no_split_module_names


def _trainable_leaf(module) -> bool:
    children = next(module.children(), None)
    weight = getattr(module, "weight", None)
    return children is None and weight is not None and weight.requires_grad


def _block_classes(model) -> set[type]:
    names = no_split_module_names(model)
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_model(model, compute_dtype) -> None:
    """The FSDP traps on the real modules, before wrapping: 4-bit storage and LoRA dtypes."""
    storage = next((p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"), None)
    lora = next((p.dtype for p in model.parameters() if p.requires_grad), None)
    if storage is not None:
        check_fsdp_settings(_dtype_name(storage), _dtype_name(compute_dtype), _dtype_name(lora or storage),
                            lora_wrapped_apart=True)


def wrap(model, device, compute_dtype):
    """model (a PEFT model, LoRA applied) sharded over the process group."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy, transformer_auto_wrap_policy

    check_model(model, compute_dtype)
    leaves = functools.partial(lambda_auto_wrap_policy, lambda_fn=_trainable_leaf)
    blocks = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_block_classes(model))

    def policy(module, recurse: bool, nonwrapped_numel: int) -> bool:
        return leaves(module, recurse, nonwrapped_numel) or blocks(module, recurse, nonwrapped_numel)

    device_id = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=device_id, use_orig_params=False,
                                    sharding_strategy=ShardingStrategy.FULL_SHARD, limit_all_gathers=True)


def adapter_keys(model) -> dict[str, str]:
    """{parameter name: the key PEFT saves it under} for model's trainable weights, read before FSDP
    wraps the model (PEFT finds its layers by module names, which FSDP changes)."""
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(model)
    adapter = f".{model.active_adapter}."
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    keys = {name: name.replace(adapter, ".") for name in trainable if name.replace(adapter, ".") in saved}
    if len(keys) != len(trainable):
        missing = next(name for name in trainable if name not in keys)
        raise RuntimeFailure(f"strategy=fsdp cannot save the trained weight {missing} as PEFT names it (a "
                             "classification head?); use strategy=ddp")
    return keys


def trainable_state_dict(sharded, keys: dict[str, str]) -> dict[str, Any]:
    """The trainable weights, whole, keyed as PEFT saves them (keys: adapter_keys before wrapping);
    a collective: every rank calls it."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    prefix = "_fsdp_wrapped_module."
    out: dict[str, Any] = {}
    for name, unit in sharded.named_modules():
        if not isinstance(unit, FullyShardedDataParallel) or not _trainable_leaf(unit.module):
            continue
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for key, tensor in unit.module.state_dict().items():
                full = f"{name.replace(prefix, '')}.{key}"
                if full in keys:
                    out[keys[full]] = tensor.detach().cpu().clone()
    if len(out) != len(keys):
        raise RuntimeError(f"FSDP gathered {len(out)} of the adapter's {len(keys)} weights")
    return out


def optimizer_state(sharded, optimizer) -> dict[str, Any]:
    """The optimizer's state, whole (a collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.optim_state_dict(sharded, optimizer)


def load_optimizer_state(sharded, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    optimizer.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(sharded, optimizer, state))


def clip_grad_norm(sharded, max_norm: float):
    return sharded.clip_grad_norm_(max_norm)
