"""Fast batch-1 decoding: a static KV cache, our lean LoRA layers and, on CUDA, one CUDA graph per adapter.

HF `generate` re-enters Python for every layer of every token; at batch 1 on a GPU that overhead,
not the GPU, sets the speed (17-19 tokens/s for a 4-bit 7B model on an H200, docs/performance.md).
Here the prompt runs eagerly once into a static cache; then each new token is one replay of a
captured CUDA graph of the one-token step, whose inputs (token, position) and cache keep fixed
addresses. Capturing needs no compiler: two eager warm-up steps, then one recorded step.

A graph bakes in which adapter is active and its scaling, so graphs are kept per adapter set
(lora.lean.adapter_key). Swapping an adapter by copying its weights into the same tensors
(inference.replace_adapter) keeps them valid. The LoRA layers are lora/lean.py's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lqmf.engine.compat import cache_keyword
from lqmf.engine.decode.sampling import pick_token
from lqmf.engine.lora.lean import adapter_key, join_side_streams, lora_layers, use_lean_lora

MIN_CACHE = 256


@dataclass
class DecodeResult:
    tokens: list[int]
    seconds: float
    first_token_seconds: float


def cache_size_for(tokens: int, limit: int | None) -> int:
    """The static cache length for a request of `tokens`: a power of two (at least MIN_CACHE) within limit."""
    size = MIN_CACHE
    while size < tokens:
        size *= 2
    return min(size, limit) if limit else size


class StaticDecoder:
    """Greedy or sampled decoding of one sequence at a time with a static cache (CUDA graphs on CUDA)."""

    def __init__(self, model, max_cache_len: int, use_graphs: bool | None = None):
        import torch
        from transformers import StaticCache

        self.model = model
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.cache_argument = {cache_keyword(model): self.cache}
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.position = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.key_positions = torch.arange(max_cache_len, device=self.device).view(1, 1, 1, -1)
        self.window = getattr(config, "sliding_window", None)
        self.graphs: dict[tuple, tuple[Any, Any]] = {}  # adapter key -> (graph, its logits output)
        self.failed: set[tuple] = set()  # keys whose capture failed: those run eagerly
        self.pool = None
        self.lean_layers = use_lean_lora(model, self.dtype)
        self.lora_layers = lora_layers(model)  # lean or PEFT's own (an adapter on other modules): the graph key
        self.lora_attention_backends = _lora_step_attention_backends(self.device)

    def _step(self, key: tuple):
        """One token at self.position through the model, with an additive mask over the static cache;
        key is the LoRA layers' `adapter_key`, worked out once per request."""
        import torch
        from torch.nn.attention import sdpa_kernel

        allowed = self.key_positions <= self.position.view(1, 1, 1, 1)
        if self.window:
            allowed &= self.key_positions > self.position.view(1, 1, 1, 1) - self.window
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        backends = self.lora_attention_backends if key else None
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            out = self.model(input_ids=self.token, position_ids=self.position, attention_mask=mask,
                             **self.cache_argument, use_cache=True)
        join_side_streams(self.lean_layers)
        return out.logits[:, -1, :]

    def _graph_for(self, key: tuple):
        """The captured step for key, capturing it now (after a warm-up) when new; None if that fails."""
        import torch

        if key in self.graphs:
            return self.graphs[key]
        if key in self.failed:
            return None
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]

        def rewind():  # warm-up steps write the cache at the current position; undo their advance
            for layer, length in zip(self.cache.layers, lengths, strict=True):
                layer.cumulative_length.copy_(length)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(key)
                    rewind()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._step(key)
        except RuntimeError:
            torch.cuda.synchronize(self.device)
            rewind()
            self.failed.add(key)
            return None
        self.pool = graph.pool()
        self.graphs[key] = (graph, logits)
        return self.graphs[key]

    def generate(self, prompt: list[int], max_new_tokens: int, *, eos_ids: set[int] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int], bool | None] | None = None, min_new_tokens: int = 0) -> DecodeResult:
        """Decode up to max_new_tokens after prompt; on_token(token) returning True stops early."""
        import torch

        if len(prompt) + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the "
                             f"static cache ({self.max_cache_len} tokens)")
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else int(torch.seed()))
        eos_ids = eos_ids or set()
        blocked = torch.tensor(sorted(eos_ids), device=self.device) if eos_ids and min_new_tokens else None
        started = time.perf_counter()
        tokens: list[int] = []
        first = 0.0
        with torch.inference_mode():
            self.cache.reset()
            out = self.model(input_ids=torch.tensor([prompt], device=self.device),
                             position_ids=torch.arange(len(prompt), device=self.device).unsqueeze(0),
                             **self.cache_argument, use_cache=True, logits_to_keep=1)
            join_side_streams(self.lean_layers)
            logits = out.logits[:, -1, :]
            self.position.fill_(len(prompt))
            key = adapter_key(self.lora_layers)
            captured = self._graph_for(key) if self.use_graphs else None
            for index in range(max_new_tokens):
                if blocked is not None and index < min_new_tokens:
                    logits = logits.index_fill(-1, blocked, float("-inf"))
                token = pick_token(logits.float(), temperature, top_p, generator)
                value = int(token)
                if index == 0:
                    first = time.perf_counter() - started
                tokens.append(value)
                stop = on_token(value) if on_token is not None else False
                if stop or value in eos_ids or index == max_new_tokens - 1:
                    break
                self.token.copy_(token.view(1, 1))
                if captured is not None:
                    captured[0].replay()
                    logits = captured[1]
                else:
                    logits = self._step(key)
                self.position.add_(1)
        return DecodeResult(tokens, time.perf_counter() - started, first)


def _lora_step_attention_backends(device) -> list | None:
    """SDPA backends for a one-token step with LoRA active: on CUDA all but cuDNN's. Its kernel comes
    with a memset node that stalls a graph whose LoRA products branch onto a side stream (on the
    H200: 12 us before each layer's attention instead of 5, docs/performance.md). Without LoRA, and
    off CUDA, PyTorch chooses (on the H200 cuDNN, with which the bare base's step is 1.4% faster)."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return None
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
