"""Cross-entropy of a linear head without the logits: chunk by chunk, gradient in the forward pass.

`linear_cross_entropy(hidden, weight, targets)` is `F.cross_entropy(hidden @ weight.T, targets,
reduction="sum")` for a frozen head weight. It computes the logits LOSS_CHUNK_TOKENS rows at a
time, and while a chunk's logits exist it also turns them into the gradient with respect to the
hidden states (softmax minus one-hot, times the weight), so backward only scales what forward
left. The full logits never exist, nothing is recomputed, and per chunk only its fp32 logits (turned
into the softmax and its gradient in place) and, under autocast, one compute-dtype copy are
alive. Two matmuls per chunk, against three for a checkpointed chunk (forward, its
recomputation, and the input gradient).

Pure PyTorch: the same code runs on the CPU (the tests) and the GPU. Liger-kernel's and
cut-cross-entropy's kernels do the same in Triton; LQMF does not need them for this (the head's
two matmuls are cuBLAS GEMMs either way, and the elementwise work is a few passes over chunk x V).
"""

from __future__ import annotations

from typing import Any

LOSS_CHUNK_TOKENS = 1024


def _chunk_loss_and_grad(hidden, weight, targets, want_grad: bool):
    """(summed loss, d loss / d hidden or None) for one chunk; logits in fp32 as F.cross_entropy under autocast."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight)
    if logits.dtype != torch.float32:
        logits = logits.float()
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    largest = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(largest).exp_()  # in place throughout: one chunk x V fp32 tensor at a time
    sums = exp.sum(dim=-1)
    loss = (largest.squeeze(1) + sums.log() - picked).sum()
    if not want_grad:
        return loss, None
    probabilities = exp.div_(sums[:, None])  # the softmax: the gradient but for the target's -1
    probabilities[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    grad = probabilities.to(hidden.dtype) if hidden.dtype != torch.float32 else probabilities
    return loss, grad @ weight


class _LinearCrossEntropy:
    """The autograd.Function, built on first use so that importing this module needs no torch."""

    function: Any = None

    @classmethod
    def get(cls):
        if cls.function is None:
            import torch

            class LinearCrossEntropy(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, targets, chunk):
                    want_grad = ctx.needs_input_grad[0]
                    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                    grad = torch.empty_like(hidden) if want_grad else None
                    for start in range(0, hidden.shape[0], chunk):
                        end = start + chunk
                        loss, part = _chunk_loss_and_grad(hidden[start:end], weight, targets[start:end], want_grad)
                        total += loss
                        if want_grad:
                            grad[start:end] = part
                    ctx.save_for_backward(grad if want_grad else None)
                    return total

                @staticmethod
                def backward(ctx, grad_total):
                    (grad,) = ctx.saved_tensors
                    return grad * grad_total.to(grad.dtype), None, None, None

            cls.function = LinearCrossEntropy
        return cls.function


def linear_cross_entropy(hidden, weight, targets, chunk: int = LOSS_CHUNK_TOKENS):
    """Summed cross-entropy of hidden (n x d) through a frozen head weight (V x d) against targets (n,).

    Under autocast the matmuls run in its dtype (the weight's, as the head's own forward would) and
    the softmax in fp32. The weight gets no gradient: callers use it for frozen heads only.
    """
    import torch

    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.get().apply(hidden, weight.detach(), targets, chunk)
