"""Where LoRA is applied, our way: our LoRA layer classes and their kernels.

- lean.py: `LeanLinear` / `LeanLinear4bit` (PEFT's LoRA layers with a lean forward for training and
  one-request decoding), shared-input groups fused, `adapter_key` for CUDA graphs.
- kernels.py: the Triton kernel of the batched decoder's per-row LoRA product (one adapter per row).

Batched multi-adapter decoding applies LoRA in decode/batched.py (`BatchedLoRALinear`); the stock
path (`LQMF_FAST=0`) keeps PEFT's own layers.
"""
