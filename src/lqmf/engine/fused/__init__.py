"""Training computations fused or tiled so that long sequences fit small GPUs, with the same results.

- loss.py: cross-entropy of a frozen LM head without the logits (per chunk, the gradient computed in
  forward, nothing recomputed).
- blocks.py: modules that take the place of parts of a decoder block, keeping names and adapter
  keys: the MLP in checkpointed tiles of 2,048 tokens (tiled_mlp), and liger-kernel's fused RMSNorm
  and SiLU-multiply (fused_kernels: on, CUDA).
- checkpointing.py: PyTorch's non-reentrant checkpoint as every checkpointed region of training runs
  it (transformers' per-layer ones included), without its per-tensor determinism check (host time).
"""
