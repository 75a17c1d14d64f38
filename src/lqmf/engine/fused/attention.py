"""Attention in query chunks for training rows that need a mask: a sliding window shorter than the row
(Mistral-7B-v0.1's 4,096 tokens), or packed examples.

For such rows transformers' SDPA path builds one boolean mask of rows x 1 x s x s and, because a mask
rules out SDPA's grouped-query path, repeats k and v to every query head; SDPA then takes a copy of the
mask in the compute dtype. At 16,384 tokens that is 256 MiB + 512 MiB + 2 x 128 MiB inside every
block's recomputation, which is what kept a 16k row of Mistral-7B-v0.1 from fitting an 8 GB card.

`chunked_attention` computes the same attention QUERY_CHUNK queries at a time against only the keys
those queries may see (with a window: the chunk's own keys and the window before it), with a mask for
that chunk alone, built from positions (and from the example each token belongs to, when packed). The
query heads that share a key head are folded into the query length, so k and v are never repeated.
Where a row has more than one chunk, each chunk runs under a checkpoint, so backward keeps only its
inputs (views of q, k and v) and recomputes one chunk's mask and attention at a time.

`use_chunked_attention(model)` registers it with transformers' AttentionInterface and sets it as the
model's attention implementation, with flash attention's mask function, so transformers builds no 4D
mask for it: it hands over the 2D padding mask, or None. Rows that need no mask (no window shorter than
them, not packed, no padding) go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from lqmf.core.memory_plan import ATTENTION_QUERY_CHUNK, ModelShape, takes_chunked_attention
from lqmf.engine.fused.checkpointing import checkpoint

ATTENTION = "lqmf_chunked"
QUERY_CHUNK = ATTENTION_QUERY_CHUNK


def wanted(model_config: Any, row_tokens: int, packed: bool) -> bool:
    """Whether training rows of up to row_tokens take chunked attention (the memory planner's rule): a
    causal model's rows holding packed examples, or longer than its sliding window."""
    shape = ModelShape.from_config(model_config.to_dict())
    return shape is not None and takes_chunked_attention(shape, row_tokens, packed)


@functools.cache
def _register() -> None:
    """chunked_attention under ATTENTION, with flash attention's mask function: transformers hands it the
    2D padding mask (cut to the keys a sliding-window cache holds), or None where nothing is padded."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION, chunked_attention)
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)


def use_chunked_attention(model) -> bool:
    """Make the (PEFT-wrapped) model's attention chunked_attention; False where its class cannot switch
    attention implementations (no AttentionInterface support) and keeps its own."""
    from lqmf.engine.compat import attention_implementation

    _register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTENTION)
    return attention_implementation(base) == ATTENTION


class _PackedSegments:
    """The example each token belongs to, from position ids, computed once per forward: every layer is
    handed the same position_ids tensor (and a checkpoint's recomputation hands it again)."""

    def __init__(self):
        self.position_ids = self.segments = None

    def __call__(self, position_ids):
        from transformers.masking_utils import find_packed_sequence_indices

        if position_ids is not self.position_ids:
            self.position_ids, self.segments = position_ids, find_packed_sequence_indices(position_ids)
        return self.segments


_packed_segments = _PackedSegments()


def chunked_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers' attention-function signature: query (b, heads, q, d), key and value (b, kv heads,
    kv, d), attention_mask the 2D padding mask or None -> ((b, q, heads, d), None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    window = sliding_window if sliding_window and sliding_window < kv_len else None
    position_ids = kwargs.get("position_ids")
    segments = (_packed_segments(position_ids) if position_ids is not None and attention_mask is None
                and q_len == kv_len and q_len > 1 else None)
    keep = attention_mask.bool() if attention_mask is not None and attention_mask.ndim == 2 else None
    if window is None and segments is None and keep is None and q_len in (1, kv_len):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"{ATTENTION} takes a 2D padding mask, not one of shape {tuple(attention_mask.shape)}")
    offset = kv_len - q_len  # the queries are the last q_len positions (a cache holds the earlier ones)
    out = query.new_empty(query.shape[0], q_len, query.shape[1], query.shape[3])
    chunks = range(0, q_len, QUERY_CHUNK)
    for start in chunks:
        stop = min(start + QUERY_CHUNK, q_len)
        low = max(0, offset + start - window + 1) if window else 0
        high = offset + stop
        args = (query[:, :, start:stop], key[:, :, low:high], value[:, :, low:high], offset + start, low, window,
                None if segments is None else segments[:, start:stop],
                None if segments is None else segments[:, low:high],
                None if keep is None else keep[:, low:high], scaling, dropout)
        if len(chunks) > 1 and torch.is_grad_enabled():
            piece = checkpoint(_chunk, *args)
        else:
            piece = _chunk(*args)
        out[:, start:stop] = piece
    return out, None


def _chunk(query, key, value, first_query: int, first_key: int, window: int | None, query_segments,
           key_segments, keep, scaling: float | None, dropout: float):
    """One chunk of queries (b, heads, c, d) against its keys (b, kv heads, k, d) -> (b, c, heads, d).
    The heads sharing a key head are folded into the query length: (b, kv heads, group x c, d)."""
    import torch
    import torch.nn.functional as F

    b, heads, c, d = query.shape
    kv_heads, k = key.shape[1], key.shape[2]
    group = heads // kv_heads
    query_pos = torch.arange(first_query, first_query + c, device=query.device)[:, None]
    key_pos = torch.arange(first_key, first_key + k, device=query.device)[None, :]
    allowed = (key_pos <= query_pos)[None]  # (1 or b, c, k)
    if window:
        allowed = allowed & (query_pos - key_pos < window)[None]
    if query_segments is not None:
        allowed = allowed & (query_segments[:, :, None] == key_segments[:, None, :])
    if keep is not None:
        allowed = allowed & keep[:, None, :]
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a row that sees nothing (padding) sees all: no NaN
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)
    folded = query.reshape(b, kv_heads, group * c, d)
    attended = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask[:, None].repeat(1, 1, group, 1),
                                              dropout_p=dropout, scale=scaling)
    return attended.view(b, heads, c, d).transpose(1, 2)
