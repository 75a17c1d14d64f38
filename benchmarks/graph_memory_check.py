"""GPU memory that capturing every serving graph keeps (not a test): `BatchedDecoder.capture_all` on a small
random Llama in bf16, first as LQMF does it (one warm-up stream for all captures), then with a new stream
for each capture's warm-up (as before session 9), in one process and in that order (cuBLAS keeps a
workspace per stream it ran on, so the second run's extra streams show as extra memory).

    PYTHONPATH=src python3 benchmarks/graph_memory_check.py --slots 16 --max-len 1024
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lqmf.engine.decode.batched import BatchedDecoder


def captured_bytes(model, slots: int, max_len: int, new_stream_each: bool) -> dict:
    decoder = BatchedDecoder(model, slots, max_len)
    if new_stream_each:
        decoder._side_stream = lambda: torch.cuda.Stream(decoder.device)  # the old behaviour, for the comparison
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        count = decoder.capture_all()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    return {"new_stream_each_capture": new_stream_each, "graphs": count, "kept_mib": round(kept / 2**20, 1),
            "kept_mib_per_graph": round(kept / 2**20 / max(count, 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    for new_stream_each in (False, True):
        print(json.dumps(captured_bytes(model, args.slots, args.max_len, new_stream_each)), flush=True)


if __name__ == "__main__":
    main()
