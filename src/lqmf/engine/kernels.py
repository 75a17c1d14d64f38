"""Fused small kernels for training from liger-kernel (Triton): RMSNorm, and SiLU(gate) x up.

`fused_kernels: on` puts liger-kernel's `LigerRMSNorm` in place of Llama-style RMSNorm modules (the
same weight, so the same names) and runs gated MLPs' activation through its fused SiLU-multiply
(`FusedSwiGLU` shares the MLP's submodules, as engine/tiling.py does, so names and adapter keys do
not change). Off by default: not measured on a GPU in LQMF yet. Where liger-kernel is missing or
the device is not CUDA (Triton kernels), the model keeps PyTorch's modules and the run says so.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from lqmf.engine.compat import share_children

# Norm classes whose forward is liger's "llama" casting mode: x * rsqrt(mean(x^2) + eps) in fp32, times weight.
LLAMA_STYLE_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def unavailable(device: str) -> str | None:
    """Why the fused kernels cannot run here, or None."""
    if device != "cuda":
        return f"they are Triton kernels for CUDA, not {device}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'lqmf[kernels]')"
    return None


@functools.cache
def _swiglu_class():
    import torch

    class FusedSwiGLU(torch.nn.Module):
        """down_proj(silu(gate_proj(x)) * up_proj(x)) with liger-kernel's fused SiLU-multiply."""

        def __init__(self, mlp: torch.nn.Module):
            super().__init__()
            share_children(self, mlp)  # the same children: names and adapter keys unchanged

        def forward(self, hidden):
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(hidden), self.up_proj(hidden)))

    return FusedSwiGLU


def _is_silu_gated_mlp(module) -> bool:
    """A Llama-style MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with SiLU (torch's or transformers')."""
    act = type(getattr(module, "act_fn", None)).__name__
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU",
                                                                                                    "SiLUActivation")


def use_fused_kernels(model: Any) -> dict[str, int]:
    """Swap in liger-kernel's modules (see the module docstring); how many norms and MLPs changed."""
    from liger_kernel.transformers import LigerRMSNorm

    swiglu = _swiglu_class()
    counts = {"rms_norm": 0, "swiglu": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in LLAMA_STYLE_NORMS:
                fused = LigerRMSNorm(child.weight.shape[0], eps=child.variance_epsilon, casting_mode="llama")
                fused.weight = child.weight  # the same parameter, frozen, in its dtype and device
                setattr(parent, name, fused)
                counts["rms_norm"] += 1
            elif name == "mlp" and _is_silu_gated_mlp(child):
                setattr(parent, name, swiglu(child))
                counts["swiglu"] += 1
    return counts
