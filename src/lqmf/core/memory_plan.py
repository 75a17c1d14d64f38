"""Peak training memory from a model's config.json alone, before any weights load.

The estimate follows what LQMF's own training loop (engine/train/loop.py) allocates, term by term: on
CUDA the frozen base stays in its load dtype (bf16; 4-bit NF4 for the blocks' linear layers), LoRA
weights and their gradients are fp32, and forward passes run under bf16 autocast; on the CPU
everything is fp32. The formulas are written out in docs/memory.md. Sizes are in bytes; "GB" in
LQMF means GiB (2**30 bytes), as PyTorch and nvidia-smi count.

peak = weights + LoRA (params + grads) + optimizer state
       + saved activations + max(one block's recompute and backward, chunked logits and loss)
total = peak + allocator slack + CUDA context

On several GPUs the figures are per GPU. Data parallel (DDP): each GPU holds the whole 4-bit model
and its share of the batch, plus one flat fp32 copy of the LoRA gradients for their all-reduce.
FSDP-QLoRA: the 4-bit storage, the LoRA weights, gradients and (fp32 AdamW) optimizer state are
sharded over the GPUs; what stays whole on each is the quantization constants, the root unit
(embeddings, head, final norm: gathered for the whole step) and two gathered blocks (the one
running and the one prefetched).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from lqmf.core.errors import NotFoundError
from lqmf.core.models import ResolvedModel, load_yaml

GiB = 2**30

# 4-bit NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64 weights,
# one fp32 absmax per 256 of those blocks (bitsandbytes' defaults).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes 8-bit AdamW: two 8-bit states, each with one fp32 absmax per block of 256 values,
# for tensors of at least 4096 values; smaller tensors keep two fp32 states. Paged optimizers put
# tensors of at least 1e5 values in CUDA unified memory, outside PyTorch's allocator.
ADAM8BIT_BYTES_PER_PARAM = 2 + 2 * 4 / 256
ADAM8BIT_MIN_SIZE = 4096
PAGED_MIN_SIZE = 100_000
ADAM32_BYTES_PER_PARAM = 8
NF4_PACKED_BYTES_PER_PARAM = 0.5  # what FSDP shards of a 4-bit weight; the constants stay whole
# Strategies for several GPUs: ddp (each holds the whole model) or fsdp (sharded); auto picks ddp
# when it fits the per-GPU budget, else fsdp.
STRATEGIES = ("auto", "ddp", "fsdp")
FSDP_GATHERED_BLOCKS = 2
# engine/fused/loss.py computes the loss over answer tokens in chunks of this many (LOSS_CHUNK_TOKENS).
LOSS_CHUNK_TOKENS = 1024
# engine/fused/blocks.py runs a block's MLP over this many tokens at a time (TILE_TOKENS).
MLP_TILE_TOKENS = 2048
ATTENTION_QUERY_CHUNK = 1024  # engine/fused/attention.py: queries a chunk where rows need a mask
# packing=auto packs when the training examples' mean length is at most this share of max_seq_length.
PACKING_MAX_MEAN_SHARE = 0.5
# With activation offload, block inputs on the device at once (engine/train/offload.py).
OFFLOAD_IN_FLIGHT = 3
# What CUDA itself holds outside PyTorch's allocator (driver context, kernels, cuBLAS handles).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# PyTorch's caching allocator reserves more than it hands out (block rounding, fragmentation):
# reserved/allocated was 1.056-1.076 for LQMF's loop on an H200 (docs/memory.md).
ALLOCATOR_SLACK = 0.08
# With activation offload, copies on side streams keep freed blocks reserved until they finish:
# reserved/allocated was 1.161-1.163 in the two offloaded H200 runs (docs/memory.md).
ALLOCATOR_SLACK_OFFLOADED = 0.16
# Under FSDP the blocks' weights are gathered on FSDP's own streams, and the caching allocator keeps
# blocks freed there apart from the compute stream's: what a step allocates and frees (activations,
# gathered blocks) came close to being reserved twice, 1.495 x allocated in all, in the FSDP-QLoRA
# run on two H200s (docs/performance.md, h200x2-memory-fsdp-mb2.json): 0.9 of it on top of the 8%.
FSDP_STREAM_SLACK = 0.9

GATED_MLP_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                   "olmo", "olmo2", "starcoder2_gated", "cohere", "granite", "smollm3"}
ENCODER_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet"}
LAYER_NORM_TYPES = ENCODER_TYPES | {"gpt2", "gpt_neox", "opt", "bloom", "falcon", "phi"}
# Llama-style SiLU-gated MLPs: with the fused kernels liger-kernel's SiLU-multiply keeps gate and up only
# (engine/fused/blocks.py: FusedSwiGLU), where PyTorch's SiLU and multiply keep act(gate) too.
FUSED_SWIGLU_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


# What a block's linear layer reads: the attention norm's output, the attention output, the MLP
# norm's output, or the MLP's inner activation.
ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT = "attention input", "attention output", "mlp input", "mlp inner"


class Linear(NamedTuple):
    in_features: int
    out_features: int
    reads: str


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a transformer that memory and compute depend on."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    gated_mlp: bool
    encoder: bool
    positions: int  # learned position embeddings (0 for rotary models)
    max_positions: int | None
    sliding_window: int | None = None  # attention window (Mistral-7B-v0.1: 4,096); None: the whole sequence

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape | None:
        """The shape from a config.json dict, or None when it lacks the basic sizes."""
        hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or config.get("dim")
        layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("n_layers")
        vocab = config.get("vocab_size")
        if not (hidden and layers and vocab):
            return None
        model_type = str(config.get("model_type") or "")
        heads = config.get("num_attention_heads") or config.get("n_head") or config.get("n_heads") or 1
        kv_heads = config.get("num_key_value_heads") or heads
        intermediate = (config.get("intermediate_size") or config.get("n_inner") or config.get("hidden_dim")
                        or 4 * hidden)
        gated = model_type in GATED_MLP_TYPES
        learned_positions = model_type in ENCODER_TYPES or model_type in {"gpt2", "opt"}
        max_positions = config.get("max_position_embeddings") or config.get("n_positions")
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        return cls(
            model_type=model_type, hidden=int(hidden), layers=int(layers), vocab=int(vocab),
            intermediate=int(intermediate), heads=int(heads), kv_heads=int(kv_heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied_embeddings=bool(config.get("tie_word_embeddings", not gated)), gated_mlp=gated,
            encoder=model_type in ENCODER_TYPES,
            positions=int(max_positions or 0) if learned_positions else 0,
            max_positions=int(max_positions) if max_positions else None,
            sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> dict[str, Linear]:
        """The linear layers of one transformer block, by this family's module names."""
        h, inter, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        t = self.model_type
        if t == "phi3":
            return {"qkv_proj": Linear(h, q + 2 * kv, ATTN_IN), "o_proj": Linear(q, h, ATTN_OUT),
                    "gate_up_proj": Linear(h, 2 * inter, MLP_IN), "down_proj": Linear(inter, h, MLP_OUT)}
        if t == "gpt2":  # c_proj names both the attention output and the MLP output
            return {"c_attn": Linear(h, 3 * h, ATTN_IN), "attn.c_proj": Linear(h, h, ATTN_OUT),
                    "c_fc": Linear(h, inter, MLP_IN), "mlp.c_proj": Linear(inter, h, MLP_OUT)}
        if t == "distilbert":
            return {"q_lin": Linear(h, h, ATTN_IN), "k_lin": Linear(h, h, ATTN_IN), "v_lin": Linear(h, h, ATTN_IN),
                    "out_lin": Linear(h, h, ATTN_OUT), "lin1": Linear(h, inter, MLP_IN),
                    "lin2": Linear(inter, h, MLP_OUT)}
        if self.encoder:
            return {"query": Linear(h, q, ATTN_IN), "key": Linear(h, kv, ATTN_IN), "value": Linear(h, kv, ATTN_IN),
                    "attention.output.dense": Linear(q, h, ATTN_OUT), "intermediate.dense": Linear(h, inter, MLP_IN),
                    "output.dense": Linear(inter, h, MLP_OUT)}
        linears = {"q_proj": Linear(h, q, ATTN_IN), "k_proj": Linear(h, kv, ATTN_IN),
                   "v_proj": Linear(h, kv, ATTN_IN), "o_proj": Linear(q, h, ATTN_OUT)}
        if self.gated_mlp:
            linears.update({"gate_proj": Linear(h, inter, MLP_IN), "up_proj": Linear(h, inter, MLP_IN),
                            "down_proj": Linear(inter, h, MLP_OUT)})
        else:
            linears.update({"fc1": Linear(h, inter, MLP_IN), "fc2": Linear(inter, h, MLP_OUT)})
        return linears

    @property
    def block_linear_params(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.block_linears().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings (and learned positions), plus an untied output head."""
        head = 0 if self.tied_embeddings or self.encoder else self.vocab * self.hidden
        return (self.vocab + self.positions) * self.hidden + head

    @property
    def norm_params(self) -> int:
        per_norm = 2 * self.hidden if self.model_type in LAYER_NORM_TYPES else self.hidden
        return (2 * self.layers + 1) * per_norm

    @property
    def parameters(self) -> int:
        return self.layers * self.block_linear_params + self.embedding_params + self.norm_params


def approx_parameters(config: dict[str, Any]) -> int | None:
    """Parameter count of a transformer from its config.json (blocks, embeddings, norms)."""
    shape = ModelShape.from_config(config)
    return shape.parameters if shape else None


@dataclass(frozen=True)
class TrainSettings:
    """What a training run's memory depends on, besides the model's shape."""

    micro_batch: int = 2
    seq_len: int = 512
    lora_r: int = 16
    target_modules: tuple[str, ...] | None = None  # None: every linear layer of a block ("all-linear")
    lora_dropout: float = 0.05
    quantize_4bit: bool = True
    gradient_checkpointing: bool = True
    task: str = "causal"  # causal | classification
    num_labels: int = 2
    device: str = "cuda"  # cuda: bf16 compute, paged 8-bit AdamW, CUDA context; cpu/mps: fp32, AdamW
    padded: bool | None = None  # micro-batches hold padding; None: either (the worse counts)
    offload_activations: bool = False  # checkpointed activations wait in host memory (engine/train/offload.py)
    # Packing (engine/data.py: pack): examples end to end in sequences of up to this many tokens; 0: off.
    pack_tokens: int = 0
    tiled_mlp: bool = False  # the MLP runs TILE_TOKENS at a time, each tile checkpointed (engine/fused/blocks.py)
    # Blocks that keep what they save for backward (offloaded with the rest) instead of being recomputed
    # (with gradient checkpointing; engine/train/offload.py).
    kept_layers: int = 0
    # Blocks whose MLP keeps gate and up on the device while the rest of the block is recomputed
    # (with gradient checkpointing, not with the tiled MLP; engine/fused/blocks.py: KeptMLP).
    kept_mlps: int = 0
    fused_kernels: str = "off"  # auto | on | off, as engine/fused/blocks.py: fused_kernels_wanted decides
    # LQMF's LoRA forward recomputes each LoRA layer's dropout in backward instead of keeping its output and
    # mask (engine/lora/lean.py: _low_rank); off, it keeps them (recompute_lora_dropout_for decides).
    recompute_lora_dropout: bool = True
    gpus: int = 1  # processes, one per GPU; micro_batch is per GPU
    strategy: str = "ddp"  # with gpus > 1: ddp | fsdp
    # Off CUDA: what the process holds before the weights load (interpreter, torch, transformers),
    # counted in the total in place of the CUDA context, so the total compares with the process's RSS.
    process_baseline: int = 0

    @property
    def offloadable(self) -> bool:
        """Whether activation offload can apply: only on CUDA, with gradient checkpointing, not under FSDP."""
        return self.gradient_checkpointing and self.device == "cuda" and not self.sharded

    @property
    def tiled(self) -> bool:
        """Whether the MLP runs in tiles: asked for, with gradient checkpointing (its recomputation keeps one tile)."""
        return self.tiled_mlp and self.gradient_checkpointing

    @property
    def fused(self) -> bool:
        """Whether the run takes liger-kernel's fused modules (`fused_kernels_expected`; CUDA only)."""
        return self.device == "cuda" and fused_kernels_expected(self.fused_kernels, self.device, self.gpus, self.tiled)

    @property
    def sharded(self) -> bool:
        return self.gpus > 1 and self.strategy == "fsdp"

    @property
    def lora_dropout_kept(self) -> bool:
        return lora_dropout_kept(self.lora_dropout, self.sharded, self.recompute_lora_dropout, self.fused)

    @property
    def offloaded(self) -> bool:
        return self.offload_activations and self.offloadable

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of activations and frozen weights: bf16 (or fp16) on CUDA, fp32 elsewhere."""
        return 2 if self.device == "cuda" else 4


def fused_kernels_expected(mode: str, device: str, processes: int, tiled_mlp: bool) -> bool:
    """Whether `fused_kernels: mode` (auto | on | off) asks for the fused kernels: on; auto only for one
    process on CUDA without the tiled MLP (multi-GPU runs and the tiled MLP with them are not checked on
    a GPU). Whether liger-kernel is there is the engine's to say."""
    return mode == "on" or (mode == "auto" and device == "cuda" and processes == 1 and not tiled_mlp)


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, in bytes, broken down."""

    weights: int
    lora: int  # LoRA parameters and their gradients (fp32)
    optimizer: int
    activations: int  # saved for backward + one layer's recompute working set
    logits_loss: int
    peak_allocated: int
    allocator_slack: int
    cuda_context: int
    total: int
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {f"{key}_gb": round(value / GiB, 4) for key, value in asdict(self).items() if key != "details"}
        return {**out, "details": self.details}

    def fits(self, budget_bytes: float, context_counted: bool = True) -> bool:
        """Whether the run fits budget_bytes; context_counted=False when the budget is free memory
        measured after this process already created its CUDA context."""
        return self.total - (0 if context_counted else self.cuda_context) <= budget_bytes


def _lora_targets(shape: ModelShape, targets: tuple[str, ...] | None) -> dict[str, Linear]:
    """The block linears that get LoRA; like PEFT, a target matches the end of a module's name."""
    linears = shape.block_linears()
    if targets is None or targets == ("all-linear",):
        return linears
    return {name: lin for name, lin in linears.items()
            if any(name == t or name.endswith("." + t) or name.split(".")[-1] == t for t in targets)}


def _sharded_weights(shape: ModelShape, settings: TrainSettings, quantized: int, plain_bytes: int) -> int:
    """FSDP: each GPU's share of the 4-bit storage, the quantization constants whole, the root unit
    (everything outside the blocks) whole, and two blocks gathered at a time."""
    per_block = shape.block_linear_params * (NF4_BYTES_PER_PARAM if settings.quantize_4bit else
                                             settings.compute_bytes)
    packed = quantized * NF4_PACKED_BYTES_PER_PARAM
    constants = quantized * (NF4_BYTES_PER_PARAM - NF4_PACKED_BYTES_PER_PARAM)
    if not settings.quantize_4bit:  # the blocks' linears are sharded in the compute dtype
        packed = shape.layers * shape.block_linear_params * settings.compute_bytes
        plain_bytes -= int(packed)
    return int(packed / settings.gpus + constants + plain_bytes + FSDP_GATHERED_BLOCKS * per_block)


def _optimizer_bytes(tensor_sizes: list[int], device: str, sharded: bool = False) -> tuple[int, int]:
    """(state bytes, of which paged outside PyTorch's allocator) for AdamW over these tensors:
    8-bit paged on one CUDA GPU or under DDP, fp32 on the CPU and under FSDP (its flat shards)."""
    if device != "cuda" or sharded:
        return sum(tensor_sizes) * ADAM32_BYTES_PER_PARAM, 0
    total = paged = 0
    for n in tensor_sizes:
        size = int(n * ADAM8BIT_BYTES_PER_PARAM) if n >= ADAM8BIT_MIN_SIZE else n * ADAM32_BYTES_PER_PARAM
        total += size
        if n >= PAGED_MIN_SIZE:
            paged += size
    return total, paged


def _block_bytes_per_token(shape: ModelShape, settings: TrainSettings, lora: dict[str, Linear],
                           padded: bool, seq_len: int) -> tuple[float, float, float]:
    """(bytes per token one block keeps for backward besides its input, of which its MLP's share, extra
    bytes during its backward).

    Counted op by op and checked with PyTorch's saved-tensor hooks on the CPU: the residual stream
    after attention; q and k after rotary, and v (with padding or packing, k and v repeated to every
    head, as transformers does when a mask rules out SDPA's grouped-query path, and SDPA's additive
    mask); the attention output; gate, act(gate) and up of a gated MLP (gate and up alone under
    liger-kernel's SiLU-multiply; fc1's output otherwise).
    Frozen linears, 4-bit or not, keep nothing: their input gradient needs only the weight. Norms
    (LayerNorm, under autocast) keep an fp32 copy of their input when activations are not fp32;
    RMSNorms in training are engine/fused/norm.py's, which keep none. Each LoRA layer keeps its
    r-wide intermediate and its input, once per distinct input: LQMF's LoRA forward recomputes the
    dropout in backward (engine/lora/lean.py: _low_rank). Where it keeps the dropout instead
    (recompute_lora_dropout off), and under FSDP (PEFT's forward), each LoRA layer keeps its dropout
    output and mask (bool on CUDA, a full-size float on the CPU).
    """
    h, inter, q, kv = shape.hidden, shape.intermediate, shape.q_width, shape.kv_width
    act = settings.compute_bytes
    gqa = shape.kv_heads < shape.heads
    attention = (3 * q if gqa else q + 2 * kv) + seq_len if padded else q + 2 * kv
    fused_swiglu = settings.fused and shape.model_type in FUSED_SWIGLU_TYPES
    mlp = (2 if fused_swiglu else 3 if shape.gated_mlp else 1) * inter * act
    per_token = (h + attention + q) * act + mlp  # residual, attention inputs, its output, MLP
    if act != 4 and shape.model_type in LAYER_NORM_TYPES:
        per_token += 2 * h * 4  # the two norms' fp32 copies (engine/fused/norm.py keeps none of RMSNorms)
    mask_bytes = 1 if settings.device == "cuda" else act
    kept_inputs: dict[str, int] = {}
    for lin in lora.values():
        own = settings.lora_r * act
        if settings.lora_dropout_kept:
            own += lin.in_features * (act + mask_bytes)
        elif lin.reads != ATTN_OUT:  # SDPA keeps the attention output already
            kept_inputs[lin.reads] = lin.in_features * act
        per_token += own
        mlp += own if lin.reads in (MLP_IN, MLP_OUT) else 0
    per_token += sum(kept_inputs.values())
    mlp += sum(size for reads, size in kept_inputs.items() if reads in (MLP_IN, MLP_OUT))
    # Backward through the block: the gradients of the MLP's inner tensors coexist with what it kept.
    return per_token, mlp, 2 * inter * act


def _packed_rows(settings: TrainSettings) -> tuple[int, int]:
    """(rows, tokens per row) of a micro-batch: micro_batch x seq_len, or packed, the micro-batch's
    examples (each up to seq_len tokens) in full sequences of up to pack_tokens, one more for a
    partial one."""
    b, s = settings.micro_batch, settings.seq_len
    if not settings.pack_tokens:
        return b, s
    width = min(max(settings.pack_tokens, s), b * s)  # one example alone is its own width
    return min(b, math.ceil(b * s / width) + (1 if b > 1 else 0)), width


def takes_chunked_attention(shape: ModelShape, row_tokens: int, packed: bool) -> bool:
    """Whether training rows of row_tokens take engine/fused/attention.py's chunked attention: a causal
    model's rows holding packed examples, or longer than its sliding window."""
    windowed = shape.sliding_window is not None and row_tokens > shape.sliding_window
    return not shape.encoder and (packed or windowed)


def _attention_chunk_bytes(shape: ModelShape, act: int, rows: int, s: int) -> int:
    """Chunked attention's working set while one chunk of queries is recomputed and differentiated: its
    mask for every query head of a group (with its unrepeated and boolean forms), the folded queries,
    output and their gradients, and the whole row's key and value gradients its slices add into."""
    chunk = min(ATTENTION_QUERY_CHUNK, s)
    keys = min(s, chunk + shape.sliding_window) if shape.sliding_window else s
    group = shape.heads // shape.kv_heads
    mask = rows * chunk * keys * (group * act + act + 2)
    return mask + rows * chunk * shape.q_width * act * 4 + rows * s * shape.kv_width * act * 4


def _flash_backward_bytes(shape: ModelShape, act: int, tokens: int) -> int:
    """Flash attention's backward transients for unmasked rows on CUDA (SDPA with grouped-query heads,
    the path transformers takes without a mask): the float32 accumulator of dq, with grouped-query heads
    dk and dv at every query head before they are summed, and dq, dk and dv themselves."""
    q, kv = shape.q_width, shape.kv_width
    expanded = 2 * q * act if shape.kv_heads < shape.heads else 0
    return tokens * (4 * q + expanded + (q + 2 * kv) * act)


def _activations(shape: ModelShape, settings: TrainSettings, lora: dict[str, Linear], b: int,
                 s: int) -> tuple[int, int]:
    """(saved for backward, one block's recompute and backward working set) for b rows of s tokens.

    With gradient checkpointing each block keeps only its input, and backward recomputes one block at
    a time; without it every block keeps what it saved. Padded (or packed) and unpadded micro-batches
    differ (see _block_bytes_per_token); the worse one counts.
    """
    L, h, act, tokens = shape.layers, shape.hidden, settings.compute_bytes, b * s
    paddings = [settings.padded] if settings.padded is not None else ([False, True] if b > 1 else [False])
    chunked = takes_chunked_attention(shape, s, bool(settings.pack_tokens))
    if chunked:  # engine/fused/attention.py: no s x s mask, k and v not repeated; a chunk's mask while it runs
        paddings = [False]
    tiled = settings.tiled and tokens > MLP_TILE_TOKENS
    tile = MLP_TILE_TOKENS if tiled else tokens  # tiles of the micro-batch's tokens, all rows flattened
    boundary = tokens * h * act  # a block's input; the last block's output is the final norm's input
    saved = working = 0
    for padded in paddings:
        per_token, mlp, backward_per_token = _block_bytes_per_token(shape, settings, lora, padded, s)
        block = tokens * (per_token - mlp) + tile * mlp
        if tiled:  # the tiles' input (the MLP norm's output) stays whole for their recomputation
            block += tokens * h * act
        backward = tile * backward_per_token
        this_saved = (L + 1) * boundary + (0 if settings.gradient_checkpointing else L * block)
        if settings.offloaded:  # on the device: the input being recomputed, the next one arriving, an output
            this_saved = OFFLOAD_IN_FLIGHT * boundary
        this_saved += _kept_blocks(settings, L) * block + _kept_mlps(settings, L) * tokens * mlp
        this_saved += tokens * s if padded else 0  # the boolean mask (b x 1 x s x s), shared by every block
        if not (chunked or padded or shape.encoder) and settings.device == "cuda":
            # attention's backward comes after the MLP's, whose kept tensors and gradients are gone by then
            backward = max(backward, _flash_backward_bytes(shape, act, tokens) - tile * mlp)
        this_working = (block if settings.gradient_checkpointing else 0) + backward
        this_working += _attention_chunk_bytes(shape, act, b, s) if chunked else 0
        if this_saved + this_working > saved + working:
            saved, working = this_saved, this_working
    return saved, working


def asked_kept_layers(asked: str) -> int:
    """kept_layers or kept_mlps (off | auto | N) as a number of layers: N; off and auto (which the planner
    resolves with `kept_layers_for` and `kept_mlps_for`) 0."""
    return int(asked) if asked.isdigit() else 0


def _kept_layers(settings: TrainSettings, layers: int) -> int:
    """The blocks settings keep: none without gradient checkpointing, at most the model's layers."""
    return min(settings.kept_layers, layers) if settings.gradient_checkpointing else 0


def _kept_mlps(settings: TrainSettings, layers: int) -> int:
    """The MLPs settings keep: in checkpointed blocks that are not kept whole, none with the tiled MLP."""
    if not settings.gradient_checkpointing or settings.tiled:
        return 0
    return min(settings.kept_mlps, layers - _kept_layers(settings, layers))


def _kept_blocks(settings: TrainSettings, layers: int) -> int:
    """How many kept blocks' saved tensors are on the device at once: every kept block, or offloaded one,
    being copied out in forward or arriving ahead of its backward (engine/train/offload.py)."""
    kept = _kept_layers(settings, layers)
    return min(kept, 1) if settings.offloaded else kept


def kept_layers_for(shape: ModelShape, settings: TrainSettings, budget: float, context_counted: bool = True,
                    asked: str = "off") -> int:
    """The blocks to keep (kept_layers: off | auto | a number) at settings' micro-batch: a number as
    asked, at most the model's layers; auto, for one process (on several GPUs only a number keeps any):
    as many as fit the budget on the device, none where activations are offloaded (one block in three
    kept in host memory ran 8-9% slower than recomputing them, seq 512 and 2048 on an H100: the host
    link did not keep pace, docs/performance.md); none without gradient checkpointing, which keeps
    everything anyway."""
    if asked == "auto" and settings.offloaded:
        return 0
    return _kept_count(shape, settings, budget, context_counted, asked, "kept_layers", shape.layers)


def kept_mlps_for(shape: ModelShape, settings: TrainSettings, budget: float, context_counted: bool = True,
                  asked: str = "off") -> int:
    """The MLPs to keep (kept_mlps: off | auto | a number) at settings' micro-batch and kept layers, in
    blocks not kept whole: a number as asked, at most those blocks; auto, for one process, as many as
    fit the budget. On the device, with or without activation offload; none with the tiled MLP (its
    tiles are recomputed one at a time to save the memory these keep) or without checkpointing."""
    if settings.tiled:
        return 0
    blocks = shape.layers - _kept_layers(settings, shape.layers)
    return _kept_count(shape, settings, budget, context_counted, asked, "kept_mlps", blocks)


def _kept_count(shape: ModelShape, settings: TrainSettings, budget: float, context_counted: bool, asked: str,
                field: str, most: int) -> int:
    """asked (off | auto | a number) for the settings field kept_layers or kept_mlps: a number as asked, at
    most `most`; auto the largest count up to `most` that fits the budget, for one process; 0 without
    gradient checkpointing."""
    if asked == "off" or not settings.gradient_checkpointing or (asked == "auto" and settings.gpus > 1):
        return 0
    if asked != "auto":
        return min(asked_kept_layers(asked), most)

    def fits(kept: int) -> bool:
        return estimate(shape, replace(settings, **{field: kept})).fits(budget, context_counted)

    return max(0, _largest(fits, 0, most))


def lora_dropout_kept(lora_dropout: float, sharded: bool, recompute_lora_dropout: bool, fused: bool) -> bool:
    """Whether each LoRA layer keeps its dropout's output and mask for backward: with dropout, under FSDP
    (PEFT's forward keeps them) or where LQMF's forward does not recompute them, unless the fused kernels
    draw the mask inside the rank-r product (engine/lora/dropout.py), which keeps neither."""
    return lora_dropout > 0 and not fused and (sharded or not recompute_lora_dropout)


def recompute_lora_dropout_for(shape: ModelShape, settings: TrainSettings, budget: float | None,
                               context_counted: bool = True, asked: str = "auto") -> bool:
    """Whether LQMF's LoRA forward recomputes the dropout in backward (recompute_lora_dropout: auto | on |
    off): auto keeps the dropout's output and mask where that fits the budget at settings' micro-batch
    (it was chosen with the dropout recomputed, so keeping it never costs micro-batch), and recomputes
    where there is no budget to check against. Without LoRA dropout there is nothing to recompute, and with
    the fused kernels nothing to keep: they draw the mask inside the rank-r product (engine/lora/dropout.py),
    which keeps what the recomputed dropout keeps."""
    if settings.fused:
        return settings.lora_dropout > 0
    if asked in ("on", "off") or settings.lora_dropout == 0:
        return asked == "on" and settings.lora_dropout > 0
    return budget is None or not estimate(shape, replace(settings, recompute_lora_dropout=False)).fits(
        budget, context_counted)


def budget_choices(shape: ModelShape, settings: TrainSettings, budget: float | None, config: Any,
                   context_counted: bool = True) -> TrainSettings:
    """settings with what the budget decides at their micro-batch, in this order: the LoRA dropout kept or
    recomputed, then kept layers and kept MLPs (config's recompute_lora_dropout, kept_layers, kept_mlps)."""
    settings = replace(settings, recompute_lora_dropout=recompute_lora_dropout_for(
        shape, settings, budget, context_counted, config.recompute_lora_dropout))
    if budget is None:
        return settings
    settings = replace(settings, kept_layers=kept_layers_for(shape, settings, budget, context_counted,
                                                             config.kept_layers))
    return replace(settings, kept_mlps=kept_mlps_for(shape, settings, budget, context_counted, config.kept_mlps))


def kept_block_bytes(shape: ModelShape, settings: TrainSettings) -> int:
    """What one kept block holds for backward at settings' micro-batch (the planner's count)."""
    return (estimate(shape, replace(settings, kept_layers=1, offload_activations=False)).peak_allocated
            - estimate(shape, replace(settings, kept_layers=0, offload_activations=False)).peak_allocated)


def estimate(shape: ModelShape, settings: TrainSettings) -> MemoryEstimate:
    """Peak memory of a LoRA/QLoRA training step of shape under settings (see the module docstring)."""
    b, s = _packed_rows(settings)
    L, h, V = shape.layers, shape.hidden, shape.vocab
    c = act = settings.compute_bytes
    classification = settings.task == "classification"

    # Weights: 4-bit block linears; everything else frozen in the compute dtype.
    quantized = L * shape.block_linear_params if settings.quantize_4bit else 0
    plain = shape.parameters - quantized
    head = shape.hidden * settings.num_labels if classification else 0
    weights = int(quantized * NF4_BYTES_PER_PARAM) + plain * c + head * 4
    if settings.sharded:
        weights = _sharded_weights(shape, settings, quantized, plain * c + head * 4)

    # LoRA: A (r x in) and B (out x r) per targeted linear per layer, fp32, with fp32 gradients;
    # a classification head is trained in full (PEFT modules_to_save).
    lora = _lora_targets(shape, settings.target_modules)
    tensors = [n for lin in lora.values() for n in (settings.lora_r * lin.in_features,
                                                    settings.lora_r * lin.out_features)] * L
    if classification:
        tensors.append(head)
    lora_params = sum(tensors)
    optimizer, paged = _optimizer_bytes(tensors, settings.device, settings.sharded)
    lora_bytes = 2 * lora_params * 4
    if settings.sharded:  # LoRA weights, gradients and AdamW state sharded; one LoRA unit gathered
        lora_bytes = lora_bytes // settings.gpus + 2 * max(tensors) * 4
        optimizer //= settings.gpus
    elif settings.gpus > 1:  # DDP: the gradients flattened into one buffer for their all-reduce
        lora_bytes += lora_params * 4

    saved, working = _activations(shape, settings, lora, b, s)
    if settings.quantize_4bit:
        # bitsandbytes dequantizes a 4-bit weight to the compute dtype for each matmul.
        working += max(lin.in_features * lin.out_features for lin in shape.block_linears().values()) * c
    if classification:
        logits_loss = 0
    else:
        # The answer tokens' hidden states, gathered for the chunked loss (all tokens, at worst).
        answers = b * max(s - 1, 1)
        saved += 0 if settings.offloaded else answers * h * act
        # engine/fused/loss.py: per chunk its fp32 logits, turned into the softmax's gradient in place, and
        # under bf16 one bf16 copy (the head's output, then the gradient fed to the matmul); the
        # gradient for the hidden states (answers x h) waits for backward in the place of the inputs.
        chunk = min(LOSS_CHUNK_TOKENS, answers)
        logits_loss = chunk * V * (4 + (c if c != 4 else 0))
    peak = weights + lora_bytes + optimizer + saved + max(working, logits_loss)
    context = CUDA_CONTEXT_BYTES if settings.device == "cuda" else settings.process_baseline
    slack_share = ALLOCATOR_SLACK_OFFLOADED if settings.offloaded else ALLOCATOR_SLACK
    slack = int(slack_share * (peak - paged)) if settings.device == "cuda" else 0
    if settings.sharded and settings.device == "cuda":
        gathered = FSDP_GATHERED_BLOCKS * shape.block_linear_params * (
            NF4_BYTES_PER_PARAM if settings.quantize_4bit else c)
        slack += int(FSDP_STREAM_SLACK * (saved + max(working, logits_loss) + gathered))
    details = {
        "parameters": shape.parameters, "quantized_params": quantized, "lora_params": lora_params,
        "lora_modules": sorted(lora), "activation_bytes": act, "compute_bytes": c,
        "saved_activations_gb": round(saved / GiB, 4), "layer_working_set_gb": round(working / GiB, 4),
        "paged_optimizer_gb": round(paged / GiB, 4), "activations_offloaded": settings.offloaded,
        "kept_layers": _kept_layers(settings, L), "kept_mlps": _kept_mlps(settings, L),
        "lora_dropout_kept": settings.lora_dropout_kept,
        "gpus": settings.gpus, "strategy": settings.strategy if settings.gpus > 1 else "single",
        "chunked_attention": takes_chunked_attention(shape, s, bool(settings.pack_tokens)),
        "process_baseline_gb": round(settings.process_baseline / GiB, 4),
    }
    return MemoryEstimate(
        weights=weights, lora=lora_bytes, optimizer=optimizer, activations=saved + working,
        logits_loss=logits_loss, peak_allocated=int(peak), allocator_slack=slack, cuda_context=context,
        total=int(peak) + slack + context, details=details,
    )


# ----------------------------------------------------------------------------- serving

# engine/serve/scheduler.py prefills a long prompt this many tokens at a time.
PREFILL_CHUNK_TOKENS = 512
# engine/decode/batched.py: passes over prompts' first chunks of up to PREFILL_GRAPH_TOKENS (padded) tokens,
# each chunk up to PREFILL_GRAPH_KEYS, run as CUDA graphs on CUDA, whose pool keeps its own working set.
PREFILL_GRAPH_TOKENS, PREFILL_GRAPH_KEYS = 512, 256
MAX_SERVING_BATCH = 256


@dataclass
class ServingEstimate:
    """Memory of `lqmf serve` with continuous batching, in bytes: the base, resident adapters, the KV
    cache of `sequences` sequences of `seq_len` tokens, and the largest step's working set."""

    sequences: int
    seq_len: int
    weights: int
    adapters: int
    kv_cache: int
    working: int
    allocator_slack: int
    cuda_context: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {key: (value if key in ("sequences", "seq_len") else round(value / GiB, 4))
                for key, value in asdict(self).items()}


def serving_adapter_bytes(shape: ModelShape, *, device: str, adapters: int = 1, lora_r: int = 16,
                          target_modules: tuple[str, ...] | None = None) -> int:
    """Bytes of `adapters` adapters' LoRA weights as the server holds them: r x (in + out) per targeted linear
    of every layer, in the compute dtype (bf16 on CUDA, float32 on the CPU)."""
    lora = _lora_targets(shape, target_modules)
    per_layer = sum(lora_r * (lin.in_features + lin.out_features) for lin in lora.values())
    return adapters * shape.layers * per_layer * (2 if device == "cuda" else 4)


def serving_estimate(shape: ModelShape, *, sequences: int, seq_len: int, quantize_4bit: bool, device: str,
                     adapters: int = 1, lora_r: int = 16, target_modules: tuple[str, ...] | None = None
                     ) -> ServingEstimate:
    """What serving shape needs for `sequences` sequences of up to `seq_len` tokens each (engine/decode/batched.py):

    weights (4-bit block linears or not) + adapters (r x (in + out) per targeted linear, compute
    dtype) + KV cache (keys and values, every layer, seq_len + 1 positions per sequence) + the
    larger of a decode step (bitsandbytes' dequantized weight, the MLP's inner tensors, fp32
    logits for every row) and a prefill chunk (its fp32 attention scores and MLP tensors); on CUDA
    also the captured prefill passes' own pool (a PREFILL_GRAPH_TOKENS pass and, 4-bit, a dequantized
    weight), which the eager allocations cannot reuse.
    """
    c = 2 if device == "cuda" else 4
    quantized = shape.layers * shape.block_linear_params if quantize_4bit else 0
    weights = int(quantized * NF4_BYTES_PER_PARAM) + (shape.parameters - quantized) * c
    adapter_bytes = serving_adapter_bytes(shape, device=device, adapters=adapters, lora_r=lora_r,
                                          target_modules=target_modules)
    kv = 2 * shape.layers * shape.kv_width * (seq_len + 1) * sequences * c
    dequantized = max(lin.in_features * lin.out_features for lin in shape.block_linears().values()) * c \
        if quantize_4bit else 0
    decode = sequences * (3 * shape.intermediate * c + shape.vocab * (c + 4))

    def prefill(tokens: int, keys: int) -> int:  # fp32 scores and probabilities, MLP tensors, one row's logits
        return shape.heads * tokens * keys * 4 * 2 + tokens * 3 * shape.intermediate * c + shape.vocab * (c + 4)

    working = max(decode, prefill(min(PREFILL_CHUNK_TOKENS, seq_len), seq_len)) + dequantized
    if device == "cuda":
        working += prefill(PREFILL_GRAPH_TOKENS, min(PREFILL_GRAPH_KEYS, seq_len)) + dequantized
    peak = weights + adapter_bytes + kv + working
    slack = int(ALLOCATOR_SLACK * peak) if device == "cuda" else 0
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return ServingEstimate(sequences, seq_len, weights, adapter_bytes, kv, working, slack, context,
                           peak + slack + context)


def adapter_table_slots(max_adapters: int) -> int:
    """Slots the server's adapter tables hold for max_adapters resident adapters (engine/lora/stacked.py:
    AdapterTables): one more, as an adapter loads before the least recently used is evicted."""
    return max_adapters + 1


def adapter_tables_held(max_adapters: int) -> int:
    """Adapters' worth of memory in those tables: their slots and index 0's zeros (rows without an
    adapter); serving_estimate's `adapters` for `lqmf serve --max-adapters max_adapters`."""
    return adapter_table_slots(max_adapters) + 1


def largest_serving_batch(shape: ModelShape, budget: float, **options: Any) -> int:
    """The most sequences (at most MAX_SERVING_BATCH) whose serving estimate fits budget bytes; 0 if none."""
    return _largest(lambda n: serving_estimate(shape, sequences=n, **options).total <= budget, 1, MAX_SERVING_BATCH)


# ----------------------------------------------------------------------------- models and configs

BUILTIN_SHAPES = Path(__file__).with_name("builtin_shapes.yaml")


@functools.cache
def _builtin_shapes() -> dict[str, dict[str, Any]]:
    return load_yaml(BUILTIN_SHAPES.read_text(encoding="utf-8")) or {}


def model_shape(model: ResolvedModel) -> tuple[ModelShape | None, str]:
    """The shape of a resolved model and where it came from: its config.json, or LQMF's table of the
    built-in catalogue's models when that is not downloaded; (None, reason) when neither is known."""
    if model.config:
        shape = ModelShape.from_config(model.config)
        return (shape, "config.json") if shape else (None, "its config.json lacks hidden_size/num_hidden_layers")
    known = _builtin_shapes().get(model.source)
    if known:
        return ModelShape.from_config(known), "LQMF's table of catalogue models"
    return None, "its config.json is not available locally (download the model or pass its folder)"


def require_shape(model: ResolvedModel) -> ModelShape:
    shape, origin = model_shape(model)
    if shape is None:
        raise NotFoundError(f"cannot estimate memory for '{model.reference}': {origin}")
    return shape


def settings_for(config: Any, model: ResolvedModel, *, device: str, seq_len: int | None = None,
                 micro_batch: int | None = None, num_labels: int = 2,
                 quantize_4bit: bool | None = None, gpus: int = 1, strategy: str = "ddp") -> TrainSettings:
    """TrainSettings from a TrainConfig (lqmf.core.config) for model on device (per GPU on gpus)."""
    targets = config.target_modules or model.target_modules
    return TrainSettings(
        micro_batch=micro_batch or config.per_device_train_batch_size,
        seq_len=seq_len or config.max_seq_length,
        lora_r=config.lora_r,
        target_modules=tuple(targets) if targets else None,
        lora_dropout=config.lora_dropout,
        quantize_4bit=model.prequantized_4bit  # weights saved in 4-bit count as 4-bit whatever is asked
        or (config.use_4bit_quantization if quantize_4bit is None else quantize_4bit),
        gradient_checkpointing=config.use_gradient_checkpointing,
        task="classification" if config.task_type == "classification" else "causal",
        num_labels=num_labels,
        device=device,
        offload_activations=config.offload_activations == "on",
        pack_tokens=config.max_seq_length if getattr(config, "packing", "off") == "on" else 0,
        tiled_mlp=getattr(config, "tiled_mlp", "off") == "on",
        kept_layers=asked_kept_layers(getattr(config, "kept_layers", "off")),
        kept_mlps=asked_kept_layers(getattr(config, "kept_mlps", "off")),
        fused_kernels=getattr(config, "fused_kernels", "off") if importlib.util.find_spec("liger_kernel") else "off",
        gpus=gpus,
        strategy=strategy,
    )


# ----------------------------------------------------------------------------- fitting a budget

MAX_MICRO_BATCH = 1024
DEFAULT_BUDGET = "8GB"  # the guide's target GPU: what `lqmf plan` and `lqmf models list` fit without a budget
SEQ_STEP = 64


def largest_micro_batch(shape: ModelShape, settings: TrainSettings, budget: float,
                        context_counted: bool = True, limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch (at most limit) whose estimate fits budget bytes; 0 if none does."""
    def fits(m: int) -> bool:
        return estimate(shape, replace(settings, micro_batch=m)).fits(budget, context_counted)

    return _largest(fits, 1, limit)


def largest_seq_len(shape: ModelShape, settings: TrainSettings, budget: float,
                    context_counted: bool = True) -> int:
    """The longest sequence (a multiple of 64, within the model's positions) that fits; 0 if none does."""
    limit = shape.max_positions or 131072

    def fits(k: int) -> bool:  # packed: one sequence of that many tokens, whatever pack_tokens was
        seq = k * SEQ_STEP
        return estimate(shape, replace(settings, seq_len=seq, pack_tokens=seq if settings.pack_tokens else 0)
                        ).fits(budget, context_counted)

    steps = _largest(fits, 1, max(1, limit // SEQ_STEP))
    return steps * SEQ_STEP


def _largest(fits, low: int, high: int) -> int:
    """Largest n in [low, high] with fits(n), for fits monotone (true then false); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def fitting_micro_batch(shape: ModelShape, settings: TrainSettings, effective_batch: int, budget: float,
                        context_counted: bool = True) -> int:
    """The largest micro-batch, at most the one asked for, that fits and divides the effective batch
    (so that micro-batch x accumulation keeps it); 0 when even 1 does not fit."""
    for m in range(settings.micro_batch, 0, -1):
        if effective_batch % m == 0 and estimate(shape, replace(settings, micro_batch=m)).fits(budget, context_counted):
            return m
    return 0


def fit_budget(shape: ModelShape, settings: TrainSettings, effective_batch: int, budget: float,
               context_counted: bool = True, offload: str = "auto", tiled: str = "off") -> tuple[int, TrainSettings]:
    """(micro-batch, settings) to train with under budget: the largest micro-batch, at most the one
    asked for, that fits and divides the effective batch (0 when even 1 does not); with
    offload="auto", activations are offloaded when that fits a larger one; with tiled="auto" the MLP
    runs in tiles (it costs a recomputation, not measured on a GPU yet) only when nothing fits without."""
    candidates = [settings]  # cheapest first: the first with the largest micro-batch wins
    if offload == "auto" and settings.offloadable and not settings.offloaded:
        candidates.append(replace(settings, offload_activations=True))
    best, chosen = _best_fit(shape, candidates, effective_batch, budget, context_counted)
    long_enough = settings.micro_batch * settings.seq_len > MLP_TILE_TOKENS
    if best == 0 and tiled == "auto" and settings.gradient_checkpointing and not settings.tiled and long_enough:
        best, chosen = _best_fit(shape, [replace(candidate, tiled_mlp=True) for candidate in candidates],
                                 effective_batch, budget, context_counted)
    return best, (chosen if best else settings)


def _best_fit(shape: ModelShape, candidates: list[TrainSettings], effective_batch: int, budget: float,
              context_counted: bool) -> tuple[int, TrainSettings]:
    """The largest fitting micro-batch over candidates, and the first candidate that reaches it."""
    best, chosen = 0, candidates[0]
    for candidate in candidates:
        micro = fitting_micro_batch(shape, candidate, effective_batch, budget, context_counted)
        if micro > best:
            best, chosen = micro, candidate
    return best, chosen


def packing_wanted(setting: str, task: str, lengths: list[int], max_seq_length: int) -> bool:
    """Whether to pack examples (packing: on | off | auto): auto packs a causal task's examples when
    their mean length is at most PACKING_MAX_MEAN_SHARE of max_seq_length (two or more per sequence)."""
    if setting == "off" or task == "classification" or not lengths:
        return False
    return setting == "on" or sum(lengths) / len(lengths) <= PACKING_MAX_MEAN_SHARE * max_seq_length


class StrategyFit(NamedTuple):
    """How one strategy fits the per-GPU budget: its largest micro-batch (0: none) and the estimate
    there (at micro-batch 1 when none fits)."""

    strategy: str
    micro_batch: int
    settings: TrainSettings
    estimate: MemoryEstimate

    def to_dict(self, budget: float | None = None) -> dict[str, Any]:
        per_gpu = self.settings.micro_batch
        return {"strategy": self.strategy, "fits": self.micro_batch > 0, "micro_batch": self.micro_batch or None,
                "per_gpu_gb": round(self.estimate.total / GiB, 3), "offload_activations": self.settings.offloaded,
                "estimate": self.estimate.to_dict(), "at_micro_batch": per_gpu,
                **({"budget_gb": round(budget / GiB, 3)} if budget else {})}


def fit_strategies(shape: ModelShape, settings: TrainSettings, effective_batch: int, budget: float,
                   context_counted: bool = True, offload: str = "auto", tiled: str = "off") -> dict[str, StrategyFit]:
    """DDP and FSDP on settings.gpus GPUs, each GPU taking effective_batch / gpus examples per step."""
    share = max(1, effective_batch // settings.gpus)
    fits = {}
    for strategy in ("ddp", "fsdp"):
        wanted = replace(settings, strategy=strategy, micro_batch=min(settings.micro_batch, share))
        micro, chosen = fit_budget(shape, wanted, share, budget, context_counted, offload, tiled)
        at = replace(chosen, micro_batch=max(micro, 1))
        fits[strategy] = StrategyFit(strategy, micro, at, estimate(shape, at))
    return fits


def choose_strategy(fits: dict[str, StrategyFit], asked: str = "auto") -> str | None:
    """The strategy asked for, or with auto: DDP when it fits (faster: no weight gathering), else FSDP;
    None when auto finds neither fits."""
    if asked != "auto":
        return asked
    return next((name for name in ("ddp", "fsdp") if fits[name].micro_batch), None)


class Alternative(NamedTuple):
    """A change of config keys and the estimated peak memory with it."""

    changes: dict[str, Any]
    total: int

    def __str__(self) -> str:
        keys = ", ".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                         for key, value in self.changes.items())
        return f"{keys} (~{gb(self.total)})"


def what_would_fit(shape: ModelShape, settings: TrainSettings, budget: float,
                   context_counted: bool = True) -> list[Alternative]:
    """Changes, one at a time and at micro-batch 1, under which the run would fit budget."""
    base = replace(settings, micro_batch=1)
    options: list[Alternative] = []

    def check(changes: dict[str, Any], changed: TrainSettings) -> None:
        result = estimate(shape, changed)
        if result.fits(budget, context_counted):
            options.append(Alternative(changes, result.total))

    if not settings.quantize_4bit:
        check({"use_4bit_quantization": True}, replace(base, quantize_4bit=True))
    if not settings.gradient_checkpointing:
        check({"use_gradient_checkpointing": True}, replace(base, gradient_checkpointing=True))
    if settings.offloadable and not settings.offloaded:
        check({"offload_activations": "on"}, replace(base, offload_activations=True))
    if settings.gradient_checkpointing and not settings.tiled and settings.seq_len > MLP_TILE_TOKENS:
        check({"tiled_mlp": "on"}, replace(base, tiled_mlp=True))
    longest = largest_seq_len(shape, base, budget, context_counted)
    if 0 < longest < settings.seq_len:
        check({"max_seq_length": longest}, replace(base, seq_len=longest))
    for rank in (8, 4):
        if rank < settings.lora_r:
            check({"lora_r": rank}, replace(base, lora_r=rank))
    if not options and not (settings.quantize_4bit and settings.gradient_checkpointing):
        both = replace(base, quantize_4bit=True, gradient_checkpointing=True)
        longest = min(largest_seq_len(shape, both, budget, context_counted), settings.seq_len)
        if longest:
            changes = {"use_4bit_quantization": True, "use_gradient_checkpointing": True, "max_seq_length": longest}
            current = {"use_4bit_quantization": settings.quantize_4bit,
                       "use_gradient_checkpointing": settings.gradient_checkpointing,
                       "max_seq_length": settings.seq_len}
            check({k: v for k, v in changes.items() if current[k] != v}, replace(both, seq_len=longest))
    return options


# ----------------------------------------------------------------------------- sizes

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | float | int) -> int:
    """Bytes from '8GB', '7.5G', '8GiB', '8000MB' or a bare number of GB (binary units throughout)."""
    if isinstance(text, bool):
        raise ValueError(f"not a memory size: {text!r}")
    if isinstance(text, int | float):
        value, unit = float(text), "g"
    else:
        match = _SIZE.match(text)
        if not match:
            raise ValueError(f"not a memory size: {text!r} (use e.g. 8GB, 7.5GB or 6000MB)")
        value, unit = float(match.group(1)), (match.group(2) or "g")[0].lower()
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def gb(n_bytes: float) -> str:
    """A size for messages: GB with two decimals, or MB below 1 GB."""
    return f"{n_bytes / GiB:.2f} GB" if n_bytes >= GiB else f"{n_bytes / 2**20:.1f} MB"
