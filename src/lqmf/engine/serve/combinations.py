"""Per-request combinations of resident adapters on `lqmf serve`: a request's model may be `A+B`
(both applied in full) or `A:0.7+B:0.3` (weighted).

The first request for a combination builds it once, exactly (the weighted sum of the adapters'
updates, any ranks: PEFT's add_weighted_adapter with `cat`), and later requests reuse it: with
continuous batching, an adapter entry of the scheduler whose A matrices are the adapters' A's
stacked and whose B's carry each adapter's weight and scaling (so its rows batch with any other);
one request at a time, a PEFT slot of its own. A combination is rebuilt when one of its adapters
was reloaded, and the least recently used is freed beyond MAX_CACHED.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from lqmf.core.derived import check_weight
from lqmf.core.errors import ConflictError, InputError, NotFoundError, did_you_mean
from lqmf.engine import inference

SEPARATOR = "+"
WEIGHT_MARK = ":"
MAX_CACHED = 4


def is_combination(model_id: str | None) -> bool:
    return bool(model_id) and SEPARATOR in model_id


def names(model_id: str | None) -> list[str]:
    """The adapters a model id uses: none for the base, one, or a combination's."""
    if not model_id:
        return []
    return [name for name, _ in parse(model_id)] if is_combination(model_id) else [model_id]


def stacked_weights(parts: list[tuple[dict[str, tuple], float]], model_id: str = "") -> dict[str, tuple]:
    """{projection: (A, B, 1.0)} applying sum_i weight_i * scaling_i * B_i A_i (lora.stacked.weighted_sum),
    from each adapter's {projection: (A, B, scaling)} and its weight; refused (InputError) where the
    weighted B overflows."""
    from lqmf.engine.lora.stacked import NonFiniteWeights, check_finite, weighted_sum

    try:
        return check_finite(weighted_sum(parts), f"model '{model_id}'")
    except NonFiniteWeights as err:
        raise InputError(str(err)) from None


def parse(model_id: str) -> list[tuple[str, float]]:
    """'A+B' -> [(A, 1.0), (B, 1.0)]; 'A:0.7+B:0.3' -> [(A, 0.7), (B, 0.3)]."""
    parts = []
    for part in model_id.split(SEPARATOR):
        name, mark, weight = part.strip().partition(WEIGHT_MARK)
        try:
            value = float(weight) if mark else 1.0
        except ValueError:
            raise InputError(f"model '{model_id}': '{weight}' is not a weight (write A:0.7+B:0.3)") from None
        check_weight(value, f"model '{model_id}'")
        if not name:
            raise InputError(f"model '{model_id}': an adapter name is empty (write A+B or A:0.7+B:0.3)")
        parts.append((name, value))
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise InputError(f"model '{model_id}' names an adapter twice")
    return parts


@dataclass
class Built:
    slot: str | None  # the PEFT slot (one request at a time)
    sources: tuple  # the ResidentAdapter records it was built from
    used: float
    entry: object = None  # the scheduler's StackedAdapter (continuous batching)


class Combinations:
    """The combinations built on one host, by model id."""

    def __init__(self, host: Any):  # the host.ModelHost that owns them (host.py imports this module)
        self.host = host
        self.built: dict[str, Built] = {}
        self._slots = itertools.count()

    def check(self, model_id: str) -> str:
        """The model id if every adapter it names is resident and the task allows it (no model work)."""
        if self.host.model.task == "classification":
            raise InputError(f"model '{model_id}': classification adapters each carry their own trained head; "
                             "only text-generation adapters combine")
        for name, _ in parse(model_id):
            if name not in self.host.resident:
                try:  # an adapter this server could never load: say why, not "load it first"
                    self.host.check_loadable(name)
                except (ConflictError, InputError) as err:
                    raise type(err)(f"model '{model_id}': {err.message}", exit_code=err.exit_code) from None
                except NotFoundError:
                    pass  # not registered at all: say what is resident
                raise NotFoundError(f"model '{model_id}': adapter '{name}' is not resident here"
                                    f"{did_you_mean(name, self.host.resident)}; load it first")
        return model_id

    def _cached(self, model_id: str) -> tuple[Built | None, list[tuple[str, float]], tuple]:
        """(the built combination when still current, its parts, its sources); makes room otherwise."""
        self.check(model_id)
        parts = parse(model_id)
        sources = tuple(self.host.resident[name] for name, _ in parts)
        cached = self.built.get(model_id)
        if cached is not None and cached.sources == sources:
            cached.used = time.monotonic()
            return cached, parts, sources
        if cached is not None:
            self._free(model_id)
        while len(self.built) >= MAX_CACHED:
            self._free(min(self.built, key=lambda key: self.built[key].used))
        return None, parts, sources

    def entry(self, model_id: str):
        """The scheduler entry applying the combination (built now if it is new or an adapter was reloaded)."""
        cached, parts, sources = self._cached(model_id)
        if cached is not None:
            return cached.entry
        weighted = [(source.entry.weights, weight) for source, (_, weight) in zip(sources, parts, strict=True)]
        entry = self.host.scheduler.add_adapter(model_id, None, weights=lambda: stacked_weights(weighted, model_id))
        self.built[model_id] = Built(None, sources, time.monotonic(), entry)
        return entry

    def slot(self, model_id: str) -> str:
        """The PEFT slot holding the combination (built now if it is new or an adapter was reloaded)."""
        cached, parts, sources = self._cached(model_id)
        if cached is not None:
            return cached.slot
        slot = f"combo{next(self._slots)}_"
        model = self.host.model
        model.model.add_weighted_adapter([s.slot for s in sources], [w for _, w in parts], slot,
                                         combination_type="cat")
        model.model.eval()  # the new slot's dropout modules start in training mode
        model.adapters.append(slot)
        self.built[model_id] = Built(slot, sources, time.monotonic())
        return slot

    def _free(self, model_id: str) -> None:
        built = self.built.pop(model_id)
        if built.entry is not None:
            self.host.scheduler.retire(built.entry)  # its weights stay until its last request ends
        else:
            inference.detach_adapter(self.host.model, built.slot)
