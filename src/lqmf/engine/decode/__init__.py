"""How a request is answered, token by token, off PEFT's and transformers' slow paths.

- batched.py: `BatchedDecoder`, the one decoder: many rows at once, each with its own adapter index,
  per-slot KV cache, CUDA graphs per (batch, length) bucket. `lqmf serve` runs it through the
  continuous-batching scheduler (engine/serve/scheduler.py); `lqmf test`, `bench`, the shell and a
  server without batching run it as a batch of one (`BatchedDecoder.generate`, via inference.generate).
- sampling.py: `pick_token`, greedy or sampled.
- pdl.py: `launch(device)`, the step's Triton kernels (here and in lora/) as programmatic dependent
  launches on Hopper.
"""
