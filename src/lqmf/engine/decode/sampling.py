"""Choosing the next token from logits: greedy or sampled (temperature, nucleus top-p)."""

from __future__ import annotations

from typing import Any


def pick_token(logits, temperature: float, top_p: float, generator) -> Any:
    """The next token from logits: argmax at temperature 0, else sampled (nucleus when top_p < 1)."""
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
