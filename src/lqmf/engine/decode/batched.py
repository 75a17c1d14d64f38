"""A decoder for many sequences at once, each with its own LoRA adapter (or none): the engine of `lqmf serve`.

The base model's modules are reused as they are (embeddings, norms, rotary embedding, 4-bit or
plain linears); the forward pass is ours, so rows at different positions share one step:

  - a static KV cache of `slots` sequences of up to `max_len` tokens; a row's slot is its index in
    the batch, so a step runs rows 0..B-1 in place (B a power-of-two bucket), with no gather;
  - projections that read the same input run as one (q/k/v, gate/up): their weights are stacked,
    4-bit ones too (`compat.stack_4bit`), the original layers keeping views of them, so one matmul
    serves the group (on an H200 bitsandbytes then takes its fused 4-bit kernel for q/k/v up to 16 rows);
  - every group runs its base matmul once for the batch (`BatchedLoRALinear`, lora/stacked.py), then adds each row's
    LoRA product from tables of every resident adapter's weights by adapter index (`AdapterTables`):
    in a decode step on CUDA two per-row Triton kernels (BGMV, Punica/S-LoRA style) read only each
    row's own adapter's A and B, so the cost follows the rows, not how many adapters are resident;
    elsewhere (prompts, the CPU) GEMMs over every adapter, each row keeping its own adapter's
    columns by selection (`torch.where`, so another adapter's inf or NaN never reaches it: 0 x NaN
    would). Either way a few launches whatever the mix of adapters, so a CUDA graph of the step
    serves every mix;
  - prompts are prefilled with the waiting rows' next chunks in one pass; on CUDA the one-token decode step of
    each (batch bucket, length bucket), and the pass over prompts' first chunks of each (rows bucket,
    padded length), is captured once as a CUDA graph and replayed (an eager pass of a 7B model is
    about 450 kernel launches, tens of milliseconds of host time for a few of GPU time;
    LQMF_PREFILL_GRAPHS=0 keeps prompts eager);
  - a decode step also picks each row's token on the device, greedy or drawn for a row that samples
    (`sampling.sample_rows`; end-of-text barred for rows below their min_new_tokens) and can take its
    input tokens from the step before, so the scheduler can launch the next step before it has read
    the last one's tokens back (`decode(..., follow=)`).

Adapters are read from their folders (`adapter_config.json`, `adapter_model.safetensors`) into
these stacked tensors; PEFT is not involved in serving. Each loaded adapter is a `StackedAdapter` (lora/stacked.py)
with an id; rows hold the id they were admitted with, so replacing or unloading an adapter never
changes a row in flight (its entry stays until `collect` finds it unused).

A batch of one is the single-stream case (`generate`): `lqmf test`, `lqmf bench`, the shell and a
server without batching decode one request through slot 0, its tokens picked on the device (the first
one after the prompt, sampled, on the host).

Supported: Llama-shaped decoder-only models (Llama, Mistral, Qwen2/3 and others with
`model.layers[i].self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` and a rotary embedding).
`supports(model)` says whether a model is; the host falls back to PEFT + generate otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lqmf.core.memory_plan import PREFILL_GRAPH_KEYS, PREFILL_GRAPH_TOKENS
from lqmf.engine import compat
from lqmf.engine.decode import kernels as decode_kernels
from lqmf.engine.decode.sampling import pick_token, sample_rows, seeded_generator
from lqmf.engine.lora.stacked import BatchedLoRALinear, StackedAdapter

log = logging.getLogger("lqmf.serve")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))  # projections that read one input
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BARRED = 8  # end-of-text ids a row may bar on the device (below its min_new_tokens)
INPUTS = 5 + BARRED + 3  # a step's input rows: tokens ... barred ids, then seed, temperature, top_p (see __init__)
MIN_LENGTH_BUCKET = 128
MIN_CACHE = 256  # the shortest sequence a single-stream decoder is made for (`cache_size_for`)
PREFILL_CHUNK = 512  # prompt tokens per prefill pass
# A pass over prompts' first chunks runs as a CUDA graph when its rows (padded to a bucket) x its longest
# chunk (padded up to one of PREFILL_LENGTHS) come to at most PREFILL_GRAPH_TOKENS. The graphs' memory
# pool holds its own working set (past 64 tokens with bitsandbytes' dequantized weight), which the serving
# plan counts from the same bounds; longer prompts stay eager.
PREFILL_LENGTHS = tuple(2**n for n in range(4, 10) if 2**n <= PREFILL_GRAPH_KEYS)


@dataclass
class DecodeResult:
    tokens: list[int]
    seconds: float
    first_token_seconds: float


def cache_size_for(tokens: int, limit: int | None) -> int:
    """The sequence length to make a single-stream decoder for `tokens`: a power of two (at least
    MIN_CACHE) within limit, so a few sizes serve every request."""
    size = MIN_CACHE
    while size < tokens:
        size *= 2
    return min(size, limit) if limit else size


def supports(model) -> bool:
    """Whether model (a bare causal LM) has the Llama-shaped layout the batched decoder runs."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers) or getattr(inner, "rotary_emb", None) is None:
        return False
    if getattr(model.config, "model_type", "") in ("gemma", "gemma2", "gemma3", "cohere", "olmo2"):
        return False  # norms or scalings this forward does not reproduce
    layer = layers[0]
    return (all(hasattr(layer.self_attn, name) for name in ATTENTION)
            and all(hasattr(layer.mlp, name) for name in MLP)
            and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm"))


def bucket(value: int, buckets) -> int:
    return next(b for b in buckets if b >= value)


@dataclass
class Step:
    """A decode step on its way through the device: its logits (device buffers, valid until the next
    step) and the token each row chose (argmax or drawn), read when `greedy()` is called."""

    logits: Any
    tokens: Any  # host tensor the step's argmax is copied into
    ready: Any = None  # CUDA event after that copy (None: already there)

    def greedy(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


# ----------------------------------------------------------------------------- the decoder


@dataclass
class _Layer:
    mlp: Any
    input_norm: Any
    post_norm: Any
    groups: dict[str, BatchedLoRALinear] = field(default_factory=dict)  # by first projection: q_proj, o_proj...
    q_norm: Any = None
    k_norm: Any = None


class BatchedDecoder:
    """Forward passes over a static per-slot KV cache: prefill chunks for one row, decode steps for many."""

    def __init__(self, model, slots: int, max_len: int, use_graphs: bool | None = None):
        import torch

        if not supports(model):
            raise ValueError(f"the batched decoder does not run {type(model).__name__} models")
        self.model = model
        config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.slots, self.max_len = slots, max_len
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.layers: list[_Layer] = []
        self.projections: dict[str, BatchedLoRALinear] = {}  # full projection name -> its group
        self.groups: list[BatchedLoRALinear] = []
        for index, layer in enumerate(model.model.layers):
            entry = _Layer(layer.mlp, layer.input_layernorm, layer.post_attention_layernorm,
                           q_norm=getattr(layer.self_attn, "q_norm", None),
                           k_norm=getattr(layer.self_attn, "k_norm", None))
            for parent, names in GROUPS:
                full = tuple(f"model.layers.{index}.{parent}.{name}" for name in names)
                group = BatchedLoRALinear(full, [getattr(getattr(layer, parent), name) for name in names])
                entry.groups[names[0]] = group
                self.groups.append(group)
                self.projections.update(dict.fromkeys(full, group))
            self.layers.append(entry)
        shape = (slots, self.kv_heads, max_len + 1, self.head_dim)  # the last position: scratch for idle slots
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # every layer's values in one tensor, so that clear_slot is one memset, not one call per layer
        self._all_values = torch.zeros((len(self.layers), *shape), dtype=self.dtype, device=self.device)
        self.values = list(self._all_values.unbind(0))
        # A step's input, one copy: tokens, positions, adapter rows, whether a row follows on from the last
        # step (its token is that step's choice, still on the device: `next_tokens`), whether it bars
        # end of text, the BARRED ids it bars, and for rows that sample: seed, temperature and top_p
        # (the last two float64, their bits in the int64 rows). Temperature 0: greedy.
        self.inputs = torch.zeros(INPUTS, slots, dtype=torch.long, device=self.device)
        self.tokens, self.positions, self.rows, self.follow, self.barring = self.inputs[:5]
        self.barred = self.inputs[5:5 + BARRED]
        self.seeds = self.inputs[5 + BARRED]
        self.temperatures, self.top_ps = (row.view(torch.float64) for row in self.inputs[6 + BARRED:])
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self.staging = [torch.zeros(INPUTS, slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.results = [torch.zeros(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.copied: list[Any] = [None, None]  # per staging/results pair: the event after its last use
        self.launched = 0
        self.key_positions = torch.arange(max_len + 1, device=self.device)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.graph_prefills = self.use_graphs and os.environ.get("LQMF_PREFILL_GRAPHS", "1") != "0"
        self.graphs: dict[tuple[int, int, bool], tuple[Any, Any]] = {}
        self.failed: set[tuple[int, int, bool]] = set()  # (batch, length, sampling) whose capture failed: eager
        # Captured prefill passes by (rows, padded length): the graph, its input buffer (`_prefill_inputs`)
        # and its logits; (rows, length) whose capture failed run eagerly.
        self.prefill_graphs: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        self.prefill_failed: set[tuple[int, int]] = set()
        self.pool = None
        self._warmup_stream = None  # one side stream for every capture's warm-up passes (see `_side_stream`)
        # Fused kernels (decode/kernels.py) on CUDA: norms and SiLU * up in prefill and step, rotary, cache
        # writes and attention in the step; each only where the model computes what the kernel does.
        self.kernels = decode_kernels.enabled(self.device)
        norms = [m for layer in self.layers for m in (layer.input_norm, layer.post_norm)] + [model.model.norm]
        self.fused_norms = all(_fusable_norm(norm, self.dtype) for norm in norms)
        self.fused_mlp = (getattr(config, "hidden_act", None) in ("silu", "swish")
                          and len(set(self.layers[0].groups["gate_proj"].sizes)) == 1)

    def clear_slot(self, slot: int) -> None:
        """Zero slot's cached values before a new sequence takes it: attention weighs the positions a row
        may not see by exactly 0, and 0 x NaN is NaN, so what an earlier row left there (its own adapter's
        NaN or inf) must not stay. Keys need no clearing: their scores are masked, not weighed. One memset
        per admission, on the device's stream (after any step still running for the slot): a call per
        layer cost the serving loop a GIL hand-over each."""
        self._all_values[:, slot].zero_()

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def set_adapters(self, entries: dict[int, StackedAdapter] | list[StackedAdapter], slots: int = 0) -> None:
        """Build every projection's adapter tables anew, for at least `slots` adapters, each entry at its
        index (a list: entry i at index i + 1); drops the graphs, which read the old tables."""
        import torch

        if isinstance(entries, list):
            entries = {index + 1: entry for index, entry in enumerate(entries)}
        if self.device.type == "cuda":  # a step may still run (decoding ahead): its graph and tensors go
            torch.cuda.current_stream(self.device).synchronize()
        for group in self.groups:
            group.set_adapters(entries, slots)
        self.drop_graphs()

    def put_adapter(self, index: int, entry: StackedAdapter) -> bool:
        """Write entry into adapter slot index of every projection's tables, in place: the tables stay
        where they are and the captured graphs stay valid. No row may be using index (a step in flight
        reads it before the writes, which follow it on the stream). False where some tables cannot take
        it (see `BatchedLoRALinear.put`): then `set_adapters` must rebuild them."""
        return all(group.put(index, entry) for group in self.groups)

    def clear_adapter(self, index: int) -> None:
        """Zero adapter slot index in every projection's tables (its adapter is gone; no row uses it)."""
        for group in self.groups:
            group.clear(index)

    def adapter_shape(self) -> tuple[int, int]:
        """(slots, rank) of the largest adapter tables; (0, 0) without any."""
        held = [(group.tables.slots, group.tables.rank) for group in self.groups if group.tables is not None]
        return (max(slots for slots, _ in held), max(rank for _, rank in held)) if held else (0, 0)

    def adapter_bytes(self) -> int:
        """Bytes the adapter tables hold on the device (every slot, used or free)."""
        return sum(group.tables.nbytes for group in self.groups if group.tables is not None)

    def drop_graphs(self) -> None:
        """Forget every captured step (and their memory pool, which goes with the last of them)."""
        self.graphs.clear()
        self.failed.clear()
        self.prefill_graphs.clear()
        self.prefill_failed.clear()
        self.pool = None

    def step_shape(self, rows: int, keys: int) -> tuple[int, int]:
        """(batch, length) of the decode step over rows rows reading at most keys cached positions: the
        buckets its graph is captured for (length 1 where no row is live)."""
        length = min(bucket(keys, _length_buckets(self.max_len)), self.max_len) if keys else 1
        return bucket(rows, BATCH_BUCKETS), length

    def graph_keys(self) -> tuple[list[tuple[int, int, bool]], list[tuple[int, int]]]:
        """Every decode step (batch, length, sampling) and first-chunk prefill pass (rows, padded length)
        this decoder may replay as a CUDA graph, whatever its rows and lengths."""
        batches = sorted({bucket(count, BATCH_BUCKETS) for count in range(1, self.slots + 1)})
        lengths = sorted({min(size, self.max_len) for size in _length_buckets(self.max_len)})
        prefills = {self._prefill_key(rows, tokens) for rows in batches for tokens in PREFILL_LENGTHS}
        return (list(itertools.product(batches, lengths, (False, True))),
                sorted(key for key in prefills if key is not None) if self.graph_prefills else [])

    def capture_all(self) -> int:
        """Capture now every graph of `graph_keys` not captured yet, so that no request waits for a capture
        later; how many were new. Only while no row is in flight: the warm-up passes write the idle cache
        position alone."""
        import torch

        if not self.use_graphs:
            return 0
        before = len(self.graphs) + len(self.prefill_graphs)
        self.inputs.zero_()
        self.positions.fill_(self.max_len)  # every slot idle
        steps, prefills = self.graph_keys()
        for key in steps:
            self._graph(*key)
        for rows, tokens in prefills:
            if (rows, tokens) not in self.prefill_graphs:
                self._capture_prefill((rows, tokens), torch.tensor([self._idle_row(tokens, 0)] * rows))
        return len(self.graphs) + len(self.prefill_graphs) - before

    # -- the forward pass ---------------------------------------------------------------------

    def _forward(self, ids, positions, rows, attend) -> Any:
        """Hidden states after the final norm; attend(layer_index, q, k, v, cos, sin) takes one layer's
        heads [batch, length, heads, head_dim], rotates q and k, writes the cache and returns the
        attention output [batch, length, heads * head_dim]."""
        model = self.model.model
        hidden = model.embed_tokens(ids)
        cos, sin = model.rotary_emb(hidden, positions)
        batch, length = ids.shape
        delta = None  # what the last layer adds to hidden: added with the next norm
        for index, layer in enumerate(self.layers):
            p = layer.groups
            hidden, normed = self._norm(layer.input_norm, hidden, delta)
            q, k, v = (t.view(batch, length, -1, self.head_dim)
                       for t in p["q_proj"](normed, rows).split(p["q_proj"].sizes, dim=-1))
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            hidden, normed = self._norm(layer.post_norm, hidden, p["o_proj"](attend(index, q, k, v, cos, sin), rows))
            delta = p["down_proj"](self._gated(layer, p["gate_proj"](normed, rows)), rows)
        return self._norm(model.norm, hidden, delta)[1]

    def _norm(self, norm, hidden, delta):
        """(hidden + delta, norm(hidden + delta)); delta None: nothing to add. One kernel where fused."""
        if self.kernels and self.fused_norms:
            weight, eps = compat.rms_norm_parameters(norm)
            return decode_kernels.rms_norm(hidden, weight, eps, delta)
        if delta is not None:
            hidden = hidden + delta
        return hidden, norm(hidden)

    def _gated(self, layer, gate_up):
        """act_fn(gate) * up from the gate/up group's output, gate and up side by side."""
        if self.kernels and self.fused_mlp:
            return decode_kernels.silu_mul(gate_up)
        gate, up = gate_up.split(layer.groups["gate_proj"].sizes, dim=-1)
        return layer.mlp.act_fn(gate) * up

    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int], adapters: list[int]):
        """Run chunks[i] at positions starts[i].. for slot slots[i]'s row, all rows in one pass (shorter
        chunks padded; padding writes the idle position); the logits after each row's last token [rows, vocab].
        First chunks (every start 0) of up to PREFILL_GRAPH_TOKENS padded tokens replay a captured pass on CUDA."""
        import torch

        lengths = [len(chunk) for chunk in chunks]
        key = None if any(starts) else self._replay_key(len(chunks), max(lengths))
        if key is not None:
            inputs = self._prefill_inputs(*key, slots, chunks, starts, adapters)
            graph = self.prefill_graphs.get(key) or self._capture_prefill(key, inputs)
            if graph is not None:
                graph[1].copy_(inputs, non_blocking=True)
                graph[0].replay()
                return graph[2][:len(chunks)].to(torch.float32, copy=True)  # the next replay overwrites graph[2]
        inputs = self._prefill_inputs(len(chunks), max(lengths), slots, chunks, starts, adapters)
        keys = max(start + len(chunk) for chunk, start in zip(chunks, starts, strict=True))
        return self._prefill_pass(inputs.to(self.device), max(lengths), keys).float()

    def _prefill_inputs(self, rows: int, tokens: int, slots: list[int], chunks: list[list[int]], starts: list[int],
                        adapters: list[int]):
        """A pass's input as one host tensor [rows, 2 x tokens + 3]: ids and positions (padded to tokens; padding
        at the idle position), adapter index, slot, last index. Rows past the chunks' (a graph's bucket)
        write only the idle position of the first chunk's slot."""
        import torch

        pad = [self._idle_row(tokens, slots[0])] * (rows - len(chunks))
        return torch.tensor([chunk + [0] * (tokens - len(chunk)) + list(range(start, start + len(chunk)))
                             + [self.max_len] * (tokens - len(chunk)) + [adapter, slot, len(chunk) - 1]
                             for chunk, start, adapter, slot in zip(chunks, starts, adapters, slots, strict=True)]
                            + pad)

    def _idle_row(self, tokens: int, slot: int) -> list[int]:
        """A padding row of `_prefill_inputs`: no token, every position the idle one (it writes only
        slot's idle cache position), adapter 0, last index 0."""
        return [0] * tokens + [self.max_len] * tokens + [0, slot, 0]

    def _prefill_pass(self, inputs, tokens: int, length: int):
        """One prefill pass from `_prefill_inputs`' tensor on the device, keys over the first `length`
        positions: logits after each row's last token [rows, vocab]."""
        import torch

        ids, positions = inputs[:, :tokens].contiguous(), inputs[:, tokens:2 * tokens].contiguous()
        rows, slots, last = (column.contiguous() for column in inputs[:, 2 * tokens:].t())
        keys_at = self.key_positions[:length].view(1, 1, -1)
        allowed = keys_at <= positions.unsqueeze(-1)
        if self.window:
            allowed &= keys_at > positions.unsqueeze(-1) - self.window
        allowed = allowed.unsqueeze(1)  # [rows, 1, tokens, length]
        count = ids.shape[0]

        def attend(index, q, k, v, cos, sin):
            q, k = _rotate_heads(q, k, cos, sin)
            self.keys[index][slots.view(-1, 1), :, positions] = k.transpose(1, 2)
            self.values[index][slots.view(-1, 1), :, positions] = v
            keys = self.keys[index].index_select(0, slots)[:, :, :length]
            values = self.values[index].index_select(0, slots)[:, :, :length]
            return _attention(q, keys, values, allowed, self.scaling).transpose(1, 2).reshape(count, tokens, -1)

        hidden = self._forward(ids, positions, rows, attend)
        return self.model.lm_head(hidden[torch.arange(count, device=self.device), last])

    def prefill_replays(self, rows: int, tokens: int) -> bool:
        """Whether a pass over rows first chunks of at most tokens tokens replays a captured graph
        (a few milliseconds) rather than running eagerly (tens of milliseconds of kernel launches)."""
        return self._replay_key(rows, tokens) is not None

    def _replay_key(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """`_prefill_key` where that pass replays a graph (prefill graphs on, its capture not failed); else None."""
        key = self._prefill_key(rows, tokens) if self.graph_prefills else None
        return key if key not in self.prefill_failed else None

    def _prefill_key(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """(rows bucket, padded length) of a first-chunk pass that runs as a graph; None: eagerly."""
        length = next((size for size in PREFILL_LENGTHS if size >= tokens), None)
        count = bucket(rows, BATCH_BUCKETS)
        return (count, length) if length and count <= self.slots and count * length <= PREFILL_GRAPH_TOKENS else None

    def _capture_prefill(self, key: tuple[int, int], host_inputs):
        """Capture the pass for key after two warm-up passes over these inputs (they write what the pass
        writes); None (and eager from then on) where capture fails."""
        import torch

        inputs = host_inputs.to(self.device)
        try:
            stream = self._side_stream()
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._prefill_pass(inputs, key[1], key[1])
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._prefill_pass(inputs, key[1], key[1])
        except RuntimeError:
            torch.cuda.synchronize(self.device)
            self.prefill_failed.add(key)
            log.warning("CUDA graph capture failed for a prefill of %d rows x %d tokens: it runs eagerly", *key,
                        exc_info=True)
            return None
        self.pool = graph.pool()
        self.prefill_graphs[key] = (graph, inputs, logits)
        return self.prefill_graphs[key]

    def _step(self, batch: int, length: int, sampling: bool = False):
        """One token for slots 0..batch-1 from self.inputs; attention over length positions. Writes
        each row's choice to next_tokens: its argmax, or where sampling and its temperature is above 0,
        a token drawn on the device (`sample_rows`)."""
        import torch

        positions = self.positions[:batch]
        attend = self._fused_attention(batch, length) if self.kernels else self._attention(batch, length)
        tokens = torch.where(self.follow[:batch].bool(), self.next_tokens[:batch], self.tokens[:batch])
        hidden = self._forward(tokens.view(batch, 1), positions.view(batch, 1), self.rows[:batch], attend)
        logits = self.model.lm_head(hidden[:, -1])
        barred = self.barred[:, :batch].t()  # [batch, BARRED]: a barring row's ids, repeated to fill
        kept = logits.gather(1, barred)
        allowed = logits.scatter(1, barred, torch.where(self.barring[:batch, None].bool(), float("-inf"), kept))
        choice = allowed.argmax(-1)
        if sampling:
            temperatures = self.temperatures[:batch]
            drawn = sample_rows(allowed, temperatures, self.top_ps[:batch], self.seeds[:batch], positions)
            choice = torch.where(temperatures > 0, drawn, choice)
        self.next_tokens[:batch].copy_(choice)
        return logits

    def _attention(self, batch: int, length: int):
        """A step's attend (see `_forward`) in torch: rotary, cache writes, masked attention."""
        import torch

        positions = self.positions[:batch]
        slots = torch.arange(batch, device=self.device)
        keys_at = self.key_positions[:length].view(1, -1)
        allowed = keys_at <= positions.view(-1, 1)
        if self.window:
            allowed &= keys_at > positions.view(-1, 1) - self.window
        allowed = allowed.view(batch, 1, 1, length)

        def attend(index, q, k, v, cos, sin):
            q, k = _rotate_heads(q, k, cos, sin)
            self.keys[index][slots, :, positions] = k[:, :, 0]
            self.values[index][slots, :, positions] = v[:, 0]
            out = _attention(q, self.keys[index][:batch, :, :length], self.values[index][:batch, :, :length],
                             allowed, self.scaling)
            return out.transpose(1, 2).reshape(batch, 1, -1)

        return attend

    def _fused_attention(self, batch: int, length: int):
        """A step's attend (see `_forward`) in two kernels: rotary + cache writes, then split-K attention."""
        positions = self.positions[:batch]

        def attend(index, q, k, v, cos, sin):
            keys, values = self.keys[index], self.values[index]
            q = decode_kernels.rotary_write(q[:, 0], k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], positions, keys, values)
            out = decode_kernels.decode_attention(q, keys, values, positions, length, self.window, self.scaling)
            return out.view(batch, 1, -1)

        return attend

    def decode(self, tokens: list[int], positions: list[int | None], rows: list[int],
               follow: list[bool] | None = None, barred: list[tuple[int, ...]] | None = None,
               sampling: list[tuple[float, float, int] | None] | None = None) -> Step:
        """Launch one decode step: row i (slot i) feeds tokens[i] (or, where follow[i], the token the
        last step chose for it, without a trip through the host) at positions[i] (None: an idle slot).
        Row i's next token is its argmax, or where sampling[i] is (temperature > 0, top_p, seed), drawn
        on the device from its nucleus (`sample_rows`: the same seed and position draw the same token in
        any batch); never one of barred[i] (up to BARRED ids; empty: none).

        Returns at once on CUDA; the Step's greedy() waits for the chosen tokens, its logits
        ([len(tokens), vocab], nothing barred) stay valid until the next step.
        """
        import torch

        count = len(tokens)
        live = [p for p in positions if p is not None]
        batch, length = self.step_shape(count, max(live) + 1 if live else 0)
        pad = batch - count
        turn = self.launched % 2
        self.launched += 1
        if self.copied[turn] is not None:  # the step two back still reads these buffers
            self.copied[turn].synchronize()
        staging, results = self.staging[turn], self.results[turn]
        bars = [tuple(ids) for ids in barred or [()] * count] + [()] * pad
        staging[:5 + BARRED, :batch] = torch.tensor(
            [tokens + [0] * pad, [self.max_len if p is None else p for p in positions] + [self.max_len] * pad,
             rows + [0] * pad, [int(f) for f in follow or [False] * count] + [0] * pad,
             [int(bool(ids)) for ids in bars],
             *zip(*[(ids * BARRED)[:BARRED] if ids else (0,) * BARRED for ids in bars], strict=True)])
        draws = [draw or (0.0, 1.0, 0) for draw in sampling or [None] * count] + [(0.0, 1.0, 0)] * pad
        sampled = any(temperature > 0 for temperature, _, _ in draws)
        if sampled:
            temperatures, top_ps, seeds = zip(*draws, strict=True)
            staging[5 + BARRED, :batch] = torch.tensor(seeds)
            staging[6 + BARRED, :batch].view(torch.float64).copy_(torch.tensor(temperatures, dtype=torch.float64))
            staging[7 + BARRED, :batch].view(torch.float64).copy_(torch.tensor(top_ps, dtype=torch.float64))
        self.inputs.copy_(staging, non_blocking=True)  # whole: a strided copy would stage through pageable memory
        graph = self._graph(batch, length, sampled) if self.use_graphs else None
        if graph is None:
            logits = self._step(batch, length, sampled)
        else:
            graph[0].replay()
            logits = graph[1]
        results[:count].copy_(self.next_tokens[:count], non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = self.copied[turn] = torch.cuda.Event()
            ready.record()
        return Step(logits[:count], results[:count], ready)

    def generate(self, prompt: list[int], max_new_tokens: int, *, adapter: int = 0, eos_ids: set[int] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int], bool | None] | None = None, min_new_tokens: int = 0) -> DecodeResult:
        """Decode one sequence in slot 0 with adapter index `adapter` (0: the bare base): up to
        max_new_tokens after prompt, ending at an id of eos_ids (barred below min_new_tokens) or when
        on_token(token) returns True. Tokens are picked on the device, greedy or drawn (`sample_rows`),
        except the first one, and every one where more end-of-text ids are barred than the step takes:
        those on the host (`pick_token`, sampled with a generator seeded like the device's draws)."""
        import torch

        if not prompt or len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) must be within "
                             f"the {self.max_len} tokens this decoder holds, the prompt not empty")
        generator, draw = None, None
        if temperature > 0:
            generator, device_seed = seeded_generator(self.device, seed)
            draw = (temperature, top_p, device_seed)
        eos = tuple(sorted(eos_ids or ()))
        on_host = len(eos) > BARRED
        started = time.perf_counter()
        tokens: list[int] = []
        first = 0.0
        with torch.inference_mode():
            self.clear_slot(0)
            for start in range(0, len(prompt), PREFILL_CHUNK):
                logits = self.prefill([0], [prompt[start:start + PREFILL_CHUNK]], [start], [adapter])[0]
            step = None
            for index in range(max_new_tokens):
                if step is not None and not on_host:
                    value = step.greedy()[0]  # end of text already barred on the device
                else:
                    if step is not None:
                        logits = step.logits[0].float()
                    if index < min_new_tokens and eos:
                        logits = logits.index_fill(-1, torch.tensor(eos, device=self.device), float("-inf"))
                    value = int(pick_token(logits, temperature, top_p, generator))
                if index == 0:
                    first = time.perf_counter() - started
                tokens.append(value)
                stop = on_token(value) if on_token is not None else False
                if stop or value in eos or index == max_new_tokens - 1:
                    break
                barring = eos if index + 1 < min_new_tokens and not on_host else ()
                step = self.decode([value], [len(prompt) + index], [adapter], barred=[barring], sampling=[draw])
        return DecodeResult(tokens, time.perf_counter() - started, first)

    def _graph(self, batch: int, length: int, sampling: bool):
        """The captured step for (batch, length, sampling), capturing it when new; None where capture failed."""
        import torch

        key = (batch, length, sampling)
        if key in self.graphs or key in self.failed:
            return self.graphs.get(key)
        try:
            return self._capture(key)
        except RuntimeError:
            torch.cuda.synchronize(self.device)
            self.failed.add(key)
            log.warning("CUDA graph capture failed for batch %d x %d positions: that step runs eagerly",
                        batch, length, exc_info=True)
            return None

    def _side_stream(self):
        """The stream every capture's warm-up passes run on, made once: cuBLAS keeps a workspace for each
        stream it has run on for the life of the process, so a new stream a capture (up to the 32 that
        torch's stream pool hands out) costs a workspace each (the likely cause of 0.8 GiB more held
        after capturing 59 graphs on an H100; benchmarks/graph_memory_check.py measures it)."""
        import torch

        if self._warmup_stream is None:
            self._warmup_stream = torch.cuda.Stream(self.device)
        return self._warmup_stream

    def _capture(self, key: tuple[int, int, bool]):
        """Capture the step for key (batch, length, sampling) after two warm-up steps (they write what the
        step writes)."""
        import torch

        chosen = self.next_tokens.clone()  # the warm-up steps overwrite what rows that follow on read
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(*key)
                self.next_tokens.copy_(chosen)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(*key)
        self.pool = graph.pool()
        self.graphs[key] = (graph, logits)
        return graph, logits


def _fusable_norm(norm, dtype) -> bool:
    """Whether norm is a Llama-style RMSNorm the fused kernel reproduces, its weight in the model's dtype."""
    parameters = compat.rms_norm_parameters(norm)
    return parameters is not None and parameters[0].dtype == dtype and parameters[0].is_contiguous()


def _length_buckets(max_len: int) -> list[int]:
    sizes, size = [], MIN_LENGTH_BUCKET
    while size < max_len:
        sizes.append(size)
        size *= 2
    return [*sizes, max_len]


def _rotate_heads(q, k, cos, sin):
    """q, k [B, T, heads, D] rotated by cos, sin [B, T, D], as [B, heads, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)


def _rotate(x, cos, sin):
    """Rotary position embedding (the rotate-half form of Llama)."""
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention(q, keys, values, allowed, scaling: float):
    """Grouped-query attention of q [B, H, T, D] over keys/values [B, Hkv, L, D] where allowed [B, 1, T, L]."""
    import torch

    batch, heads, length, dim = q.shape
    groups = heads // keys.shape[1]
    grouped = q.reshape(batch, keys.shape[1], groups * length, dim)
    scores = (grouped @ keys.transpose(-1, -2)).float() * scaling
    mask = allowed.repeat(1, 1, groups, 1) if length > 1 else allowed  # q's rows: group-major
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return (probs @ values).reshape(batch, heads, length, dim)
