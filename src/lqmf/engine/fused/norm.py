"""RMSNorm for training that keeps only its input for backward, not float32 copies of it.

transformers' Llama-style RMSNorm computes in float32 (x.float() * rsqrt(mean(x^2) + eps), rounded to
x's dtype, times the weight), and autograd keeps what each of those operations needs: a float32 copy
of x (twice the bytes of a bf16 x) and the bf16 normalized values besides. At 16k tokens of a 7B model
that is 384 MiB a norm, two norms a block, while a checkpointed block is recomputed in backward.
`LeanRMSNorm` computes the same forward (the same operations in the same order, so the same bits)
and keeps x itself (the block's input or residual, held anyway) and one float32 rstd a token;
backward recomputes the normalized values from them. Plain PyTorch: it runs wherever the model runs.
"""

from __future__ import annotations

import functools
from typing import Any

from lqmf.engine.compat import rms_norm_parameters


@functools.cache
def _function():
    import torch

    class LeanRMSNormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, rstd)
            return weight * (x.float() * rstd).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            normed = x.float() * rstd
            grad_weight = None
            if ctx.needs_input_grad[1]:
                lead = tuple(range(grad.dim() - 1))
                grad_weight = (grad * normed.to(x.dtype)).sum(lead).to(weight.dtype)
            grad_normed = (grad * weight).float()
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            return grad_x.to(x.dtype), grad_weight, None

    return LeanRMSNormFunction


@functools.cache
def _module_class():
    import torch

    class LeanRMSNorm(torch.nn.Module):
        """An RMSNorm computing what transformers' Llama-style norm computes, keeping only x and rstd
        (compat.rms_norm_parameters reads it as one of those: the decoder's fused kernel takes it)."""

        def __init__(self, weight: torch.nn.Parameter, eps: float):
            super().__init__()
            self.weight = weight  # the same parameter: state-dict names and keys unchanged
            self.variance_epsilon = eps

        def forward(self, hidden):
            return _function().apply(hidden, self.weight, self.variance_epsilon)

    return LeanRMSNorm


def lean_rms_norms(model: Any) -> int:
    """Put a LeanRMSNorm in place of every Llama-style RMSNorm of model; returns how many changed."""
    cls = _module_class()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            parameters = rms_norm_parameters(child)
            if parameters is not None and not isinstance(child, cls):
                setattr(parent, name, cls(*parameters))
                count += 1
    return count
