"""Single-stream generation speed (not a test): what `lqmf test`, `lqmf bench` and the shell get.

Loads the 4-bit Mistral-7B-shaped model of gpu_train_bench.py with one random r=16 q/k/v/o adapter
(serve_bench.write_adapters) through `inference.load_for_inference`, then times `inference.generate`
of exactly --new-tokens greedy tokens, the median of --repeats after one warm-up, with the bare base
and with the adapter. Uses only public engine functions, so the same script times any tree: run it
with that tree's src first on PYTHONPATH, both trees in one sitting on one card:

    PYTHONPATH=src:benchmarks python3 benchmarks/single_stream_bench.py --label branch --out $OUT/branch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="tree")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, help="a saved causal LM folder (default: build gpu_train_bench's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from gpu_train_bench import MODEL_DIR, ensure_model
    from serve_bench import PROMPT, write_adapters

    from lqmf.core.workspace import Workspace
    from lqmf.engine import inference

    folder = args.model or MODEL_DIR
    if args.model is None:
        ensure_model()
    four_bit = args.device == "cuda"
    root = Path(tempfile.mkdtemp(prefix="lqmf-single-stream-")) / "ws"
    names = write_adapters(root, folder, str(folder), 1, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], four_bit)
    model = inference.load_for_inference(Workspace(root), names[0], device=args.device, quantize_4bit=four_bit)
    model.fast_decode = True
    ids = inference.prompt_ids(model, PROMPT)
    rows = {"label": args.label, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
            "decoder": type(model.decoder).__name__}
    for label, slot in (("base", None), ("adapter", model.adapters[0])):
        with inference.adapter_context(model, slot):
            inference.generate(model, ids, max_new_tokens=8, min_new_tokens=8)  # warm-up: graphs captured
            runs = [inference.generate(model, ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                    for _ in range(args.repeats)]
        rows[label] = {"tokens_per_s": round(statistics.median(r.tokens_per_second for r in runs), 2),
                       "all": [round(r.tokens_per_second, 2) for r in runs],
                       "first_token_ms": round(statistics.median(r.first_token_seconds for r in runs) * 1000, 2)}
    rows["decoder"] = type(model.decoder).__name__
    print("RESULT", json.dumps(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
