"""Continuous batching: one thread runs the batched decoder for every request in flight.

Requests wait in a bounded FIFO queue; whenever a slot of the decoder is free, the oldest joins.
Each turn of the loop runs, in order: swaps asked for in between (`call`), admissions, one prefill
pass over the next chunks of the rows still reading their prompts (oldest first, up to
`prefill_chunk` tokens), and one decode step for every row generating.
So a long prompt is read a chunk at a time while the others keep decoding, and a finished or
cancelled row leaves at the next token boundary and frees its slot for the next request.

Rows decode ahead: a step is launched with the tokens of the step before still on the device, and
only then are that step's tokens read back and handed out, so the host's work (and the HTTP
threads') overlaps the device's; a row that ends has one token computed past its end, which is
dropped. Sampling rows draw their tokens on the device too (`BatchedDecoder.decode(sampling=)`: the
Gumbel-max trick with noise hashed from the request's seed and the position), except a request's
first token, picked on the host from the prompt's logits with its generator. A row that bars more
end-of-text ids than the device step takes picks on the host from the logits, after the step in
flight is read back (`_settle`); swaps also wait for it.

A request fails alone: whatever raises while its row is set up (its sampling generator, say) or
while its token is picked on the host ends that request with the error and frees its row; only a
failure of a whole pass (the device) ends every row in it.

Tokens go to each request's own queue, as they come or, for an answer sent whole, as one list when
its row ends (`BatchRequest.each_token`); the thread that submitted it turns them into text, checks
stop strings and cancels (`BatchRequest.cancel`) when it has what it needs. Adapters are
`StackedAdapter`s owned here; a request holds the entry it was submitted with until it ends, so
replacing or unloading an adapter never changes a request already queued or running.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lqmf.core.errors import LqmfError
from lqmf.engine.decode.batched import BARRED, PREFILL_CHUNK, BatchedDecoder, Step
from lqmf.engine.decode.sampling import seeded_generator
from lqmf.engine.lora.stacked import StackedAdapter, read_adapter

log = logging.getLogger("lqmf.serve")


class Busy(LqmfError):
    """The request queue is full; retry after retry_after seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class BatchRequest:
    ids: list[int]
    max_new_tokens: int
    entry: StackedAdapter | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0
    eos_ids: frozenset[int] = frozenset()
    tokens: queue.Queue = field(default_factory=queue.Queue)  # ints (or one list), then None (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # False: the tokens go to `tokens` as one list when the row ends, for a reader that needs none before
    # (an answer sent whole, no stop strings): a reader woken for every token of 32 rows took the loop
    # thread's GIL for about 0.8 ms a step
    each_token: bool = True
    first_token_at: float | None = None  # perf_counter() when its first token was picked

    def cancel(self) -> None:
        """Stop generating: the row leaves at the next token boundary (or never starts)."""
        self.cancelled.set()


@dataclass
class _Row:
    request: BatchRequest
    slot: int
    prefilled: int = 0
    position: int = 0  # where the last token (to feed next) goes
    last: int = 0
    ahead: bool = False  # its last token is still on the device: a step in flight chose it
    generated: int = 0
    generator: Any = None  # sampling: the first token's, on the host
    seed: int = 0  # sampling: the device's draws (the request's seed, or its generator's, as int64)
    held: list[int] = field(default_factory=list)  # tokens not yet handed out (request.each_token False)

    def needs_logits(self) -> bool:
        """Whether its next token is picked on the host: more end-of-text ids to bar than the device step takes."""
        return len(self.request.eos_ids) > BARRED

    def sampling(self) -> tuple[float, float, int] | None:
        """(temperature, top_p, seed) of a sampling row's device draws; None for a greedy row."""
        request = self.request
        return (request.temperature, request.top_p, self.seed) if self.generator is not None else None

    def barred(self) -> tuple[int, ...]:
        """The ids its next token must not be: the end-of-text ones while below min_new_tokens."""
        chosen = self.generated + self.ahead  # tokens before the next one, the one in flight included
        return tuple(sorted(self.request.eos_ids)) if chosen < self.request.min_new_tokens else ()


@dataclass
class LoopTimes:
    """Where the loop thread's time has gone since it started (the server's /health shows it as
    batching.loop): prefill passes (their first tokens picked), building and launching decode steps,
    waiting for a step's tokens, handing tokens out, admitting requests, and waiting for work; busy_s
    is all of its time but the last, so busy_s less the sections is what none of them counts."""

    prefill_passes: int = 0
    prefill_rows: int = 0
    prefill_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0
    emit_s: float = 0.0
    admit_s: float = 0.0
    idle_s: float = 0.0
    busy_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) if isinstance(value, float) else value for name, value in vars(self).items()}


def prefill_group(chunks: list[tuple[int, bool]], budget: int, replays: Callable[[int, int], bool]) -> int:
    """How many of chunks ((tokens, first chunk of its prompt?), oldest first) one prefill pass takes:
    the oldest always, then while the rows times the longest stay within budget tokens, and never one
    that turns a pass replays(rows, longest) would replay as a graph into an eager one."""
    count, longest = 1, chunks[0][0]
    for tokens, first in chunks[1:]:
        wider = max(longest, tokens)
        if (count + 1) * wider > budget:
            break
        graphed = all(is_first for _, is_first in chunks[:count]) and replays(count, longest)
        if graphed and not (first and replays(count + 1, wider)):
            break
        count, longest = count + 1, wider
    return count


class Scheduler:
    """Owns the decoder, its adapters and the loop thread."""

    def __init__(self, decoder: BatchedDecoder, *, max_queue: int, prefill_chunk: int = PREFILL_CHUNK,
                 adapter_slots: int = 9, adapter_plan_bytes: int | None = None):
        self.decoder = decoder
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.adapter_slots = adapter_slots  # adapters the decoder's tables hold at once (more: rebuilt larger)
        self.adapter_plan_bytes = adapter_plan_bytes  # what the memory plan set aside for the tables
        self.entries: dict[int, StackedAdapter] = {}
        self._index: dict[int, int] = {}  # entry id -> adapter index in the decoder, its slot (0: none)
        self.table_builds = 0  # times the adapter tables were built anew (and the graphs dropped)
        self._ids = itertools.count(1)
        self._waiting: collections.deque[BatchRequest] = collections.deque()
        self._rows: dict[int, _Row] = {}  # slot -> row
        self._free = list(range(decoder.slots))
        self._in_flight: tuple[Step, list[_Row | None]] | None = None  # a greedy step not yet read back
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=64)
        self.steps = 0
        self.steps_ahead = 0  # launched before the tokens of the step before were read back
        self.tokens_generated = 0
        self.times = LoopTimes()
        self._thread = threading.Thread(target=self._run, name="lqmf-batch", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.decoder.slots

    def load(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._rows), "waiting": len(self._waiting), "max_batch": self.decoder.slots,
                    "max_queue": self.max_queue, "tokens_generated": self.tokens_generated, "steps": self.steps,
                    "loop": self.times.as_dict(), "graphs": len(self.decoder.graphs),
                    "prefill_graphs": len(self.decoder.prefill_graphs)}

    def memory(self) -> dict[str, Any]:
        """GiB held by the KV cache, by the adapters' weights (retired ones still in use included), by the
        adapter tables that hold them (every slot) and what the memory plan set aside for those; how many
        times the tables were built."""
        entries = list(self.entries.values())
        return {"kv_cache_gb": self.decoder.kv_bytes() / 2**30,
                "adapters_gb": sum(entry.nbytes for entry in entries) / 2**30,
                "adapter_tables_gb": self.decoder.adapter_bytes() / 2**30, "adapter_table_builds": self.table_builds,
                "adapter_plan_gb": None if self.adapter_plan_bytes is None else self.adapter_plan_bytes / 2**30}

    def submit(self, request: BatchRequest) -> BatchRequest:
        """Queue request (FIFO); Busy when the queue is full."""
        if len(request.ids) + request.max_new_tokens > self.decoder.max_len:
            raise ValueError(f"prompt plus max_new_tokens exceed the {self.decoder.max_len} tokens a sequence may "
                             "hold in this server")
        with self._wake:
            if len(self._waiting) >= self.max_queue and not self._free:
                raise Busy(f"the server is busy: {len(self._rows)} requests running and {len(self._waiting)} "
                           "waiting", self._retry_after())
            self._waiting.append(request)
            self._wake.notify()
        return request

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """fn() on the loop thread between two steps (a swap), and its result."""
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return future.result(timeout)

    def add_adapter(self, name: str, path: Path | None, timeout: float | None = None,
                    weights: Callable[[], dict[str, tuple]] | None = None) -> StackedAdapter:
        """Read the adapter at path (or take weights(), e.g. a combination's) into a new entry, on the
        loop thread; it serves new requests at once."""

        def add() -> StackedAdapter:
            if weights is not None:
                return self._add_entry(name, path, weights())
            return self._add_entry(name, path, read_adapter(path, self.decoder.projections, self.decoder.device,
                                                            self.decoder.dtype))

        return self.call(add, timeout)

    def _add_entry(self, name: str, path: Path | None, weights: dict[str, tuple]) -> StackedAdapter:
        size = sum(t.numel() * t.element_size() for a, b, _ in weights.values() for t in (a, b))
        entry = StackedAdapter(next(self._ids), name, path, weights, nbytes=size)
        self.entries[entry.id] = entry
        taken = set(self._index.values())
        self._index[entry.id] = index = next(i for i in itertools.count(1) if i not in taken)
        if not self.decoder.put_adapter(index, entry):
            self._build_tables()
        return entry

    def retire(self, entry: StackedAdapter) -> None:
        """Mark entry unloaded; its weights go once no queued or running request uses it."""

        def mark() -> None:
            entry.retired = True
            self._collect()

        self.call(mark)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the loop thread ------------------------------------------------------------------------

    def _retry_after(self) -> int:
        average = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(average * (len(self._waiting) + 1) / self.decoder.slots))

    def _build_tables(self) -> None:
        """Build the decoder's adapter tables anew for every entry at its slot (the graphs go with the old
        ones): where an adapter brings tables for a projection group none had, a larger rank, or needs
        more slots than the tables hold (retired adapters still in use keep theirs)."""
        slots = self._slots_needed()
        self.decoder.set_adapters({self._index[key]: entry for key, entry in self.entries.items()}, slots)
        self.table_builds += 1
        held = self.decoder.adapter_bytes()
        if self.adapter_plan_bytes is not None and held > self.adapter_plan_bytes:
            log.warning("the adapter tables now take %.2f GB (%d slots), more than the %.2f GB the memory plan set "
                        "aside for them at start (an adapter of a larger rank or more projections than those "
                        "given at start, or a combination); the KV cache has that much less room",
                        held / 2**30, slots, self.adapter_plan_bytes / 2**30)

    def _collect(self) -> None:
        in_use = {row.request.entry.id for row in self._rows.values() if row.request.entry is not None}
        with self._wake:
            in_use |= {r.entry.id for r in self._waiting if r.entry is not None}
        gone = [key for key, entry in self.entries.items() if entry.retired and key not in in_use]
        for key in gone:
            del self.entries[key]
            self.decoder.clear_adapter(self._index.pop(key))  # a free slot, zeros until the next adapter
        if gone and self._tables_oversized():
            self._build_tables()

    def _tables_oversized(self) -> bool:
        """Whether the adapter tables hold more than the plan set aside and the entries left need smaller ones
        (the entry that made them grow, a combination's or a larger rank's, is gone)."""
        if self.adapter_plan_bytes is None or self.decoder.adapter_bytes() <= self.adapter_plan_bytes:
            return False
        slots, rank = self.decoder.adapter_shape()
        needed = max([0, *(a.shape[0] for entry in self.entries.values() for a, _, _ in entry.weights.values())])
        return needed < rank or self._slots_needed() < slots

    def _slots_needed(self) -> int:
        """Slots the adapter tables must hold: adapter_slots, or more where entries sit beyond them."""
        return max([self.adapter_slots, *self._index.values()])

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    idle_since = time.perf_counter()
                    while not (self._stopping or self._commands or self._waiting or self._rows or self._in_flight):
                        self._wake.wait()
                    busy_since = time.perf_counter()
                    self.times.idle_s += busy_since - idle_since
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                if commands:
                    self._settle()
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
                try:
                    self._turn()
                except Exception as err:  # noqa: BLE001 - every row in flight gets the error; the loop goes on
                    log.error("batched decoding failed", exc_info=err)
                    self._in_flight = None
                    for slot in list(self._rows):
                        self._finish(slot, err)
                self.times.busy_s += time.perf_counter() - busy_since
        for slot in list(self._rows):
            self._finish(slot, RuntimeError("the server is stopping"))
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.tokens.put(RuntimeError("the server is stopping"))

    def _turn(self) -> None:
        self._admit()
        for slot in [s for s, row in self._rows.items() if row.request.cancelled.is_set()]:
            self._finish(slot)
        prefilling = sorted((row for row in self._rows.values() if row.prefilled < len(row.request.ids)),
                            key=lambda row: row.request.submitted)
        if prefilling:
            self._prefill(prefilling)
        decoding = self._decoding()
        if any(row.needs_logits() for row in decoding.values()):
            self._settle()
            if decoding := self._decoding():  # the tokens just handed out may have ended rows
                self._decode_on_host(decoding)
        elif decoding:
            self._decode_ahead(decoding)
        else:
            self._settle()

    def _decoding(self) -> dict[int, _Row]:
        """The rows a decode step runs: past their prompts, and not those whose last token (by
        max_new_tokens) a step in flight is already picking."""
        return {slot: row for slot, row in self._rows.items()
                if row.prefilled == len(row.request.ids) and row.generated + row.ahead < row.request.max_new_tokens}

    def _admit(self) -> None:
        started = time.perf_counter()
        admitted = []
        with self._wake:
            while self._waiting and self._free:
                request = self._waiting.popleft()
                if request.cancelled.is_set():
                    request.tokens.put(None)
                    continue
                admitted.append((heapq.heappop(self._free), request))
        for slot, request in admitted:
            try:
                self._index_of(request)  # set up here, so a failure below ends this request alone
                generator, seed = (None, 0) if request.temperature <= 0 else seeded_generator(
                    self.decoder.device, request.seed)
                row = _Row(request, slot, generator=generator, seed=seed)
                self.decoder.clear_slot(slot)
                self._rows[slot] = row
            except Exception as err:  # noqa: BLE001 - the request gets its error, its slot is free again
                log.warning("a request could not start: %s: %s", type(err).__name__, err)
                with self._wake:
                    heapq.heappush(self._free, slot)
                request.tokens.put(err)
        self.times.admit_s += time.perf_counter() - started

    def _prefill(self, prefilling: list[_Row]) -> None:
        """The next chunk of the oldest rows still reading their prompts, in one pass (`prefill_group`:
        at most prefill_chunk tokens, padding counted, and as a graph wherever the oldest rows' pass is one)."""
        chunks = [row.request.ids[row.prefilled:row.prefilled + self.prefill_chunk] for row in prefilling]
        count = prefill_group([(len(chunk), row.prefilled == 0) for row, chunk in zip(prefilling, chunks, strict=True)],
                              self.prefill_chunk, self.decoder.prefill_replays)
        group = list(zip(prefilling[:count], chunks[:count], strict=True))
        rows = [row for row, _ in group]
        started = time.perf_counter()
        logits = self.decoder.prefill([row.slot for row in rows], [chunk for _, chunk in group],
                                      [row.prefilled for row in rows], [self._index_of(row.request) for row in rows])
        for index, (row, chunk) in enumerate(group):
            row.prefilled += len(chunk)
            if row.prefilled == len(row.request.ids):
                row.position = len(row.request.ids)
                self._emit_picked(row, logits[index])
        self.times.prefill_passes += 1
        self.times.prefill_rows += len(group)
        self.times.prefill_s += time.perf_counter() - started

    def _launch(self, decoding: dict[int, _Row]) -> tuple[Step, list[_Row | None]]:
        started = time.perf_counter()
        width = max(decoding) + 1
        rows = [decoding.get(slot) for slot in range(width)]
        step = self.decoder.decode([row.last if row else 0 for row in rows],
                                   [row.position if row else None for row in rows],
                                   [self._index_of(row.request) if row else 0 for row in rows],
                                   follow=[row is not None and row.ahead for row in rows],
                                   barred=[row.barred() if row else () for row in rows],
                                   sampling=[row.sampling() if row else None for row in rows])
        self.steps += 1
        for row in decoding.values():
            row.position += 1
        self.times.launch_s += time.perf_counter() - started
        return step, rows

    def _decode_ahead(self, decoding: dict[int, _Row]) -> None:
        """Rows whose tokens the device picks: launch the next step (its inputs, the tokens of the step
        in flight, stay on the device), then hand out the tokens of the step before while the device
        runs this one. A row that ends there has one token computed past its end, which is dropped."""
        launched = self._launch(decoding)
        for row in decoding.values():
            row.ahead = True
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self.steps_ahead += 1
            self._deliver(*previous)

    def _settle(self) -> None:
        """Hand out the tokens of the step in flight, if any: afterwards the host knows every row's last token."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._deliver(*previous)
        for row in self._rows.values():
            row.ahead = False

    def _deliver(self, step: Step, rows: list[_Row | None]) -> None:
        tokens = self._tokens_of(step)
        started = time.perf_counter()
        for slot, token in enumerate(tokens):
            row = rows[slot] if slot < len(rows) else None
            if row is not None and self._rows.get(slot) is row:  # not ended or replaced since
                self._emit(row, token)
        self.times.emit_s += time.perf_counter() - started

    def _tokens_of(self, step: Step) -> list[int]:
        """The tokens step chose, once the device has them (the wait counted in times.wait_s)."""
        started = time.perf_counter()
        tokens = step.greedy()
        self.times.wait_s += time.perf_counter() - started
        return tokens

    def _decode_on_host(self, decoding: dict[int, _Row]) -> None:
        """One step whose rows that bar many end-of-text ids pick their tokens on the host from its logits."""
        step, rows = self._launch(decoding)
        greedy = self._tokens_of(step)
        for slot, row in enumerate(rows):
            if row is not None and row.needs_logits():
                self._emit_picked(row, step.logits[slot].float())
            elif row is not None:
                self._emit(row, greedy[slot])

    def _index_of(self, request: BatchRequest) -> int:
        return self._index[request.entry.id] if request.entry is not None else 0

    def _emit_picked(self, row: _Row, logits) -> None:
        """Pick row's next token on the host from its logits and hand it out; whatever fails there
        ends this row alone, with its error."""
        try:
            token = self._pick(row, logits)
        except Exception as err:  # noqa: BLE001 - handed to the request that owns the row
            log.warning("a request failed while sampling: %s: %s", type(err).__name__, err)
            self._finish(row.slot, err)
            return
        self._emit(row, token)

    def _pick(self, row: _Row, logits) -> int:
        from lqmf.engine.decode.sampling import pick_token

        request = row.request
        if row.generated < request.min_new_tokens and request.eos_ids:
            logits = logits.clone()
            logits[list(request.eos_ids)] = float("-inf")
        return int(pick_token(logits, request.temperature, request.top_p, row.generator))

    def _emit(self, row: _Row, token: int) -> None:
        request = row.request
        row.last = token
        row.generated += 1
        self.tokens_generated += 1
        if row.generated == 1:
            request.first_token_at = time.perf_counter()
        if request.each_token:
            request.tokens.put(token)
        else:
            row.held.append(token)
        if token in request.eos_ids or row.generated >= request.max_new_tokens:
            self._finish(row.slot)

    def _finish(self, slot: int, error: BaseException | None = None) -> None:
        row = self._rows.pop(slot)
        with self._wake:
            heapq.heappush(self._free, slot)
        self._durations.append(time.perf_counter() - row.request.submitted)
        if row.held:
            row.request.tokens.put(row.held)
        row.request.tokens.put(error)
        if row.request.entry is not None and row.request.entry.retired:
            self._collect()
