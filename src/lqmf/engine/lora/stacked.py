"""Stacked multi-adapter LoRA: many adapters applied at once, each row of a batch by its adapter index.

An adapter is read from its folder (`read_adapter`) into {projection: (A, B, scaling)} and held as a
`StackedAdapter`; `BatchedLoRALinear` runs one group of projections that read the same input (q/k/v,
o, gate/up, down): the base matmul once for the batch (`stacked_base`: the group's weights stacked,
4-bit ones too; or, with LQMF_NF4_KERNEL=1, nf4.py's Triton kernel over the stacked 4-bit weight),
then each row's LoRA product, the A matrices of every adapter stacked and each row keeping its
adapter's rank-space columns. A combination `A+B` is one more adapter index whose A's are the parts'
A's stacked and whose B's carry each part's weight and scaling (`weighted_sum`). The decoder that
runs these layers is decode/batched.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lqmf.engine import compat
from lqmf.engine.loading import first_nonfinite
from lqmf.engine.lora import nf4


class UnsupportedAdapter(ValueError):
    """An adapter the batched decoder cannot apply (DoRA, rank patterns, embeddings...)."""

class NonFiniteWeights(ValueError):
    """Adapter weights holding NaN or an infinity (as stored, or once cast to the served dtype)."""

def check_finite(weights: dict[str, tuple], what: str) -> dict[str, tuple]:
    """weights ({projection: (A, B, scaling)}) if every matrix and scaling is finite; NonFiniteWeights otherwise."""
    for projection, (a, b, scaling) in weights.items():
        bad = first_nonfinite({"lora_A": a, "lora_B": b, "lora_B x scaling": b * scaling})
        if bad is not None or not math.isfinite(scaling):
            raise NonFiniteWeights(f"{what}: {projection} {bad or 'scaling'} holds NaN or infinite values "
                                   "(refused: it would answer nothing useful)")
    return weights

@dataclass
class StackedAdapter:
    """One adapter as the batched decoder holds it (the registry's record is `core.registry.AdapterEntry`):
    its LoRA weights per projection, on the model's device and dtype."""

    id: int
    name: str
    path: Path | None  # None for a combination of other entries
    weights: dict[str, tuple[Any, Any, float]]  # projection name -> (A [r, K], B [N, r], scaling)
    retired: bool = False  # unloaded or replaced: freed once no row uses it
    nbytes: int = 0

def read_adapter(path: Path, projections: dict[str, Any], device, dtype) -> dict[str, tuple]:
    """{projection: (A, B, scaling)} for the plain LoRA adapter folder at path."""
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise UnsupportedAdapter(f"{path}: {key} adapters are not served by the batched decoder")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnsupportedAdapter(f"{path}: rank_pattern/alpha_pattern adapters are not served by the batched decoder")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    state = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        module, kind = compat.saved_lora_key(key) or (None, None)
        if module not in projections:
            raise UnsupportedAdapter(f"{path}: weight '{key}' is not a LoRA matrix of a projection this decoder runs")
        pairs.setdefault(module, {})[kind] = tensor.to(dtype)
    weights = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UnsupportedAdapter(f"{path}: {module} lacks its lora_A or lora_B weight")
        weights[module] = (pair["A"].contiguous(), pair["B"].contiguous(), scaling)
    return check_finite(weights, str(path))

def stacked_base(modules: list) -> Callable[[Any], Any]:
    """One callable for the base layers of projections that read the same input, giving their outputs
    side by side [..., sum N]: one matmul where they can be stacked (plain nn.Linear of one dtype, or
    bitsandbytes 4-bit of one quantization; the layers keep their weights as views of the stacked
    ones, so no copy stays), else each layer in turn."""
    import torch

    if len(modules) == 1:
        return modules[0]
    stacked = compat.stack_4bit(modules)
    if stacked is not None:
        return nf4.stacked_matmul_4bit(*stacked, modules[0].compute_dtype)
    kinds = {(type(m), m.weight.dtype, m.weight.device, m.bias is None) for m in modules}
    if len(kinds) != 1 or next(iter(kinds))[0] is not torch.nn.Linear:
        return lambda x: torch.cat([m(x) for m in modules], dim=-1)
    weight = torch.cat([m.weight.data for m in modules])
    bias = None if modules[0].bias is None else torch.cat([m.bias.data for m in modules])
    start = 0
    for module in modules:
        end = start + module.out_features
        compat.repoint(module.weight, weight[start:end])
        if bias is not None:
            compat.repoint(module.bias, bias[start:end])
        start = end
    return lambda x: torch.nn.functional.linear(x, weight, bias)

class BatchedLoRALinear:
    """Projections that read one input (q/k/v, gate/up, or one alone) for a batch of rows: the base
    matmul once for all of them (`stacked_base`), plus each row's own adapter's product.

    The A matrices of every resident adapter, for every projection of the group, are stacked into one
    [sum r, K] tensor; each projection keeps its adapters' B matrices, times their scalings, as one
    [N, its r] tensor. Groups whose adapters have the same ranks share one `layout`: an
    [adapters + 1, sum r] boolean table whose row i is true in adapter i's rank-space columns (row 0:
    no adapter); the decoder selects each row's once per forward pass.
    """

    def __init__(self, names: tuple[str, ...], modules: list):
        bases = [getattr(module, "base_layer", module) for module in modules]
        self.names = names
        self.sizes = [base.out_features for base in bases]
        self.base = (nf4.nf4_base(bases) if nf4.switched_on() else None) or stacked_base(bases)
        self.stacked_a = None  # [sum r, K]
        self.parts: list[tuple[int, int, int, int, Any]] = []  # output columns, rank columns, B [N, r]
        self.layout: tuple | None = None

    def set_adapters(self, entries: list[StackedAdapter], layouts: dict[tuple, Any]) -> None:
        """Stack the weights that entries (index i + 1 each) hold for these projections; add the
        layout's table to layouts when new."""
        import torch

        a_list, self.parts, layout, rank_start, out_start = [], [], [], 0, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            mine = [(index + 1, entry.weights[name]) for index, entry in enumerate(entries) if name in entry.weights]
            layout.append(tuple((index, a.shape[0]) for index, (a, _, _) in mine))
            if mine:
                rank = sum(a.shape[0] for _, (a, _, _) in mine)
                a_list += [a for _, (a, _, _) in mine]
                self.parts.append((out_start, out_start + size, rank_start, rank_start + rank,
                                   torch.cat([b * scaling if scaling != 1 else b for _, (_, b, scaling) in mine],
                                             dim=1)))
                rank_start += rank
            out_start += size
        if not a_list:
            self.stacked_a = self.layout = None
            return
        self.stacked_a = torch.cat(a_list)
        self.layout = (len(entries), tuple(layout))
        if self.layout not in layouts:
            columns = torch.zeros(len(entries) + 1, rank_start, dtype=torch.bool, device=self.stacked_a.device)
            start = 0
            for index, rank in (adapter for part in layout for adapter in part):
                columns[index, start:start + rank] = True
                start += rank
            layouts[self.layout] = columns

    def __call__(self, x, selected: dict[tuple, Any]):
        """x: [B, T, K] -> [B, T, sum N]; selected: per layout, each row's rank-space columns [B, 1, sum r]."""
        import torch

        out = self.base(x)
        if self.stacked_a is None:
            return out
        low = torch.where(selected[self.layout], x @ self.stacked_a.t(), 0).view(-1, self.stacked_a.shape[0])
        flat = out.view(-1, out.shape[-1])
        for out_start, out_end, rank_start, rank_end, b in self.parts:
            flat[:, out_start:out_end].addmm_(low[:, rank_start:rank_end], b.t())
        return out



def weighted_sum(parts: list[tuple[dict[str, tuple], float]]) -> dict[str, tuple]:
    """{projection: (A, B, 1.0)} applying sum_i weight_i * scaling_i * B_i A_i, from each adapter's
    {projection: (A, B, scaling)} and its weight: one more adapter index for a combination A+B."""
    import torch

    combined: dict[str, tuple] = {}
    for projection in sorted({name for weights, _ in parts for name in weights}):
        pieces = [(weights[projection], weight) for weights, weight in parts if projection in weights]
        a = torch.cat([a for (a, _, _), _ in pieces])
        b = torch.cat([b * (weight * scaling) for (_, b, scaling), weight in pieces], dim=1)
        combined[projection] = (a, b, 1.0)
    return combined
