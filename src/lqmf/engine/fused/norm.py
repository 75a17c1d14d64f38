"""RMSNorm for training that keeps only its input for backward, not float32 copies of it.

transformers' Llama-style RMSNorm computes in float32 (x.float() * rsqrt(mean(x^2) + eps), rounded to
x's dtype, times the weight), and autograd keeps what those operations need: a float32 copy of x
(twice the bytes of a bf16 x). At 16k tokens of a 7B model that is 256 MiB a norm, two norms a block,
while a checkpointed block is recomputed in backward.
`LeanRMSNorm` computes the same forward (the same operations in the same order, so the same bits)
and keeps x itself (the block's input or residual, held anyway) and one float32 rstd a token;
backward recomputes the normalized values from them. Both run CHUNK_TOKENS tokens at a time: whole,
their float32 temporaries were three of 256 MiB at 16k tokens (seen in the 16k probe's live blocks on
an H100, docs/performance.md). Plain PyTorch: it runs wherever the model runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lqmf.engine.compat import rms_norm_parameters

CHUNK_TOKENS = 2048  # tokens a float32 temporary covers: 32 MiB at a hidden size of 4,096


@functools.cache
def _function():
    import torch

    class LeanRMSNormFunction(torch.autograd.Function):
        """Forward and backward CHUNK_TOKENS tokens at a time (each token is normalized alone), so that
        their float32 temporaries stay small at any sequence length."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            rows = x.reshape(-1, x.shape[-1])
            rstd = rows.new_empty((rows.shape[0], 1), dtype=torch.float32)
            out = rows.new_empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype))  # as weight * y
            for begin in range(0, rows.shape[0], CHUNK_TOKENS):
                end = begin + CHUNK_TOKENS
                chunk = rows[begin:end].float()
                rstd[begin:end] = torch.rsqrt(chunk.pow(2).mean(-1, keepdim=True) + eps)
                out[begin:end] = weight * (chunk * rstd[begin:end]).to(x.dtype)
            ctx.save_for_backward(x, weight, rstd)
            return out.view(*x.shape[:-1], -1)

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
            grad_x = torch.empty_like(rows)
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for begin in range(0, rows.shape[0], CHUNK_TOKENS):
                end = begin + CHUNK_TOKENS
                normed = rows[begin:end].float() * rstd[begin:end]
                if grad_weight is not None:
                    grad_weight += (grads[begin:end] * normed.to(x.dtype)).float().sum(0)
                grad_normed = (grads[begin:end] * weight).float()
                projected = normed * (grad_normed * normed).mean(-1, keepdim=True)
                grad_x[begin:end] = rstd[begin:end] * (grad_normed - projected)
            return grad_x.view(x.shape), None if grad_weight is None else grad_weight.to(weight.dtype), None

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


def replace_rms_norms(model: Any, make: Callable[[Any, float], Any], kind: type) -> int:
    """Put make(weight, eps) in place of every Llama-style RMSNorm of model (as compat.rms_norm_parameters
    reads them) that is not already of kind, the class make builds; returns how many changed."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            parameters = rms_norm_parameters(child)
            if parameters is not None and not isinstance(child, kind):
                setattr(parent, name, make(*parameters))
                count += 1
    return count


def lean_rms_norms(model: Any) -> int:
    """Put a LeanRMSNorm in place of every Llama-style RMSNorm of model; returns how many changed."""
    cls = _module_class()
    return replace_rms_norms(model, cls, cls)
