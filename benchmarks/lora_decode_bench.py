"""Ways to run a LoRA update at batch-1 decode, timed on the 4-bit projections of a 7B model (GPU only).

Builds the attention and MLP projections of one Mistral-7B layer as bitsandbytes NF4 layers, r=16
LoRA A/B for q/k/v (fused: one stacked A, one block-diagonal B) and o, then captures the layer's
projections 32 times over in one CUDA graph per way of applying LoRA, and reports each graph's GPU
time per token and its cost over the bare base, per layer. The products are cuBLAS GEMMs; the
ways differ in where they run and how they reach the outputs:

  - side_all_then_add: on a side stream beside q/k/v's base products, then one add per projection;
  - side_add_each: the same, each projection adding its part right after its base product;
  - side_bias_kv: on a side stream beside q's base product; k's and v's base GEMVs take theirs as
    bias, and only q and o need an add (what engine/lora/lean.py does);
  - inline_add / inline_bias: on the main stream, then adds / as the base GEMVs' bias.

A model-free first look at the choices that benchmarks/decode_profile.py then measures in the real
model. Run on the GPU machine:

    PYTHONPATH=src python3 benchmarks/lora_decode_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HIDDEN, KV, INTERMEDIATE, LAYERS, RANK, SCALE = 4096, 1024, 14336, 32, 16, 2.0


def nf4(rows: int, cols: int):
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight.data.normal_(0, 0.02)
    return layer.cuda()  # quantizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v, o = nf4(HIDDEN, HIDDEN), nf4(KV, HIDDEN), nf4(KV, HIDDEN), nf4(HIDDEN, HIDDEN)
    gate, up, down = nf4(INTERMEDIATE, HIDDEN), nf4(INTERMEDIATE, HIDDEN), nf4(HIDDEN, INTERMEDIATE)
    qkv_a = torch.randn(3 * RANK, HIDDEN, **bf16) * 0.02
    qkv_b = torch.zeros(HIDDEN + 2 * KV, 3 * RANK, **bf16)
    for index, (start, stop) in enumerate(((0, HIDDEN), (HIDDEN, HIDDEN + KV), (HIDDEN + KV, HIDDEN + 2 * KV))):
        qkv_b[start:stop, index * RANK:(index + 1) * RANK] = torch.randn(stop - start, RANK, **bf16) * 0.02
    o_a, o_b = torch.randn(RANK, HIDDEN, **bf16) * 0.02, torch.randn(HIDDEN, RANK, **bf16) * 0.02
    x = torch.randn(1, HIDDEN, **bf16)
    side = torch.cuda.Stream()
    spans = ((q, 0, HIDDEN), (k, HIDDEN, HIDDEN + KV), (v, HIDDEN + KV, HIDDEN + 2 * KV))

    def gemv(layer, rows, bias=None):
        return bnb.matmul_4bit(rows, layer.weight.t(), bias=bias, quant_state=layer.weight.quant_state)

    def cublas(rows, a, b):
        return (rows @ a.t() @ b.t()).mul_(SCALE)

    def mlp(rows):
        return gemv(down, gemv(gate, rows)[:, :INTERMEDIATE] * gemv(up, rows))

    def layer_base(rows):
        outs = [gemv(layer, rows) for layer, _, _ in spans]
        return mlp(gemv(o, outs[0]))

    def layer_add(product):
        def run(rows):
            outs = [gemv(layer, rows) for layer, _, _ in spans]
            delta = product(rows, qkv_a, qkv_b)
            for out, (_, start, stop) in zip(outs, spans, strict=True):
                out.add_(delta[:, start:stop])
            attn = gemv(o, outs[0])
            attn.add_(product(outs[0], o_a, o_b))
            return mlp(attn)
        return run

    def layer_bias(product):
        def run(rows):
            delta = product(rows, qkv_a, qkv_b)
            outs = [gemv(layer, rows, delta[0, start:stop]) for layer, start, stop in spans]
            return mlp(gemv(o, outs[0], product(outs[0], o_a, o_b)[0]))
        return run

    def on_side(rows, a, b):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            delta = cublas(rows, a, b)
        return delta

    def join():
        torch.cuda.current_stream().wait_stream(side)

    def layer_side(rows):  # every base product of the group, then the adds
        delta = on_side(rows, qkv_a, qkv_b)
        outs = [gemv(layer, rows) for layer, _, _ in spans]
        join()
        for out, (_, start, stop) in zip(outs, spans, strict=True):
            out.add_(delta[:, start:stop])
        return side_o(outs[0])

    def layer_side_each(rows):  # each projection adds its part as soon as its base product is done
        delta = on_side(rows, qkv_a, qkv_b)
        outs = []
        for layer, start, stop in spans:
            outs.append(gemv(layer, rows))
            join()
            outs[-1].add_(delta[:, start:stop])
        return side_o(outs[0])

    def layer_side_bias(rows):  # q's base product covers the side products; k and v take theirs as bias
        delta = on_side(rows, qkv_a, qkv_b)
        first = gemv(q, rows)
        join()
        outs = [first] + [gemv(layer, rows, delta[0, start:stop]) for layer, start, stop in spans[1:]]
        first.add_(delta[:, :HIDDEN])
        return side_o(outs[0])

    def side_o(rows):
        delta = on_side(rows, o_a, o_b)
        attn = gemv(o, rows)
        join()
        attn.add_(delta)
        return mlp(attn)

    ways = {"base": layer_base, "side_all_then_add": layer_side, "side_add_each": layer_side_each,
            "side_bias_kv": layer_side_bias, "inline_add": layer_add(cublas), "inline_bias": layer_bias(cublas)}
    results: dict = {"device": torch.cuda.get_device_name()}
    with torch.inference_mode():
        for name, layer in ways.items():
            def token(layer=layer):
                rows = x
                for _ in range(LAYERS):
                    rows = layer(rows)[:, :HIDDEN] * 0 + x  # same input every layer, in order
                return rows

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                token()
                token()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                token()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            for _ in range(args.repeats):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            results[name] = {"ms_per_token": round(start.elapsed_time(end) / args.repeats, 4)}
    for name in ways:
        results[name]["over_base_us_per_layer"] = round(
            1000 * (results[name]["ms_per_token"] - results["base"]["ms_per_token"]) / LAYERS, 2)
    print(json.dumps(results, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "lora_decode_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
