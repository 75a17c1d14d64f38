"""Host time of a training micro-batch, measured on the CPU: `lqmf train --device cpu --4bit` on a
Mistral-shaped model 32 layers deep and 64 wide, 16-token micro-batches.

The tensors are so small that a step's time is what Python, autograd, checkpointing, PEFT and
bitsandbytes spend issuing the operations, which on a GPU is the host's share of a micro-batch (the
same operations for any micro-batch size; docs/performance.md, session 19). Variants run LQMF from
other source trees or with other options, one after another in this process's machine:

    python3 benchmarks/train_host_time.py --variant main=OLD/src --variant new=src \
        --variant kept=src@"--set recompute_lora_dropout=off"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORK = Path(os.environ.get("LQMF_HOST_TIME_DIR", "/tmp/lqmf-host-time"))
MICRO_BATCHES = 16  # a step: 16 micro-batches of one 16-token row


def build_model() -> Path:
    """The narrow 32-layer Mistral and its tokenizer, and 64 rows of 128 random tokens (once)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lqmf.engine.tiny import build_tokenizer

    model = WORK / "m32x64"
    if not (model / "config.json").exists():
        tokenizer = build_tokenizer(chat_template=True)
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=224,
                               num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=2,
                               max_position_embeddings=4096, sliding_window=None, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        MistralForCausalLM(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
    tokens = WORK / "tokens.jsonl"
    if not tokens.exists():
        with open(tokens, "w") as handle:
            for i in range(64):
                ids = torch.randint(10, 400, (128,), generator=torch.Generator().manual_seed(i)).tolist()
                handle.write(json.dumps({"input_ids": ids}) + "\n")
    return model


def run(label: str, source: str, options: list[str], steps: int) -> dict:
    """One `lqmf train` run; the median step time over its steps after the first, per micro-batch."""
    workspace = WORK / f"ws-{label}"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(source).resolve()), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), "train", str(WORK / "m32x64"),
           str(WORK / "tokens.jsonl"), "chat", "--name", "host", "--force", "--max-steps", str(steps),
           "--batch-size", "1", "--grad-accum", str(MICRO_BATCHES), "--max-seq-length", "16", "--rank", "16",
           "--set", "validation_split=0", "--set", "eval_at_start=false", "--set", "lora_alpha=32",
           "--set", "target_modules=q_proj,k_proj,v_proj,o_proj", "--device", "cpu", "--4bit", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": label, "error": proc.stderr[-1000:]}
    log = [json.loads(line) for line in (workspace / "adapters" / "host" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    elapsed = [r["elapsed_s"] for r in train]
    step_s = statistics.median(b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True))
    return {"variant": label, "source": source, "options": options,
            "ms_per_micro_batch": round(step_s / MICRO_BATCHES * 1000, 1), "final_loss": train[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC[@OPTIONS]",
                        help="LQMF from SRC (a src folder) with lqmf train OPTIONS; default main=src")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    build_model()
    variants = []
    for spec in args.variant or ["main=src"]:
        label, _, rest = spec.partition("=")
        source, _, options = rest.partition("@")
        variants.append((label, source, options.split()))
    results = []
    for repeat in range(args.repeats):
        for label, source, options in variants:
            result = run(label, source, options, args.steps)
            results.append({**result, "repeat": repeat})
            print("RESULT", json.dumps(result), flush=True)
    for label, _, _ in variants:
        times = [r["ms_per_micro_batch"] for r in results if r["variant"] == label and "error" not in r]
        if times:
            print(f"{label}: {min(times)} ms a micro-batch (best of {len(times)})")


if __name__ == "__main__":
    main()
