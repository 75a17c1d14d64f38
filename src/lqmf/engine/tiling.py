"""Tiled MLP: a block's MLP over the sequence TILE_TOKENS at a time, each tile checkpointed.

At long sequences the MLP dominates what a checkpointed block holds while it is recomputed in
backward: gate, act(gate) and up (3 x 14,336 values per token on a 7B model, 1.4 GB at 16k
tokens in bf16) and, in its backward, two more of that width. The MLP acts on each token alone,
so it can run over slices of the sequence: with each slice checkpointed, the block's recomputation
keeps only the slices' common input, and one slice's inner tensors exist at a time. The price is
one more forward pass of the MLP in backward.

`TiledMLP` takes the place of the decoder layer's `mlp` and shares the original's submodules (the
same `_modules` dict), so module names, PEFT's LoRA layers and the saved adapter's keys do not
change; the original module's own forward computes each slice.
"""

from __future__ import annotations

import functools
from typing import Any

from lqmf.core.memory_plan import MLP_TILE_TOKENS
from lqmf.engine.compat import share_children

TILE_TOKENS = MLP_TILE_TOKENS


@functools.cache
def _module_class():
    import torch

    class TiledMLP(torch.nn.Module):
        """mlp(x) over x's sequence dimension in tiles of `tile` tokens, each under checkpoint."""

        def __init__(self, mlp: torch.nn.Module, tile: int):
            super().__init__()
            share_children(self, mlp)  # the same children: names and adapter keys unchanged
            object.__setattr__(self, "inner", mlp)  # not a child: it would name every layer twice
            self.tile = tile

        def forward(self, hidden):
            from torch.utils.checkpoint import checkpoint

            if hidden.dim() < 2 or hidden.shape[-2] <= self.tile:
                return self.inner(hidden)
            tiles = hidden.split(self.tile, dim=-2)
            if not torch.is_grad_enabled():
                return torch.cat([self.inner(part) for part in tiles], dim=-2)
            return torch.cat([checkpoint(self.inner, part, use_reentrant=False) for part in tiles], dim=-2)

    return TiledMLP


def tile_mlps(model: Any, tile: int = TILE_TOKENS) -> int:
    """Put a TiledMLP in place of every decoder layer's `mlp`; returns how many were replaced."""
    cls = _module_class()
    count = 0
    for module in list(model.modules()):
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, cls) or mlp is None or not hasattr(module, "self_attn"):
            continue
        module.mlp = cls(mlp, tile)
        count += 1
    return count
