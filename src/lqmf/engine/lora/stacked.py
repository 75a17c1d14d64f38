"""Stacked multi-adapter LoRA: many adapters applied at once, each row of a batch by its adapter index.

An adapter is read from its folder (`read_adapter`) into {projection: (A, B, scaling)} and held as a
`StackedAdapter`; `BatchedLoRALinear` runs one group of projections that read the same input (q/k/v,
o, gate/up, down): the base matmul once for the batch (`stacked_base`: the group's weights stacked,
4-bit ones too; or, on a GPU unless LQMF_NF4_KERNEL=0, nf4.py's Triton kernel over the stacked 4-bit weight),
then each row's LoRA product from tables of every resident adapter's weights by adapter index
(`AdapterTables`; the kernels in lora/kernels.py read only a row's own adapter). A combination `A+B`
is one more adapter index whose A's are the parts' A's stacked and whose B's carry each part's
weight and scaling (`weighted_sum`). The decoder that runs these layers is decode/batched.py.
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

@dataclass
class AdapterTables:
    """Every resident adapter's LoRA weights for one group of projections, by adapter index (0: none,
    all zeros): a [adapters + 1, projections x rank, K] table of A's and a [sum N, adapters + 1, rank]
    table of B's times their scalings, every adapter padded with zeros to the group's largest rank.
    A row's product reads its adapter's slices (`kernels.rows_product_into`)."""

    a: Any
    b: Any
    rank: int
    spans: list[tuple[int, int]]  # each projection's output columns

    @property
    def fits_kernels(self) -> bool:
        from lqmf.engine.lora.kernels import TABLE_BLOCK_N

        return len(self.spans) <= 3 and all(start % TABLE_BLOCK_N == 0 for start, _ in self.spans) and (
            self.spans[-1][1] % TABLE_BLOCK_N == 0)


def adapter_tables(names: tuple[str, ...], sizes: list[int], entries: list[StackedAdapter]) -> AdapterTables | None:
    """The tables of entries' weights for these projections (entry i at index i + 1); None if none has any.

    Each entry's weights for these projections then become views of the tables (B with its scaling
    in, scaling 1), so one copy of an adapter stays on the device, not one in the entry and one here."""
    import torch

    held = [(index + 1, entry, number, entry.weights[name]) for index, entry in enumerate(entries)
            for number, name in enumerate(names) if name in entry.weights]
    if not held:
        return None
    rank = max(a.shape[0] for _, _, _, (a, _, _) in held)
    first = held[0][3][0]
    spans = [(sum(sizes[:number]), sum(sizes[:number + 1])) for number in range(len(names))]
    a_table = torch.zeros(len(entries) + 1, len(names) * rank, first.shape[1], dtype=first.dtype, device=first.device)
    b_table = torch.zeros(spans[-1][1], len(entries) + 1, rank, dtype=first.dtype, device=first.device)
    for index, entry, number, (a, b, scaling) in held:
        a_view = a_table[index, number * rank:number * rank + a.shape[0]]
        b_view = b_table[spans[number][0]:spans[number][1], index, :b.shape[1]]
        a_view.copy_(a)
        b_view.copy_(b * scaling if scaling != 1 else b)
        entry.weights[names[number]] = (a_view, b_view, 1.0)
    return AdapterTables(a_table, b_table, rank, spans)


class BatchedLoRALinear:
    """Projections that read one input (q/k/v, gate/up, or one alone) for a batch of rows: the base
    matmul once for all of them (`stacked_base`), plus each row's own adapter's product from the
    group's `AdapterTables` (per-row kernels in a decode step, GEMMs over every adapter otherwise)."""

    def __init__(self, names: tuple[str, ...], modules: list):
        bases = [getattr(module, "base_layer", module) for module in modules]
        self.names = names
        self.sizes = [base.out_features for base in bases]
        self.base = (nf4.nf4_base(bases) if nf4.switched_on() else None) or stacked_base(bases)
        self.tables: AdapterTables | None = None

    def set_adapters(self, entries: list[StackedAdapter]) -> None:
        """Hold entries' weights for these projections (entry i at adapter index i + 1)."""
        self.tables = adapter_tables(self.names, self.sizes, entries)

    def __call__(self, x, rows):
        """x: [B, T, K] -> [B, T, sum N]; rows: each row's adapter index [B] (int64, 0: none)."""
        from lqmf.engine.lora.kernels import rows_product_into

        out = self.base(x)
        if self.tables is None:
            return out
        batch, length, width = x.shape
        per_token = rows if length == 1 else rows.repeat_interleave(length)
        rows_product_into(out.view(batch * length, -1), x.reshape(batch * length, width), per_token, self.tables)
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
