"""What takes the place of parts of a decoder block in training, keeping module names and adapter keys.

Tiled MLP: a block's MLP over the micro-batch's tokens TILE_TOKENS at a time, each tile checkpointed.

At long sequences the MLP dominates what a checkpointed block holds while it is recomputed in
backward: gate, act(gate) and up (3 x 14,336 values per token on a 7B model, 1.4 GB at 16k
tokens in bf16) and, in its backward, two more of that width. The MLP acts on each token alone,
so it can run over slices of the tokens (the rows flattened): with each slice checkpointed, the
block's recomputation keeps only the slices' common input, and one slice's inner tensors exist at
a time. The price is one more forward pass of the MLP in backward.

`TiledMLP` takes the place of the decoder layer's `mlp` and shares the original's submodules (the
same `_modules` dict), so module names, PEFT's LoRA layers and the saved adapter's keys do not
change; the original module's own forward computes each slice.

Kept MLPs: a block's MLP keeps what it saves for backward (gate and up, on the device) while the rest of
the block stays checkpointed.

With gradient checkpointing a block's backward first runs its forward again, and PyTorch's
non-reentrant checkpoint stops that recomputation as soon as every tensor the block saved under it is
back (its early stop). Frozen linears save nothing (their input gradient needs only the weight), so
the recomputation already stops before down_proj; the MLP's gate and up projections, three quarters
of what a 7B block recomputes, run again only to give SiLU-multiply back its two inputs. `KeptMLP` runs the
MLP under saved-tensor hooks of its own that keep those tensors as they are, out of the checkpoint's
(and the activation offload's) hands: the block's recomputation then ends at the MLP's norm, and
backward finds gate and up where forward left them. The price: 2 x intermediate values a token (three
with PyTorch's SiLU and multiply) on the device from forward until the block's backward.

Fused kernels (liger-kernel, Triton): RMSNorm, SiLU(gate) x up, and RoPE. `fused_kernels: on` puts
liger-kernel's `LigerRMSNorm` in place of Llama-style RMSNorm modules (the same weight, so the same
names), runs gated MLPs' activation through its fused SiLU-multiply (`FusedSwiGLU` shares the
MLP's submodules as `TiledMLP` does), and, while `fused_rope` is entered (the training loop), rotates
q and k of Llama, Mistral and Qwen2 attention in one kernel each way (transformers' rotation takes
about ten elementwise kernels over q and k a layer). `auto` (the default) turns them on for a
single-process CUDA run without the tiled MLP, the case measured: +19% tokens/s at seq 512 and 2,048
on an H100 for the norms and SwiGLU, then +8.7% for RoPE, the same loss, less memory
(docs/performance.md). Where liger-kernel is missing or the device is not CUDA (Triton kernels), the
model keeps PyTorch's modules (said where the user could expect them). With them, the frozen NF4 base
layers under the lean LoRA layers and in the fused SwiGLU dequantize in one Triton kernel of ours
(engine/lora/nf4_frozen.py) instead of bitsandbytes' three operators, and the lean LoRA layers draw
their dropout's mask inside the rank-r product's kernels (engine/lora/dropout.py) instead of storing it.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from lqmf.core.memory_plan import MLP_TILE_TOKENS, fused_kernels_expected
from lqmf.engine.compat import rotary_attention_layers, rotary_embedding_as, share_children
from lqmf.engine.fused.checkpointing import checkpoint
from lqmf.engine.fused.norm import replace_rms_norms
from lqmf.engine.lora import nf4_frozen

TILE_TOKENS = MLP_TILE_TOKENS


@functools.cache
def _stand_in_class():
    import torch

    class MLPStandIn(torch.nn.Module):
        """Takes the place of a decoder layer's `mlp` with the same children, so module names and adapter
        keys do not change; the original stays reachable as `inner` (not a child: it would name every
        layer twice)."""

        def __init__(self, mlp: torch.nn.Module):
            super().__init__()
            share_children(self, mlp)
            object.__setattr__(self, "inner", mlp)

    return MLPStandIn


@functools.cache
def _tiled_class():
    import torch

    class TiledMLP(_stand_in_class()):
        """mlp(x) over x's tokens (every row's, flattened) in tiles of `tile`, each under checkpoint."""

        def __init__(self, mlp: torch.nn.Module, tile: int):
            super().__init__(mlp)
            self.tile = tile

        def forward(self, hidden):
            tokens = hidden.reshape(-1, hidden.shape[-1])
            if tokens.shape[0] <= self.tile or not torch.is_grad_enabled():
                return self.inner(hidden)  # without gradients nothing is kept for backward anyway
            parts = [checkpoint(self.inner, part) for part in tokens.split(self.tile)]
            return torch.cat(parts).view(*hidden.shape[:-1], -1)

    return TiledMLP


def tile_mlps(model: Any, tile: int = TILE_TOKENS) -> int:
    """Put a TiledMLP in place of every decoder layer's `mlp`; returns how many were replaced."""
    cls = _tiled_class()
    count = 0
    for module in list(model.modules()):
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, cls) or mlp is None or not hasattr(module, "self_attn"):
            continue
        module.mlp = cls(mlp, tile)
        count += 1
    return count


@functools.cache
def _kept_class():
    import torch

    class KeptMLP(_stand_in_class()):
        """mlp(x), its saved tensors kept as they are instead of by an enclosing checkpoint or offload."""

        def forward(self, hidden):
            with torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
                return self.inner(hidden)

    return KeptMLP


def _as_is(tensor):
    return tensor


def keep_mlps(layers: list, count: int, skip: list[int] | tuple = ()) -> list[int]:
    """Put a KeptMLP in place of the `mlp` of count of these decoder layers, spread evenly over those not in
    skip (the layers kept whole; engine/train/offload.py: kept_indices); returns the indices changed."""
    from lqmf.engine.train.offload import kept_indices

    cls = _kept_class()
    open_layers = [index for index in range(len(layers)) if index not in set(skip)]
    chosen = []
    for index in (open_layers[at] for at in kept_indices(len(open_layers), count)):
        mlp = getattr(layers[index], "mlp", None)
        if mlp is not None and not isinstance(mlp, cls):
            layers[index].mlp = cls(mlp)
            chosen.append(index)
    return chosen


def fused_kernels_wanted(mode: str, device: str, processes: int, tiled_mlp: bool) -> tuple[bool, str | None]:
    """Whether to swap in the fused kernels for `fused_kernels: mode` (auto | on | off), and a note for
    the run saying why not where the user could expect them (else None). auto: on only for one process
    on CUDA without the tiled MLP (multi-GPU runs and the tiled MLP with them are not checked on a GPU)."""
    if not fused_kernels_expected(mode, device, processes, tiled_mlp):
        return False, None
    reason = unavailable(device)
    return reason is None, reason and f"fused_kernels={mode}: PyTorch's kernels kept: {reason}"


def unavailable(device: str) -> str | None:
    """Why the fused kernels cannot run here, or None."""
    if device != "cuda":
        return f"they are Triton kernels for CUDA, not {device}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'liger-kernel>=0.8.5,<0.9')"
    return None


@functools.cache
def _swiglu_class():

    class FusedSwiGLU(_stand_in_class()):
        """down_proj(silu(gate_proj(x)) * up_proj(x)) with liger-kernel's fused SiLU-multiply."""

        def forward(self, hidden):
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            gate, up = nf4_frozen.linear(self.gate_proj, hidden), nf4_frozen.linear(self.up_proj, hidden)
            return nf4_frozen.linear(self.down_proj, LigerSiLUMulFunction.apply(gate, up))

    return FusedSwiGLU


def _is_silu_gated_mlp(module) -> bool:
    """A Llama-style MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with SiLU (torch's or transformers')."""
    act = type(getattr(module, "act_fn", None)).__name__
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU",
                                                                                                    "SiLUActivation")


def use_fused_kernels(model: Any) -> dict[str, int]:
    """Swap in liger-kernel's modules (see the module docstring) and switch on our NF4 dequantize for the
    frozen 4-bit base (engine/lora/nf4_frozen.py) and LoRA's dropout inside the rank-r product
    (engine/lora/dropout.py); how many norms, MLPs, 4-bit layers and LoRA layers changed, and how many
    attention layers `fused_rope` covers."""
    from liger_kernel.transformers import LigerRMSNorm

    from lqmf.engine.lora.lean import fuse_lora_dropout

    def liger_norm(weight, eps: float):  # liger's "llama" casting mode computes what these norms compute
        fused = LigerRMSNorm(weight.shape[0], eps=eps, casting_mode="llama")
        fused.weight = weight  # the same parameter, frozen, in its dtype and device
        return fused

    swiglu = _swiglu_class()
    counts = {"rms_norm": replace_rms_norms(model, liger_norm, LigerRMSNorm), "swiglu": 0,
              "rope": rotary_attention_layers(model)[1], "nf4_dequantize": nf4_frozen.switch_on(model),
              "lora_dropout": fuse_lora_dropout(model)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name == "mlp" and _is_silu_gated_mlp(child):
                setattr(parent, name, swiglu(child))
                counts["swiglu"] += 1
    return counts


def fused_rope(model: Any):
    """A context in which model's Llama, Mistral and Qwen2 attention layers rotate q and k with
    liger-kernel's RoPE (the same values; forward and backward one kernel each)."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return rotary_embedding_as(model, liger_rotary_pos_emb)
