"""Fast batch-1 decoding for serving: a static KV cache and a compiled, CUDA-graphed decode step.

HF `generate` re-enters Python for every layer of every token; at batch 1 on a GPU that
overhead, not the GPU, sets the speed. Here the prefill runs eagerly once, then each new token
is one call of a `torch.compile(mode="reduce-overhead")` step whose kernels replay as a CUDA
graph. The cache and the LoRA weights keep fixed addresses, so adapters can be swapped by
copying new values into the same tensors (see `AdapterSlots`) without recompiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class DecodeResult:
    tokens: list[int]
    seconds: float
    first_token_seconds: float


class CompiledDecoder:
    """Greedy or sampled decoding of one sequence at a time with a static cache."""

    def __init__(self, model, max_cache_len: int = 2048, compile_step: bool = True):
        import torch
        from transformers import StaticCache

        self.model = model
        config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.max_cache_len = max_cache_len
        self.device = next(model.parameters()).device
        step = self._forward_last
        if compile_step and self.device.type == "cuda":
            step = torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)
        self.step = step

    def _forward_last(self, input_ids, position_ids):
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :].float()

    def generate(self, prompt: list[int], max_new_tokens: int, *, eos_ids: set[int] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int], None] | None = None, min_new_tokens: int = 0) -> DecodeResult:
        import torch

        if len(prompt) + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the "
                             f"static cache ({self.max_cache_len} tokens)")
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        eos_ids = eos_ids or set()
        started = time.perf_counter()
        tokens: list[int] = []
        first = 0.0
        with torch.inference_mode():
            self.cache.reset()
            ids = torch.tensor([prompt], device=self.device)
            positions = torch.arange(len(prompt), device=self.device).unsqueeze(0)
            logits = self._forward_last(ids, positions)
            position = torch.tensor([[len(prompt)]], device=self.device)
            for index in range(max_new_tokens):
                if index < min_new_tokens and eos_ids:
                    logits[:, list(eos_ids)] = float("-inf")
                token = _pick(logits, temperature, top_p, generator)
                value = int(token)
                if index == 0:
                    first = time.perf_counter() - started
                tokens.append(value)
                if on_token is not None:
                    on_token(value)
                if value in eos_ids or index == max_new_tokens - 1:
                    break
                logits = self.step(token.view(1, 1), position.clone())
                position += 1
        return DecodeResult(tokens, time.perf_counter() - started, first)


def _pick(logits, temperature: float, top_p: float, generator) -> Any:
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


class AdapterSlots:
    """Several LoRA adapters of one shape kept on the device; one is copied into the live weights.

    The model is a PeftModel with one loaded adapter (the slot). `add` stores another adapter's
    tensors (same targets and rank) beside it; `activate` copies them into the slot's tensors in
    place, which keeps every address (and so every captured CUDA graph) valid. An adapter's own
    scaling (alpha / r) is folded into its lora_B copy, so the slot's scaling never changes. The
    name `None` activates zeros in lora_B: the base model's output, through the same graph.
    """

    def __init__(self, model, slot: str, slot_scaling: float):
        self.model = model
        self.slot = slot
        self.slot_scaling = slot_scaling
        self.live = {name: p for name, p in model.named_parameters() if f".{slot}." in name and "lora_" in name}
        if not self.live:
            raise ValueError(f"adapter slot '{slot}' has no LoRA weights")
        self.stored: dict[str | None, dict[str, Any]] = {
            slot: {name: p.detach().clone() for name, p in self.live.items()},
            None: {name: (p.detach() * 0 if "lora_B" in name else p.detach().clone()) for name, p in self.live.items()},
        }
        self.active: str | None = slot

    def read_adapter(self, folder) -> dict[str, Any]:
        """A saved PEFT adapter's tensors, named as this slot's live parameters."""
        from pathlib import Path

        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / "adapter_model.safetensors"))
        return {key.replace(".lora_A.weight", f".lora_A.{self.slot}.weight")
                   .replace(".lora_B.weight", f".lora_B.{self.slot}.weight"): value for key, value in state.items()}

    def matches(self, state: dict[str, Any]) -> bool:
        """Whether an adapter's tensors (named as in the slot) fit the slot exactly."""
        return set(state) == set(self.live) and all(state[k].shape == self.live[k].shape for k in state)

    def add(self, name: str, state: dict[str, Any], scaling: float) -> None:
        if not self.matches(state):
            raise ValueError(f"adapter '{name}' does not have the slot's targets and rank")
        factor = scaling / self.slot_scaling
        self.stored[name] = {
            key: (value * factor if "lora_B" in key else value).to(device=self.live[key].device,
                                                                   dtype=self.live[key].dtype)
            for key, value in state.items()
        }

    def remove(self, name: str) -> None:
        if name != self.slot:
            self.stored.pop(name, None)

    def activate(self, name: str | None) -> None:
        """Make `name` (None: the base) the adapter every following forward pass uses."""
        import torch

        if name == self.active:
            return
        with torch.no_grad():
            for key, target in self.live.items():
                target.copy_(self.stored[name][key], non_blocking=True)
        self.active = name
