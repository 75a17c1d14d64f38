"""Where LoRA is applied, our way: two layer families, one per job.

- stacked.py: decoding. Many adapters at once, each row by its adapter index (`BatchedLoRALinear`
  over the base layers, `StackedAdapter`, `read_adapter`); one adapter is the single-row case and a
  combination `A+B` one more index (`weighted_sum`). decode/batched.py runs them for every request.
- lean.py: training. `LeanLinear` / `LeanLinear4bit`, PEFT's LoRA layers with a lean forward (fewer
  kernels, the same loss and gradients), also used without gradients for validation.
- kernels.py: Triton kernels for a LoRA product of a few rows (lean.py's forward without gradients).
- nf4.py (+ nf4_kernels.py): one Triton kernel for a 4-bit (NF4) base weight times a decode step's
  1..64 rows, reading bitsandbytes' packed bytes once; `nf4_base` builds it from Linear4bit layers.
  stacked.py's BatchedLoRALinear uses it on a GPU (LQMF_NF4_KERNEL=0 turns it off), with the config
  table the GPU sweep (benchmarks/nf4_kernel_bench.py) filled.
- nf4_frozen.py: training's frozen NF4 base, dequantized in one Triton kernel (bitsandbytes' values bit
  for bit) for the GEMM in forward and backward; lean.py's layers and the fused SwiGLU call it.
- dropout.py (+ dropout_kernels.py): training's LoRA dropout inside the rank-r product, dropout(x) A^T in
  one Triton kernel each way, the mask drawn in registers and never stored; lean.py's layers call it.

The stock path (`LQMF_FAST=0`, classification models, adapters the decoder cannot apply, and FSDP
training) keeps PEFT's own layers.
"""
