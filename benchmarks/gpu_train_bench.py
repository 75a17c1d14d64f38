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

Side by side, one card (issue 24): several source trees of LQMF (today's main and a branch) in
one run, each `lqmf train` process under a per-process allocator cap (an 8 GB card: 7.3 GiB for
PyTorch's allocator, the rest is the CUDA context), and the longest-sequence probe (micro-batch 1,
3 optimizer steps at --long-probe tokens, the planner's figure beside the measured peak):

    python3 benchmarks/gpu_train_bench.py --seq 512 2048 8192 --micro-batch 16 --steps 4 --cap-gib 7.3 \
        --extra "--max-memory 7.8GB" --variant main=src --variant new=.carry/training/src \
        --long-probe 16384 --out $OUT

(benchmarks/train_side_by_side.sh runs that and the Hugging Face recipe at the same lengths.)

Prints and writes one JSON record per run: median step time (first step excluded), tokens/s, MFU,
peak allocated and reserved VRAM. MFU counts 6 N + 12 L h s FLOPs per token (PaLM's convention:
forward, and backward as if the weights trained; N the parameters, L layers, h hidden size, s
the sequence) against the card's dense bf16 peak; LoRA's backward skips the frozen weights'
gradients and checkpointing adds a forward pass, so it is a convention, the same for every row.
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

MODEL_DIR = Path("/tmp/m7b")  # Mistral-7B-v0.1's attention: a 4,096-token sliding window (MistralConfig's default)
FULL_ATTENTION_DIR = Path("/tmp/m7b-full")  # --full-attention: v0.2/v0.3's, causal over the whole sequence
VOCAB = 32000
EFFECTIVE_BATCH = 16
PARAMETERS, LAYERS, HIDDEN = 7_241_732_096, 32, 4096  # the Mistral-7B shape ensure_model builds
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM parts
CAPPED = Path(__file__).with_name("capped_lqmf.py")


def ensure_model(full_attention: bool = False) -> None:
    """Build the random-weight Mistral-7B-shaped model at MODEL_DIR once; full_attention: without the
    sliding window, at FULL_ATTENTION_DIR (MODEL_DIR then points there)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lqmf.engine.tiny import build_tokenizer

    global MODEL_DIR
    if full_attention:
        MODEL_DIR = FULL_ATTENTION_DIR
    if not (MODEL_DIR / "config.json").exists():
        window = {"sliding_window": None} if full_attention else {}
        cfg = MistralConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, **window)
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


def mfu(tokens_per_s: float, seq: int) -> float | None:
    """Model FLOPs utilisation of the current card (see the module docstring), None for an unknown card."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    return round(tokens_per_s * (6 * PARAMETERS + 12 * LAYERS * HIDDEN * seq) / peak, 4)


def lqmf_command(cap_gib: float | None) -> list[str]:
    """`python -m lqmf`, or under an allocator cap of cap_gib on its GPU (benchmarks/capped_lqmf.py)."""
    if cap_gib is None:
        return [sys.executable, "-m", "lqmf"]
    return [sys.executable, str(CAPPED), str(cap_gib)]


def variant_env(source: str | None) -> dict[str, str]:
    """The environment that runs LQMF from source (a src folder) ahead of anything else."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(source).resolve()), env.get("PYTHONPATH", "")])
    return env


def run(seq: int, micro: int, steps: int, extra: list[str], gpus: int = 1, strategy: str = "auto",
        source: str | None = None, cap_gib: float | None = None, label: str = "lqmf",
        effective: int = EFFECTIVE_BATCH) -> dict:
    workspace = Path(f"/tmp/lqmf-bench-ws-{label}")
    name = f"bench-{seq}-{micro}-{gpus}-{strategy}"
    data = write_tokens(seq, steps * effective)
    if gpus > 1:
        extra = [*extra, "--gpus", str(gpus), "--set", f"strategy={strategy}"]
    cmd = [*lqmf_command(cap_gib), "--workspace", str(workspace), "train", str(MODEL_DIR), str(data), "chat",
           "--name", name, "--force", "--max-steps", str(steps), "--batch-size", str(micro),
           "--grad-accum", str(effective // micro), "--max-seq-length", str(seq), "--rank", "16",
           "--set", "validation_split=0", "--set", "eval_at_start=false", "--set", "lora_alpha=32",
           "--set", "target_modules=q_proj,k_proj,v_proj,o_proj", *extra]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=variant_env(source))
    wall = time.time() - started
    if proc.returncode != 0:
        return {"variant": label, "seq": seq, "micro_batch": micro, "error": proc.stderr[-2000:]}
    folder = workspace / "adapters" / name
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in log if r["type"] == "train"]
    step_times = [b - a for a, b in zip(elapsed[:-1], elapsed[1:], strict=True)]
    step_s = statistics.median(step_times) if step_times else elapsed[-1]
    manifest = json.loads((folder / "lqmf.json").read_text())
    metrics = manifest["metrics"]
    tokens_per_s = effective * seq / step_s
    return {
        "variant": label, "source": source, "cap_gib": cap_gib,
        "seq": seq, "micro_batch": micro, "grad_accum": effective // micro, "steps": steps,
        "step_s_median": round(step_s, 3), "train_tok_s": round(tokens_per_s, 1), "mfu": mfu(tokens_per_s, seq),
        "peak_alloc_gb": round(metrics["peak_memory_gb"], 3),
        "peak_reserved_gb": round(metrics.get("peak_memory_reserved_gb", 0), 3),
        "peak_alloc_gb_per_process": metrics.get("peak_memory_gb_per_process"),
        "final_loss": metrics["train_loss"], "wall_s": round(wall, 1), "runtime": manifest["runtime"],
        "memory_events": [r for r in log if r["type"] == "memory"],
        "extra": extra, "gpus": gpus, "strategy": manifest["runtime"].get("strategy"),
        "plan": plan_estimate(seq, manifest["runtime"], gpus, workspace, source) if gpus > 1 or effective == 1
        else None,
    }


def long_probe(seq: int, extra: list[str], source: str | None, cap_gib: float | None, label: str) -> dict:
    """Micro-batch 1, 3 optimizer steps of one seq-token sequence each; the planner's peak beside the measured."""
    record = run(seq, 1, 3, extra, source=source, cap_gib=cap_gib, label=f"{label}-long", effective=1)
    record["probe"] = "longest sequence, micro-batch 1, 3 steps"
    if "plan" in record and record["plan"]:
        planned = record["plan"]["peak_allocated_gb"]
        record["plan_vs_measured_pct"] = round(100 * (planned / record["peak_alloc_gb"] - 1), 1)
    return record


def plan_estimate(seq: int, runtime: dict, gpus: int, workspace: Path, source: str | None = None) -> dict:
    """`lqmf plan --gpus N --strategy S --json` at the micro-batch, offload and tiling the run used: per GPU."""
    micro = runtime["micro_batch"]
    cmd = [sys.executable, "-m", "lqmf", "--workspace", str(workspace), "plan", str(MODEL_DIR), "--seq-len",
           str(seq), "--batch-size", str(micro), "--rank", "16", "--targets", "q_proj,k_proj,v_proj,o_proj",
           "--max-memory", "80GB", "--offload" if runtime["offload_activations"] else "--no-offload", "--json"]
    if gpus > 1:
        cmd += ["--gpus", str(gpus), "--strategy", runtime["strategy"]]
    if "tiled_mlp" in runtime:
        cmd.append("--tiled-mlp" if runtime["tiled_mlp"] else "--no-tiled-mlp")
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=variant_env(source)).stdout)
    estimate = report["estimate"]
    return {"peak_allocated_gb": estimate["peak_allocated_gb"],
            "allocated_plus_slack_gb": round(estimate["peak_allocated_gb"] + estimate["allocator_slack_gb"], 3),
            "total_gb": estimate["total_gb"], "chosen": report.get("strategies", {}).get("chosen")}


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


def variant_spec(text: str) -> tuple[str, str, list[str]]:
    """NAME=SRC[@OPTIONS] -> (name, src folder, more lqmf train options)."""
    label, _, rest = text.partition("=")
    source, _, options = rest.partition("@")
    return label, source, options.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--extra", default="", help="more lqmf train options, space separated")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run (lqmf train --gpus)")
    parser.add_argument("--strategies", nargs="+", default=["auto"], help="with --gpus above 1: ddp fsdp auto")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC[@OPTIONS]",
                        help="run LQMF from this src folder too, under this name, with these more lqmf train "
                        "options (space separated) after @ (repeat: side by side)")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="cap each lqmf train process's CUDA allocator at this many GiB (7.3: an 8 GB card)")
    parser.add_argument("--long-probe", type=int, default=0, metavar="TOKENS",
                        help="also train 3 steps of one sequence of this many tokens (micro-batch 1), each variant")
    parser.add_argument("--long-probe-for", nargs="*", default=None, metavar="NAME",
                        help="the variants that run the long probe (default: all)")
    parser.add_argument("--full-attention", action="store_true",
                        help="the model without Mistral-7B-v0.1's 4,096-token sliding window (as v0.2 and v0.3)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    ensure_model(args.full_attention)
    variants = [variant_spec(v) for v in args.variant] or [("lqmf", None, [])]
    layouts = [(gpus, strategy) for gpus in args.gpus for strategy in (args.strategies if gpus > 1 else ["single"])]
    for label, source, options in variants:
        extra = [*args.extra.split(), *options]
        for gpus, strategy in layouts:
            suffix = "" if layouts == [(1, "single")] else f"_{gpus}gpu_{strategy}"
            prefix = "" if label == "lqmf" else f"_{label}"
            sweep(args.seq, args.micro_batch,
                  lambda seq, micro, g=gpus, s=strategy, lb=label, src=source, ex=extra: run(
                      seq, micro, args.steps, ex, g, s, src, args.cap_gib, lb),
                  args.out, f"lqmf_train{prefix}{suffix}.json")
        if args.long_probe and (args.long_probe_for is None or label in args.long_probe_for):
            sweep([args.long_probe], [1], lambda seq, _micro, lb=label, src=source, ex=extra: long_probe(
                seq, ex, src, args.cap_gib, lb), args.out, f"lqmf_long{prefix}.json")


if __name__ == "__main__":
    main()
