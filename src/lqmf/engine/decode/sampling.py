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


def seeded_generator(device, seed: int | None):
    """(a torch.Generator on device seeded with seed, or a fresh random seed when None; that seed as int64):
    the generator draws on the host (`pick_token`), the int64 seed on the device (`sample_rows`)."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.seed()))
    chosen = generator.initial_seed()  # unsigned 64-bit: a negative seed comes back wrapped
    return generator, chosen - 2**64 if chosen >= 2**63 else chosen


MASK31 = 0x7FFFFFFF


def _mix31(x):
    """A 31-bit integer hash of each value of x (int64 in [0, 2**31)): products stay below 2**62."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK31
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & MASK31
    return x ^ (x >> 15)


def gumbel_noise(seeds, positions, vocab: int):
    """[rows, vocab] Gumbel(0, 1) noise hashed from each row's seed, its position and the token id (a
    counter-based generator: no state, the same inputs give the same noise on any device and in any
    batch). seeds: int64 (any value), positions: int64 >= 0."""
    import torch

    row = _mix31(seeds & MASK31)
    row = _mix31(row ^ ((seeds >> 31) & MASK31))
    row = _mix31(row ^ ((seeds >> 62) & 3))
    row = _mix31(row ^ (positions & MASK31))
    ids = _mix31(torch.arange(vocab, device=seeds.device))
    bits = _mix31(row[:, None] ^ ids[None, :])
    uniform = ((bits >> 7).float() + 0.5) / 2**24  # 24 bits: exact in float32, never 0 or 1
    return -torch.log(-torch.log(uniform))


def sample_rows(logits, temperatures, top_ps, seeds, positions):
    """Each row's token drawn from softmax(logits / temperature) within its nucleus (the largest
    probabilities summing to top_p, as `pick_token` keeps them), by the Gumbel-max trick with
    `gumbel_noise`: on the device, without a generator or a trip to the host, so a decode step can
    sample inside a CUDA graph. logits [rows, vocab] (barred ids at -inf); temperatures > 0 (other
    rows' picks are meaningless: the caller keeps their argmax); top_ps, seeds, positions per row."""
    import torch

    scaled = logits.float() / temperatures.float().clamp_min(1e-6)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    ordered = probs.sort(dim=-1, descending=True).values
    kept = ((ordered.cumsum(-1) - ordered) < top_ps.float()[:, None]).sum(-1, keepdim=True).clamp_min(1)
    kept = torch.where(top_ps[:, None] >= 1, logits.shape[-1], kept)
    inside = probs >= ordered.gather(-1, kept - 1)  # at or above the smallest kept probability
    noisy = torch.where(inside, scaled + gumbel_noise(seeds, positions, logits.shape[-1]), float("-inf"))
    return noisy.argmax(-1)
