"""Rough training-time estimates from a model's config.json, before any weights load."""

from __future__ import annotations

from typing import Any

# Sustained training throughput assumed for the estimate (FLOP/s): deliberately round numbers.
ASSUMED_THROUGHPUT = {"cpu (2 cores)": 1.0e11, "8 GB GPU": 1.0e13}


def approx_parameters(config: dict[str, Any]) -> int | None:
    """Parameter count of a transformer from its config.json (embeddings + blocks)."""
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    vocab = config.get("vocab_size")
    if not (hidden and layers and vocab):
        return None
    inter = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    gated = config.get("model_type") in {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"}
    mlp = (3 if gated else 2) * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", not gated) else 2)
    return int(layers * (attention + mlp) + embeddings)


def estimate_train_seconds(config: dict[str, Any], tokens: float, checkpointing: bool) -> dict[str, float]:
    """{hardware: seconds} for training on `tokens` tokens.

    A frozen base needs no weight gradients: about 4 FLOPs per parameter per token (forward and
    input-gradient backward), 6 when gradient checkpointing recomputes the forward pass.
    """
    params = approx_parameters(config)
    if params is None:
        return {}
    flops = (6 if checkpointing else 4) * params * tokens
    return {name: flops / rate for name, rate in ASSUMED_THROUGHPUT.items()}
