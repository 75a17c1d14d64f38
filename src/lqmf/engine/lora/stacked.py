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
from dataclasses import dataclass, field
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
    all zeros): a [slots + 1, projections x rank, K] table of A's and a [sum N, slots + 1, rank] table
    of B's times their scalings, every adapter padded with zeros to the table's rank. A row's product
    reads its adapter's slices (`kernels.rows_product_into`). The tables are allocated for a number of
    slots at once, so an adapter loads into a free slot in place (`put`): the tables stay where they
    are, and with them the CUDA graphs that read them."""

    a: Any
    b: Any
    rank: int
    spans: list[tuple[int, int]]  # each projection's output columns
    occupied: set[int] = field(default_factory=set)  # the slots holding an adapter

    @property
    def slots(self) -> int:
        return self.a.shape[0] - 1

    @property
    def leading(self) -> int:
        """Indices 0 .. the highest occupied slot: what a product over every adapter must multiply."""
        return max(self.occupied, default=0) + 1

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    @property
    def fits_kernels(self) -> bool:
        from lqmf.engine.lora.kernels import TABLE_BLOCK_N

        return len(self.spans) <= 3 and all(start % TABLE_BLOCK_N == 0 for start, _ in self.spans) and (
            self.spans[-1][1] % TABLE_BLOCK_N == 0)

    def takes(self, index: int, names: tuple[str, ...], entry: StackedAdapter) -> bool:
        """Whether `put` can write entry's weights for names at index: a slot the tables have, ranks they hold."""
        return 0 < index <= self.slots and all(entry.weights[name][0].shape[0] <= self.rank
                                               for name in names if name in entry.weights)

    def clear(self, index: int) -> None:
        """Zero slot index: what a row without that adapter multiplies by zero must stay finite (0 x NaN)."""
        self.a[index].zero_()
        self.b[:, index].zero_()
        self.occupied.discard(index)

    def put(self, index: int, names: tuple[str, ...], entry: StackedAdapter) -> None:
        """Write entry's weights for names (B with its scaling in) into slot index, zeros elsewhere in the
        slot; entry's weights for names become views of the tables, so one copy stays on the device."""
        self.clear(index)
        self.occupied.add(index)
        for number, name in enumerate(names):
            if name not in entry.weights:
                continue
            a, b, scaling = entry.weights[name]
            a_view = self.a[index, number * self.rank:number * self.rank + a.shape[0]]
            b_view = self.b[self.spans[number][0]:self.spans[number][1], index, :b.shape[1]]
            a_view.copy_(a)
            b_view.copy_(b * scaling if scaling != 1 else b)
            entry.weights[name] = (a_view, b_view, 1.0)


def adapter_tables(names: tuple[str, ...], sizes: list[int], entries: dict[int, StackedAdapter],
                   slots: int = 0) -> AdapterTables | None:
    """Tables of at least `slots` slots holding entries' weights for these projections, entry at its
    index (1 up); None if none has any. Each entry's weights for these projections become views of
    the tables (`AdapterTables.put`)."""
    import torch

    held = [(entry.weights[name][0], entry.weights[name][1]) for entry in entries.values()
            for name in names if name in entry.weights]
    if not held:
        return None
    rank = max(a.shape[0] for a, _ in held)
    first = held[0][0]
    spans = [(sum(sizes[:number]), sum(sizes[:number + 1])) for number in range(len(names))]
    count = max(slots, *entries)
    tables = AdapterTables(torch.zeros(count + 1, len(names) * rank, first.shape[1], dtype=first.dtype,
                                       device=first.device),
                           torch.zeros(spans[-1][1], count + 1, rank, dtype=first.dtype, device=first.device),
                           rank, spans)
    for index, entry in entries.items():
        tables.put(index, names, entry)
    return tables


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

    def set_adapters(self, entries: dict[int, StackedAdapter], slots: int = 0) -> None:
        """Hold entries' weights for these projections, each entry at its adapter index, in new tables of
        at least `slots` slots."""
        self.tables = adapter_tables(self.names, self.sizes, entries, slots)

    def clear(self, index: int) -> None:
        """Zero slot index of the tables (an adapter left it)."""
        if self.tables is not None and index <= self.tables.slots:
            self.tables.clear(index)

    def put(self, index: int, entry: StackedAdapter) -> bool:
        """Write entry into slot index of the tables in place; False where they cannot take it (none yet
        though entry has weights here, no such slot, or a larger rank): then `set_adapters` must rebuild."""
        if self.tables is None:
            return not any(name in entry.weights for name in self.names)
        if not self.tables.takes(index, self.names, entry):
            return False
        self.tables.put(index, self.names, entry)
        return True

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
