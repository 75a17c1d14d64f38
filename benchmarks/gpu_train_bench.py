"""LQMF training speed and memory on a GPU, on the baseline recipe's model and data.

Builds (or reuses) the randomly initialised Mistral-7B-shaped model at /tmp/m7b that
benchmarks/baseline/hf_qlora_baseline.py trains, gives it a 32,000-token tokenizer, writes the
baseline's exact token sequences (torch.Generator seeded with the row index, ids in [3, 32000))
as a pre-tokenized JSONL dataset, and times `lqmf train` on it: r=16 on q/k/v/o, 16 sequences per
optimizer step, loss on every token, as the baseline. Run on the GPU machine:

    PYTHONPATH=src python3 benchmarks/gpu_train_bench.py --seq 512 2048 --micro-batch 16 \
        --extra "--max-memory 8GB" --out $OUT

(--micro-batch asks for a micro-batch; with --max-memory the planner may lower it, and the record's
runtime says what ran.)

Several GPUs (`lqmf train --gpus N`, one process per GPU; docs/performance.md):

    PYTHONPATH=src python3 benchmarks/gpu_train_bench.py --seq 2048 --micro-batch 16 --steps 6 \
        --extra "--max-memory 8GB" --gpus 1 2 --strategies ddp fsdp --out $OUT

runs the one-GPU baseline and each strategy on each GPU count above one, and next to every run
`lqmf plan --gpus N --strategy S --json` at the micro-batch and offload the run used, for the
planner's per-GPU estimate.

Prints and writes one JSON record per run: median step time (first step excluded), tokens/s,
peak allocated and reserved VRAM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL_DIR = Path("/tmp/m7b")
VOCAB = 32000
EFFECTIVE_BATCH = 16


def ensure_model() -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lqmf.engine.tiny import build_tokenizer

    if not (MODEL_DIR / "config.json").exists():
        cfg = MistralConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = MistralForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(MODEL_DIR)
        del model
        torch.cuda.empty_cache()
    if not (MODEL_DIR / "tokenizer.json").exists():
        tokenizer = build_tokenizer(chat_template=True)
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB - len(tokenizer))])
        assert len(tokenizer) == VOCAB
        tokenizer.save_pretrained(MODEL_DIR)


def write_tokens(seq: int, rows: int) -> Path:
    import torch

    path = Path(f"/tmp/tokens-{seq}.jsonl")
    with open(path, "w") as handle:
        for i in range(rows):
            g = torch.Generator().manual_seed(i)
            handle.write(json.dumps({"input_ids": torch.randint(3, VOCAB, (seq,), generator=g).tolist()}) + "\n")
    return path


def run(seq: int, micro: int, steps: int, extra: list[str], gpus: int = 1, strategy: str = "auto") -> dict:
    workspace = Path("/tmp/lqmf-bench-ws")
    name = f"bench-{seq}-{micro}-{gpus}-{strategy}"
    data = write_tokens(seq, steps * EFFECTIVE_BATCH)
    if gpus > 1:
        extra = [*extra, "--gpus", str(gpus), "--set", f"strategy={strategy}"]
    cmd = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), "train", str(MODEL_DIR), str(data), "chat",
           "--name", name, "--force", "--max-steps", str(steps), "--batch-size", str(micro),
           "--grad-accum", str(EFFECTIVE_BATCH // micro), "--max-seq-length", str(seq), "--rank", "16",
           "--set", "validation_split=0", "--set", "eval_at_start=false", "--set", "lora_alpha=32",
           "--set", "target_modules=q_proj,k_proj,v_proj,o_proj", *extra]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        return {"seq": seq, "micro_batch": micro, "error": proc.stderr[-2000:]}
    folder = workspace / "adapters" / name
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in log if r["type"] == "train"]
    step_times = [b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True)]
    step_s = statistics.median(step_times) if step_times else elapsed[-1]
    manifest = json.loads((folder / "lqmf.json").read_text())
    metrics = manifest["metrics"]
    return {
        "seq": seq, "micro_batch": micro, "grad_accum": EFFECTIVE_BATCH // micro, "steps": steps,
        "step_s_median": round(step_s, 3), "train_tok_s": round(EFFECTIVE_BATCH * seq / step_s, 1),
        "peak_alloc_gb": round(metrics["peak_memory_gb"], 3),
        "peak_reserved_gb": round(metrics.get("peak_memory_reserved_gb", 0), 3),
        "peak_alloc_gb_per_process": metrics.get("peak_memory_gb_per_process"),
        "final_loss": metrics["train_loss"], "wall_s": round(wall, 1), "runtime": manifest["runtime"],
        "extra": extra, "gpus": gpus, "strategy": manifest["runtime"].get("strategy"),
        "plan": plan_estimate(seq, manifest["runtime"], gpus, workspace) if gpus > 1 else None,
    }


def plan_estimate(seq: int, runtime: dict, gpus: int, workspace: Path) -> dict:
    """`lqmf plan --gpus N --strategy S --json` at the micro-batch and offload the run used: per GPU."""
    micro = runtime["micro_batch"]
    cmd = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), "plan", str(MODEL_DIR), "--seq-len",
           str(seq), "--batch-size", str(micro), "--rank", "16", "--targets", "q_proj,k_proj,v_proj,o_proj",
           "--max-memory", "80GB", "--gpus", str(gpus), "--strategy", runtime["strategy"],
           "--offload" if runtime["offload_activations"] else "--no-offload", "--json"]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    estimate = report["estimate"]
    return {"peak_allocated_gb": estimate["peak_allocated_gb"],
            "allocated_plus_slack_gb": round(estimate["peak_allocated_gb"] + estimate["allocator_slack_gb"], 3),
            "total_gb": estimate["total_gb"], "chosen": report["strategies"]["chosen"]}


def sweep(seqs: list[int], micro_batches: list[int], measure, out: str, filename: str) -> list[dict]:
    """measure(seq, micro_batch) for every pair, each record printed as it comes, all written to out/filename."""
    results = []
    for seq in seqs:
        for micro in micro_batches:
            result = measure(seq, micro)
            print("RESULT", json.dumps(result), flush=True)
            results.append(result)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / filename).write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--extra", default="", help="more lqmf train options, space separated")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run (lqmf train --gpus)")
    parser.add_argument("--strategies", nargs="+", default=["auto"], help="with --gpus above 1: ddp fsdp auto")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    ensure_model()
    layouts = [(gpus, strategy) for gpus in args.gpus for strategy in (args.strategies if gpus > 1 else ["single"])]
    for gpus, strategy in layouts:
        suffix = "" if layouts == [(1, "single")] else f"_{gpus}gpu_{strategy}"
        sweep(args.seq, args.micro_batch,
              lambda seq, micro, g=gpus, s=strategy: run(seq, micro, args.steps, args.extra.split(), g, s),
              args.out, f"lqmf_train{suffix}.json")


if __name__ == "__main__":
    main()
