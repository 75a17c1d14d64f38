"""The memory estimator against the measured peak of real `lqmf train` runs on a GPU.

Builds (or reuses) the randomly initialised Mistral-7B-shaped model and the baseline's token
sequences through benchmarks/gpu_train_bench.py, trains with `lqmf train` for a few steps at each
setting (QLoRA, r=16 on q/k/v/o, loss on every token, no padding: every sequence is exactly SEQ
tokens), and prints one JSON record per run comparing:

  estimate.peak_allocated_gb  vs  measured torch.cuda.max_memory_allocated() of the training steps
  estimate.peak_allocated_gb + allocator_slack_gb  vs  measured max_memory_reserved()
  estimate.total_gb  vs  the largest GPU memory in use seen by nvidia-smi during the run
  estimate.cuda_context_gb  vs  what a bare CUDA context takes on this GPU (measured first)

The estimate is computed for unpadded micro-batches (padded=False), as the data has no padding;
`lqmf plan` and the training loop plan for the worse of padded and unpadded. Run on the GPU machine:

    PYTHONPATH=src python3 benchmarks/memory_check.py --seq 512 2048 --micro-batch 2 --out $OUT

It writes $OUT/memory_check.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train_bench as bench  # noqa: E402  (the model and data builders beside this file)

from lqmf.core.memory_plan import ModelShape, TrainSettings, estimate  # noqa: E402
from lqmf.core.models import read_model_config  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def bare_context_gb() -> float:
    """GPU memory a process holds once CUDA is initialised and one tiny tensor exists."""
    code = ("import torch; torch.zeros(1, device='cuda'); free, total = torch.cuda.mem_get_info(); "
            "print((total - free) / 2**30)")
    before = _gpu_used_gb()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip()) - before


def _gpu_used_gb() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[0]) / 1024


class GpuWatch:
    """The largest nvidia-smi memory.used reading while the block runs (every 0.2 s)."""

    def __enter__(self) -> GpuWatch:
        self.peak = self.start = _gpu_used_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _gpu_used_gb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def check(seq: int, micro: int, steps: int, context_gb: float) -> dict:
    shape = ModelShape.from_config(read_model_config(bench.MODEL_DIR))
    settings = TrainSettings(micro_batch=micro, seq_len=seq, lora_r=16, target_modules=TARGETS, padded=False)
    predicted = estimate(shape, settings).to_dict()
    worst_case = estimate(shape, replace(settings, padded=None)).to_dict()
    with GpuWatch() as watch:
        run = bench.run(seq, micro, steps, [])
    if "error" in run:
        return {"seq": seq, "micro_batch": micro, "error": run["error"]}
    estimated_reserved = predicted["peak_allocated_gb"] + predicted["allocator_slack_gb"]
    in_use = max(watch.peak - watch.start, 1e-9)
    return {
        "seq": seq, "micro_batch": micro, "steps": steps,
        "measured": {"peak_allocated_gb": run["peak_alloc_gb"], "peak_reserved_gb": run["peak_reserved_gb"],
                     "nvidia_smi_peak_gb": round(in_use, 3), "bare_cuda_context_gb": context_gb},
        "estimate": predicted,
        "estimate_padded_worst_case_total_gb": worst_case["total_gb"],
        "error_pct": {
            "peak_allocated": round(100 * (predicted["peak_allocated_gb"] / run["peak_alloc_gb"] - 1), 1),
            "peak_reserved": round(100 * (estimated_reserved / run["peak_reserved_gb"] - 1), 1),
            "total_vs_nvidia_smi": round(100 * (predicted["total_gb"] / in_use - 1), 1),
        },
        "run": run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    bench.ensure_model()
    context = round(bare_context_gb(), 3)
    bench.sweep(args.seq, args.micro_batch, lambda seq, micro: check(seq, micro, args.steps, context), args.out,
                "memory_check.json")


if __name__ == "__main__":
    main()
