"""Where LoRA is applied, our way: our LoRA layer classes and their kernels.

- lean.py: `LeanLinear` / `LeanLinear4bit` (PEFT's LoRA layers with a lean forward for training and
  one-request decoding), shared-input groups fused, `adapter_key` for CUDA graphs.
- stacked.py: many adapters at once, each row by its adapter index (`BatchedLoRALinear`,
  `StackedAdapter`, `read_adapter`); a combination `A+B` is one more index (`weighted_sum`).
- kernels.py: Triton kernels for a LoRA product at decode sizes.

The stock path (`LQMF_FAST=0`, and FSDP training) keeps PEFT's own layers.
"""
