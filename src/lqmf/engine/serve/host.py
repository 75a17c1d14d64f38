"""A base model with resident, hot-swappable adapters: the model side of `lqmf serve`.

Model ids a request may name: an adapter's name (that adapter), the base's id (the bare base),
or `default` (the active adapter, or the bare base when none is active). `load`, `switch` and
`unload` change which adapters are resident and which is active:

- load NAME: make NAME resident beside the others (read from the registry) and active;
- switch NAME: make NAME active; one not yet resident replaces the active adapter in place
  (PEFT hot-swap into its weights when both fit, the fastest swap), so memory stays flat;
- unload [NAME]: drop NAME (default: the active one); with none active, `default` is the base.

The host has one code path; how requests reach the model is its `serving`, chosen once at start:

- `BatchedServing`: the continuous-batching scheduler (engine/serve/scheduler.py) over the batched
  decoder, when the model has the layout of engine/decode/batched.py and LQMF_FAST is not 0.
  `complete` may be called from many threads at once, each blocking until its own answer is done;
  adapters live in the scheduler, up to `max_adapters` of them (the least recently used is evicted
  beyond that, and reported). Swaps are serialized with the decode loop and never change a request
  already queued or running: it keeps the adapter it was submitted with.
- `SerialServing`: adapters are PEFT slots and every call that touches the model takes one lock, so
  requests run one at a time (`inference.generate`: the batched decoder as a batch of one where it
  runs, else transformers' generate): a classification model, an architecture the batched decoder
  does not run, LQMF_FAST=0, or batching turned off. A switch to a non-resident adapter replaces
  the active one in place, so memory stays flat.

`resident` and `active` are replaced, never mutated, so any thread may read them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lqmf.core.errors import ConflictError, InputError, NotFoundError, did_you_mean
from lqmf.core.models import ModelCatalogue, ResolvedModel
from lqmf.core.names import validate_name
from lqmf.core.registry import AdapterEntry, Registry
from lqmf.core.serving import DEFAULT_MAX_ADAPTERS, DEFAULT_MODEL
from lqmf.core.workspace import Workspace
from lqmf.engine import inference
from lqmf.engine.inference import Generation, InferenceModel
from lqmf.engine.loading import first_line, first_nonfinite
from lqmf.engine.serve import combinations as combined

log = logging.getLogger("lqmf.serve")
LOAD_WAIT_S = 60.0  # the longest a request waits for its adapter to be loaded


class PromptTooLong(InputError):
    """A prompt (or prompt plus answer) longer than the server allows."""


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    slot: str  # the PEFT adapter name holding its weights
    path: Path
    task: str
    labels: tuple[str, ...]
    trained_4bit: bool
    loaded: float = field(default_factory=time.time)
    entry: Any = None  # the scheduler's StackedAdapter (batched serving)


@dataclass
class SwapResult:
    action: str
    adapter: str | None
    method: str  # hotswap | load (a new slot) | resident (already loaded) | unload | none
    active: str | None
    previous: str | None
    resident: list[str]
    swap_ms: float
    notes: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "adapter": self.adapter, "method": self.method, "active": self.active,
                "previous": self.previous, "resident": self.resident, "swap_ms": round(self.swap_ms, 3),
                "notes": self.notes, "evicted": self.evicted}


def parse_adapter_spec(spec: str) -> tuple[str, Path | None]:
    """'NAME' (a registry adapter) or 'NAME=PATH' (an adapter folder the operator names)."""
    name, sep, path = spec.partition("=")
    validate_name(name)
    if not sep:
        return name, None
    if not path:
        raise InputError(f"--adapter {spec}: give a folder after '='")
    return name, Path(path).expanduser().resolve()


def is_generative(task: str) -> bool:
    return task != "classification"


def same_base(served: ResolvedModel, recorded: dict[str, Any], workspace: Workspace) -> bool:
    """Whether an adapter's recorded base model is the served one (by folder, hub id or alias)."""
    served_names = {served.reference, served.source, served.alias, str(served.path) if served.path else None}
    recorded_names = {recorded.get(k) for k in ("reference", "source", "path", "alias")}
    if (served_names & recorded_names) - {None}:
        return True
    try:
        again = ModelCatalogue(workspace).resolve(recorded["reference"])
    except (InputError, NotFoundError, KeyError):
        return False
    return served.path is not None and again.path == served.path


@dataclass
class BatchSettings:
    """How many sequences the scheduler decodes at once, how long each may be, how many may wait."""

    max_batch: int | None = None  # default: what fits max_memory on CUDA (at most DEFAULT_MAX_BATCH), else 8
    max_seq_len: int | None = None  # default: the model's context, at most DEFAULT_MAX_SEQ_LEN
    max_queue: int | None = None  # default: 4 x max_batch
    max_adapters: int = DEFAULT_MAX_ADAPTERS
    max_memory: int | None = None  # bytes; default: this process's GPU memory plus what is free
    # the LoRA shape the adapter tables are planned for (max_adapters + 1 slots): the largest rank and the
    # projections of the adapters given at start (`lora_plan`), else rank 16 on every linear layer
    adapter_rank: int = 16
    adapter_targets: tuple[str, ...] | None = None
    enabled: bool = True  # False: one request at a time, adapters as PEFT slots (as with LQMF_FAST=0)


DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_BATCH = 64
CPU_MAX_BATCH = 8


def default_max_batch(model: InferenceModel, settings: BatchSettings, seq_len: int) -> int:
    """The most sequences of seq_len tokens whose KV cache and working memory fit the budget (core.memory_plan)."""
    from lqmf.core.memory_plan import ModelShape, largest_serving_batch

    if model.loaded.device != "cuda":
        return CPU_MAX_BATCH
    import torch

    shape = ModelShape.from_config(model.model.config.to_dict())
    free, _ = torch.cuda.mem_get_info()
    budget = settings.max_memory or (torch.cuda.memory_allocated() + free)
    fitting = largest_serving_batch(shape, budget, seq_len=seq_len, quantize_4bit=model.loaded.quantized,
                                    device="cuda", **adapter_plan(settings)) if shape else 1
    if fitting < 1:
        raise InputError(f"not even one sequence of {seq_len} tokens fits {budget / 2**30:.2f} GB beside the model: "
                         "lower --max-seq-len or raise --max-memory")
    return min(fitting, DEFAULT_MAX_BATCH)


def adapter_plan(settings: BatchSettings) -> dict[str, Any]:
    """memory_plan.serving_estimate's options for the adapter tables (`adapter_tables_held`), each an
    adapter's size at the planned rank and projections."""
    from lqmf.core.memory_plan import adapter_tables_held

    return {"adapters": adapter_tables_held(settings.max_adapters), "lora_r": settings.adapter_rank,
            "target_modules": settings.adapter_targets}


def lora_plan(entries: list[AdapterEntry]) -> tuple[int, tuple[str, ...] | None] | None:
    """(largest rank, projections) of the adapters' LoRA settings as their manifests record them (which
    adapter_config.json must agree with, core/integrity.py), None where none records a rank; projections
    None where one adapts every linear layer ("all-linear") or records no list."""
    ranks: list[int] = []
    targets: set[str] | None = set()
    for entry in entries:
        rank, modules = entry.lora.get("r"), entry.lora.get("target_modules")
        if isinstance(rank, bool) or not isinstance(rank, int):
            continue
        ranks.append(rank)
        if targets is not None and isinstance(modules, list):
            targets |= set(modules)
        else:
            targets = None
    if not ranks:
        return None
    return max(ranks), (tuple(sorted(targets)) if targets else None)


def planned_adapter_bytes(model: InferenceModel, settings: BatchSettings) -> int | None:
    """What the memory plan sets aside for the adapter tables (`adapter_plan`); None for a model whose
    shape it does not know."""
    from lqmf.core.memory_plan import ModelShape, serving_adapter_bytes

    shape = ModelShape.from_config(model.model.config.to_dict())
    if shape is None:
        return None
    return serving_adapter_bytes(shape, device="cuda" if model.loaded.device == "cuda" else "cpu",
                                 **adapter_plan(settings))


class ModelHost:
    """The served base model, its resident adapters and the active one."""

    def __init__(self, workspace: Workspace, model: InferenceModel, *, operator_paths: dict[str, Path] | None = None,
                 max_new_tokens: int = 512, max_prompt_tokens: int | None = None,
                 batching: BatchSettings | None = None):
        self.workspace = workspace
        self.model = model
        self.base_id = model.base.display_name
        self.operator_paths = dict(operator_paths or {})
        self.context_length = inference.context_length(model)
        limits = [n for n in (max_prompt_tokens, self.context_length) if n]
        self.max_prompt_tokens = min(limits) if limits else None
        self.max_new_tokens = max_new_tokens
        self.resident: dict[str, ResidentAdapter] = {}
        self.active: str | None = None
        self.swap_lock = threading.RLock()  # swaps (and, serving serially, every model call) one at a time
        self._used: dict[str, float] = {}  # adapter -> when a request or swap last named it
        self.evictions: list[dict[str, Any]] = []
        self.batching = batching or BatchSettings()
        self.serving: BatchedServing | SerialServing = BatchedServing.start(self) or SerialServing(self)
        self.combinations = combined.Combinations(self)  # model ids like A+B (engine/serve/combinations.py)

    @property
    def scheduler(self):
        """The continuous-batching scheduler; None when serving one request at a time."""
        return self.serving.scheduler

    def close(self) -> None:
        self.serving.close()

    @classmethod
    def start(cls, workspace: Workspace, *, base: str | None = None, adapters: list[str] = (), device: str = "auto",
              quantize_4bit: bool | None = None, max_new_tokens: int = 512,
              max_prompt_tokens: int | None = None, batching: BatchSettings | None = None) -> ModelHost:
        """Load the base once (given, or the first adapter's) and the adapters; the first becomes active."""
        specs = [parse_adapter_spec(spec) for spec in adapters]
        operator_paths = {name: path for name, path in specs if path is not None}
        first = _entry(workspace, specs[0][0], operator_paths) if specs else None
        if base is not None:
            resolved = ModelCatalogue(workspace).resolve(base)
        elif first is not None:
            resolved = inference.adapter_base(workspace, first)
        else:
            raise InputError("give a base model (--model) or at least one adapter (--adapter)")
        task = first.manifest["task"] if first is not None else "chat"
        if quantize_4bit is None:
            quantize_4bit = bool(first and first.manifest.get("runtime", {}).get("quantized_4bit"))
        planned = lora_plan([_entry(workspace, name, operator_paths) for name, _ in specs])
        if planned is not None:
            batching = replace(batching or BatchSettings(), adapter_rank=planned[0], adapter_targets=planned[1])
        model = inference.load_for_inference(workspace, None, base=resolved, task=task, device=device,
                                             quantize_4bit=quantize_4bit,
                                             labels=inference.labels_of(first) if first is not None else None)
        host = cls(workspace, model, operator_paths=operator_paths, max_new_tokens=max_new_tokens,
                   max_prompt_tokens=max_prompt_tokens, batching=batching)
        for index, (name, _) in enumerate(specs):
            host.load(name, activate=index == 0)
        return host

    # -- what is served (safe from any thread) ------------------------------------------------

    def model_ids(self) -> list[dict[str, Any]]:
        resident, active = self.resident, self.active
        rows = [{"id": DEFAULT_MODEL, "kind": "default", "adapter": active, "task": self.model.task},
                {"id": self.base_id, "kind": "base", "adapter": None, "task": self.model.task}]
        rows += [{"id": name, "kind": "adapter", "adapter": name, "task": a.task, "created": int(a.loaded)}
                 for name, a in resident.items()]
        return rows

    def describe(self) -> dict[str, Any]:
        state = {"base": self.base_id, "base_reference": self.model.base.reference, "task": self.model.task,
                 "device": self.model.loaded.device, "dtype": self.model.loaded.dtype,
                 "quantized_4bit": self.model.loaded.quantized, "active": self.active,
                 "resident": list(self.resident), "context_length": self.context_length,
                 "max_prompt_tokens": self.max_prompt_tokens, "max_new_tokens": self.max_new_tokens,
                 "max_adapters": self.serving.max_adapters, "evictions": self.evictions[-20:],
                 "batching": self.serving.describe()}
        if self.model.loaded.device == "cuda":
            import torch

            state["gpu_memory_gb"] = {"allocated": torch.cuda.memory_allocated() / 2**30,
                                      "peak_allocated": torch.cuda.max_memory_allocated() / 2**30,
                                      "reserved": torch.cuda.memory_reserved() / 2**30,
                                      "peak_reserved": torch.cuda.max_memory_reserved() / 2**30}
        return state

    @property
    def captures_graphs(self) -> bool:
        """Whether the serving replays CUDA graphs (the batched decoder on a GPU)."""
        return self.serving.captures_graphs

    def capture_graphs(self) -> int:
        """Capture the batched decoder's CUDA graphs for every shape it serves, before the first request
        (a capture met while serving holds every row for a few hundred milliseconds); how many."""
        return self.serving.capture_graphs()

    def resolve(self, model_id: str | None, load: bool = False) -> str | None:
        """The adapter a request's model id selects (None: the bare base).

        load=True: a registered adapter that is not resident is loaded first, where the serving loads
        adapters on request (batched).
        """
        if model_id in (None, "", DEFAULT_MODEL):
            return self.active
        if model_id == self.base_id:
            return None
        if model_id in self.resident:
            return model_id
        if combined.is_combination(model_id):  # several resident adapters at once (engine/serve/combinations.py)
            return self.combinations.check(model_id)
        if load and self.serving.loads_on_request:
            try:
                _entry(self.workspace, model_id, self.operator_paths)
            except (NotFoundError, InputError):
                pass  # not an adapter that could be loaded: say what is served
            else:
                self.load(model_id, activate=False)
                return model_id
        known = [DEFAULT_MODEL, self.base_id, *self.resident]
        raise NotFoundError(f"model '{model_id}' is not served here{did_you_mean(model_id, known)}; "
                            f"served: {', '.join(known)}")

    # -- swaps ----------------------------------------------------------------------------------

    def load(self, name: str, activate: bool = True) -> SwapResult:
        with self.swap_lock:
            started = time.perf_counter()
            previous = self.active
            method, notes, evicted = "resident", [], []
            if name not in self.resident:
                adapter, notes = self._prepare(name)
                method = self.serving.add(adapter)
            if activate:
                self.active = name
            self._used[name] = time.monotonic()
            evicted = self._evict_over_budget()
            return self._result("load", name, method, previous, started, notes, evicted)

    def switch(self, name: str) -> SwapResult:
        """Make name active. Batched serving keeps the previous adapter resident (up to max_adapters);
        serving serially, a non-resident adapter replaces the active one in place, as its result says."""
        with self.swap_lock:
            started = time.perf_counter()
            previous = self.active
            if name in self.resident or previous is None or not self.serving.swaps_in_place:
                result = self.load(name)
                result.action, result.previous = "switch", previous
                return result
            return self.serving.replace_active(name, previous, started)

    def unload(self, name: str | None = None) -> SwapResult:
        with self.swap_lock:
            started = time.perf_counter()
            previous = self.active
            name = name or previous
            if name is None:
                return self._result("unload", None, "none", previous, started, ["no adapter is active"])
            if name not in self.resident:
                raise NotFoundError(f"adapter '{name}' is not loaded here{did_you_mean(name, self.resident)}")
            self._remove(name)
            if self.active == name:
                self.active = None
            return self._result("unload", name, "unload", previous, started, [])

    def _mark_used(self, names) -> None:
        for name in names:
            self._used[name] = time.monotonic()

    def _evict_over_budget(self) -> list[str]:
        """Unload the least recently used adapters beyond max_adapters (never the active one)."""
        evicted = []
        while self.serving.max_adapters is not None and len(self.resident) > self.serving.max_adapters:
            candidates = [name for name in self.resident if name != self.active]
            if not candidates:
                break
            name = min(candidates, key=lambda n: self._used.get(n, 0.0))
            self._remove(name)
            self._record_eviction(name, f"least recently used; at most {self.batching.max_adapters} resident")
            evicted.append(name)
        return evicted

    def _record_eviction(self, name: str, reason: str) -> None:
        log.warning("adapter '%s' is no longer resident: %s", name, reason)
        self.evictions.append({"adapter": name, "reason": reason, "time": round(time.time(), 3)})

    def check_loadable(self, name: str) -> None:
        """Raise what loading adapter name here would be refused with (reads nothing heavy)."""
        self._prepare(name)

    def _prepare(self, name: str) -> tuple[ResidentAdapter, list[str]]:
        """Check that an adapter may be served here; read nothing heavy."""
        if name in (DEFAULT_MODEL, self.base_id):
            raise ConflictError(f"adapter name '{name}' is the id of the served base or of the default model; "
                                "rename the adapter to serve it")
        entry = _entry(self.workspace, name, self.operator_paths)
        Registry(self.workspace).check_intact(entry)
        task = entry.manifest.get("task", "")
        if is_generative(task) != is_generative(self.model.task):
            kind = "text-generation" if is_generative(self.model.task) else "classification"
            raise ConflictError(f"adapter '{name}' is a {task} adapter; this server serves a {kind} model")
        recorded = entry.manifest.get("base_model") or {}
        if not same_base(self.model.base, recorded, self.workspace):
            raise ConflictError(f"adapter '{name}' was trained on base model '{recorded.get('reference')}'; "
                                f"this server serves '{self.model.base.reference}'")
        labels = tuple(inference.labels_of(entry))
        if not is_generative(task) and len(labels) != len(self.model.labels):
            raise ConflictError(f"adapter '{name}' has {len(labels)} labels; the served classification head has "
                                f"{len(self.model.labels)}")
        _check_weights_readable(entry)
        trained_4bit = bool(entry.manifest.get("runtime", {}).get("quantized_4bit"))
        notes = []
        if trained_4bit != self.model.loaded.quantized:
            notes.append(f"adapter '{name}' was trained on a {'4-bit' if trained_4bit else 'full-precision'} "
                         f"base; the served base is {'4-bit' if self.model.loaded.quantized else 'not 4-bit'}")
        return ResidentAdapter(name, "", entry.path, task, labels, trained_4bit), notes

    def _remove(self, name: str) -> None:
        adapter = self.resident[name]
        self._set_resident(name, None)
        self._used.pop(name, None)
        self.serving.remove(adapter)

    def _set_resident(self, name: str, adapter: ResidentAdapter | None) -> None:
        resident = {k: v for k, v in self.resident.items() if k != name}
        if adapter is not None:
            resident[name] = adapter
        self.resident = resident

    def _result(self, action: str, name: str | None, method: str, previous: str | None, started: float,
                notes: list[str], evicted: list[str] | None = None) -> SwapResult:
        return SwapResult(action, name, method, self.active, previous, list(self.resident),
                          (time.perf_counter() - started) * 1000, notes, list(evicted or []))

    # -- requests (any thread) ------------------------------------------------------------------

    def _slot(self, adapter: str | None) -> str | None:
        if combined.is_combination(adapter):  # built once per combination, on this (the model's) thread
            return self.combinations.slot(adapter)
        return self.resident[adapter].slot if adapter is not None else None

    def _entry_of(self, adapter: str | None) -> Any:
        """The scheduler's weights for adapter (a combination's built on first use); None for the base."""
        if adapter is None:
            return None
        if combined.is_combination(adapter):
            return self.combinations.entry(adapter)
        return self.resident[adapter].entry

    def complete(self, model_id: str | None, prompt: str | list[dict[str, str]], *, raw: bool = False,
                 max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, min_new_tokens: int = 0,
                 on_start: Callable[[str | None], None] | None = None, on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> tuple[str | None, Generation]:
        """Answer a prompt (raw text, or chat messages) with the adapter model_id selects.

        Blocks until the answer is done; many threads may call it at once. on_start(adapter) is
        called once the adapter is chosen and the prompt accepted (queued), before the first token.
        scheduler.Busy when the queue is full.
        """
        if not is_generative(self.model.task):
            raise InputError("this server serves a classification model: use POST /v1/classify")
        ids = inference.prompt_ids(self.model, prompt, raw=raw)
        options = {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop, "on_text": on_text,
                   "cancelled": cancelled, "min_new_tokens": min(min_new_tokens, max_new_tokens or min_new_tokens)}
        return self.serving.complete(model_id, ids, max_new_tokens, options, on_start)

    def _check_lengths(self, prompt_tokens: int, max_new_tokens: int | None) -> int:
        """The number of tokens to generate, or an error when the prompt or the request is too long."""
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {prompt_tokens} tokens; this server takes at most "
                                f"{self.max_prompt_tokens}")
        if max_new_tokens is not None and max_new_tokens > self.max_new_tokens:
            raise InputError(f"max_tokens is {max_new_tokens}; this server allows at most {self.max_new_tokens}")
        limits = [n for n in (self.context_length, self.serving.max_len) if n]
        limit = min(limits) if limits else None
        where = (f"the model's context of {limit} tokens" if limit == self.context_length
                 else f"the {limit} tokens a sequence may hold in this server (--max-seq-len)")
        room = limit - prompt_tokens if limit else None
        if room is not None and room < 1:
            raise PromptTooLong(f"the prompt fills {where}")
        if max_new_tokens is None:
            return min(self.max_new_tokens, room) if room is not None else self.max_new_tokens
        if room is not None and max_new_tokens > room:
            raise PromptTooLong(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) exceeds "
                                f"{where}")
        return max_new_tokens

    def classify(self, model_id: str | None, texts: list[str]) -> tuple[str | None, list[dict[str, float]], int]:
        """{label: probability} per text with the adapter model_id selects, and the tokens read."""
        if is_generative(self.model.task):
            raise InputError("this server serves a text-generation model: use /v1/completions or "
                             "/v1/chat/completions")
        counts = [len(self.model.tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]
        longest = max(counts, default=0)
        if self.max_prompt_tokens is not None and longest > self.max_prompt_tokens:
            raise PromptTooLong(f"input {counts.index(longest)} has {longest} tokens; this server takes at most "
                                f"{self.max_prompt_tokens}")
        with self.swap_lock:
            adapter = self.resolve(model_id)
            labels = list(self.resident[adapter].labels) if adapter is not None else None
            with inference.adapter_context(self.model, self._slot(adapter)):
                scores = inference.classify(self.model, texts, max_length=max(longest, 1), labels=labels)
        return adapter, scores, sum(counts)


class BatchedServing:
    """Requests through the continuous-batching scheduler; adapters as its stacked entries."""

    loads_on_request = True  # a request naming a registered adapter loads it
    swaps_in_place = False  # a switch keeps the previous adapter resident

    def __init__(self, host: ModelHost, scheduler):
        self.host = host
        self.scheduler = scheduler
        self.max_len = scheduler.decoder.max_len
        self.max_adapters = host.batching.max_adapters

    @classmethod
    def start(cls, host: ModelHost) -> BatchedServing | None:
        """The scheduler over a batched decoder, or None where the model cannot run in it."""
        from lqmf.engine.decode import batched

        model, settings = host.model, host.batching
        if (not settings.enabled or not is_generative(model.task) or not inference.fast_enabled()
                or not batched.supports(model.model)):
            return None
        from lqmf.core.memory_plan import adapter_table_slots
        from lqmf.engine.serve.scheduler import Scheduler

        limits = [n for n in (host.context_length, settings.max_seq_len or DEFAULT_MAX_SEQ_LEN) if n]
        slots = settings.max_batch or default_max_batch(model, settings, min(limits))
        decoder = batched.BatchedDecoder(model.model, slots, min(limits))
        return cls(host, Scheduler(decoder, max_queue=settings.max_queue or 4 * slots,
                                   adapter_slots=adapter_table_slots(settings.max_adapters),
                                   adapter_plan_bytes=planned_adapter_bytes(model, settings)))

    def describe(self) -> dict[str, Any]:
        return {**self.scheduler.load(), **self.scheduler.memory(), "max_seq_len": self.max_len}

    @property
    def captures_graphs(self) -> bool:
        return self.scheduler.decoder.use_graphs

    def capture_graphs(self) -> int:
        """Capture the decoder's CUDA graphs for every batch and prompt shape now (none on the CPU); how many."""
        return self.scheduler.call(self.scheduler.decoder.capture_all)

    def close(self) -> None:
        self.scheduler.stop()

    def add(self, adapter: ResidentAdapter) -> str:
        """Read adapter into the scheduler and make it resident; how ("load")."""
        from lqmf.engine.lora.stacked import UnsupportedAdapter

        try:
            entry = self.scheduler.add_adapter(adapter.name, adapter.path, timeout=LOAD_WAIT_S)
        except UnsupportedAdapter as err:
            raise ConflictError(f"adapter '{adapter.name}': {first_line(err)}") from None
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise InputError(f"adapter '{adapter.name}' could not be loaded from {adapter.path}: "
                             f"{type(err).__name__}: {first_line(err)}") from err
        self.host._set_resident(adapter.name, ResidentAdapter(adapter.name, "", adapter.path, adapter.task,
                                                              adapter.labels, adapter.trained_4bit, entry=entry))
        return "load"

    def remove(self, adapter: ResidentAdapter) -> None:
        self.scheduler.retire(adapter.entry)  # its weights stay until its last request ends

    def complete(self, model_id: str | None, ids: list[int], max_new_tokens: int | None, options: dict[str, Any],
                 on_start: Callable[[str | None], None] | None) -> tuple[str | None, Generation]:
        """Queue the request and wait for its answer; the swap lock is held until it is queued, so no
        swap retires its adapter before."""
        host = self.host
        host.swap_lock.acquire()
        held = True

        def queued() -> None:
            nonlocal held
            host.swap_lock.release()
            held = False
            if on_start is not None:
                on_start(adapter)

        try:
            adapter = host.resolve(model_id, load=True)
            options["max_new_tokens"] = host._check_lengths(len(ids), max_new_tokens)
            host._mark_used(combined.names(adapter))
            entry = host._entry_of(adapter)
            return adapter, inference.generate_batched(host.model, self.scheduler, ids, entry=entry,
                                                       on_queued=queued, **options)
        finally:
            if held:
                host.swap_lock.release()


class SerialServing:
    """One request at a time under the host's lock; adapters as PEFT slots of the host's model."""

    scheduler = None
    max_len = None  # the model's context is the only limit
    max_adapters = None  # no eviction: switching replaces in place
    loads_on_request = False  # a request names resident adapters only
    swaps_in_place = True

    def __init__(self, host: ModelHost):
        self.host = host
        self.free_slot: str | None = None  # weights of an unloaded adapter, kept for the next to swap into
        self._slots = itertools.count()

    def describe(self) -> None:
        return None

    captures_graphs = False  # PEFT + generate

    def capture_graphs(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def add(self, adapter: ResidentAdapter) -> str:
        """Make adapter resident in the free slot (in place) or a new one; how ("hotswap" or "load")."""
        return self._occupy_free_slot(adapter) or self._add_slot(adapter)

    def remove(self, adapter: ResidentAdapter) -> None:
        if len(self.host.model.adapters) > 1:
            inference.detach_adapter(self.host.model, adapter.slot)
        else:
            self.free_slot = adapter.slot

    def replace_active(self, name: str, previous: str, started: float) -> SwapResult:
        """Put name in the active adapter's place: into its weights where they fit, else a new slot."""
        host = self.host
        adapter, notes = host._prepare(name)
        old = host.resident[previous]
        adapter = _with_slot(adapter, old.slot)
        if inference.replace_adapter(host.model, adapter.path, old.slot):
            method = "hotswap"
            host._set_resident(previous, None)
            host._set_resident(name, adapter)
        else:  # not the same shape: a new slot, then free the old one
            method = self._add_slot(adapter)
            host._remove(previous)
        host.active = name
        host._record_eviction(previous, f"replaced by '{name}' (switch)")
        return host._result("switch", name, method, previous, started, notes, [previous])

    def complete(self, model_id: str | None, ids: list[int], max_new_tokens: int | None, options: dict[str, Any],
                 on_start: Callable[[str | None], None] | None) -> tuple[str | None, Generation]:
        host = self.host
        with host.swap_lock:
            adapter = host.resolve(model_id)
            options["max_new_tokens"] = host._check_lengths(len(ids), max_new_tokens)
            if on_start is not None:
                on_start(adapter)
            with inference.adapter_context(host.model, host._slot(adapter)):
                return adapter, inference.generate(host.model, ids, **options)

    def _occupy_free_slot(self, adapter: ResidentAdapter) -> str | None:
        slot = self.free_slot
        if slot is None or not inference.replace_adapter(self.host.model, adapter.path, slot):
            return None
        self.free_slot = None
        self.host._set_resident(adapter.name, _with_slot(adapter, slot))
        return "hotswap"

    def _add_slot(self, adapter: ResidentAdapter) -> str:
        model = self.host.model
        slot = f"slot{next(self._slots)}_"  # never a substring of another slot's name
        try:
            inference.attach_adapter(model, adapter.path, slot)
        except Exception as err:
            if model.adapters and slot in model.model.peft_config:
                with contextlib.suppress(Exception):  # best effort: the slot is unused either way
                    model.model.delete_adapter(slot)
            raise InputError(f"adapter '{adapter.name}' could not be loaded from {adapter.path}: "
                             f"{type(err).__name__}: {first_line(err)}") from err
        self.host._set_resident(adapter.name, _with_slot(adapter, slot))
        if self.free_slot is not None:
            inference.detach_adapter(model, self.free_slot)
            self.free_slot = None
        return "load"


def _with_slot(adapter: ResidentAdapter, slot: str) -> ResidentAdapter:
    return ResidentAdapter(adapter.name, slot, adapter.path, adapter.task, adapter.labels, adapter.trained_4bit)


def _entry(workspace: Workspace, name: str, operator_paths: dict[str, Path]) -> AdapterEntry:
    """A registry adapter, or one from a folder the operator named at start."""
    registry = Registry(workspace)
    if name in operator_paths:
        entry = registry.inspect(operator_paths[name])
        if not entry.complete:
            raise NotFoundError(f"adapter folder {operator_paths[name]} is not a complete LQMF adapter: "
                                f"{entry.problem}")
        return AdapterEntry(name, entry.path, entry.manifest)
    return registry.get(name)


def _check_weights_readable(entry: AdapterEntry) -> None:
    """Refuse an adapter whose weights file is not valid safetensors, or holds NaN or infinite values,
    before touching the model."""
    from safetensors import safe_open

    path = entry.path / "adapter_model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as weights:
            bad = first_nonfinite({key: weights.get_tensor(key) for key in weights.keys()})  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - safetensors raises several unrelated types
        raise InputError(f"adapter '{entry.name}': {path} is not readable: {first_line(err)}") from None
    if bad is not None:
        raise InputError(f"adapter '{entry.name}': {path} holds NaN or infinite values in '{bad}'; refused")
