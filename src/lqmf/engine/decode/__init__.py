"""How a request is answered, token by token, off PEFT's and transformers' slow paths.

- static.py: `StaticDecoder`, one request at a time over a static KV cache, one CUDA graph per adapter
  (lqmf test, bench, shell and the single-stream server on CUDA).
- batched.py: `BatchedDecoder`, many rows at once, each with its own adapter index, per-slot KV cache,
  CUDA graphs per (batch, length) bucket (lqmf serve with continuous batching).
- sampling.py: `pick_token`, greedy or sampled.
"""
