"""Size and held-out quality of a compressed adapter: MiniLM sentiment (classification), on the CPU.

Trains one adapter on examples/datasets/sentiment.csv in a temporary workspace, then runs
`lqmf adapters compress` at several ranks / energies / dtypes and prints a Markdown table of the
weights file size and the held-out accuracy and loss before -> after (the split training held out).

    PYTHONPATH=src python benchmarks/compress_bench.py [--steps 60] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [
    ("r=8", ["--rank", "8"]),
    ("r=4", ["--rank", "4"]),
    ("r=2", ["--rank", "2"]),
    ("energy 0.9", ["--energy", "0.9"]),
    ("bf16", ["--dtype", "bf16"]),
    ("r=8 + bf16", ["--rank", "8", "--dtype", "bf16"]),
]


def lqmf(workspace: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "lqmf", "--workspace", str(workspace), *args, "--json"],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"lqmf {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="lqmf-compress-"))
    started = time.perf_counter()
    lqmf(workspace, "train", "minilm", str(REPO / "examples/datasets/sentiment.csv"), "classification",
         "--name", "sent", "--no-4bit", "--max-steps", str(args.steps), "--lr", str(args.lr), "--device", "cpu")
    print(f"trained 'sent' ({args.steps} steps, lr {args.lr:g}) in {time.perf_counter() - started:.0f} s\n")
    print("| variant | weights file | accuracy before -> after | loss before -> after | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for index, (label, options) in enumerate(VARIANTS):
        started = time.perf_counter()
        result = lqmf(workspace, "adapters", "compress", "sent", "--name", f"c{index}", "--device", "cpu", *options)
        seconds = time.perf_counter() - started
        size, scores = result["size_bytes"], result["scores"]
        before, after = scores["before"], scores["after"]
        print(f"| {label} | {size['before'] / 1024:.0f} KB -> {size['after'] / 1024:.0f} KB "
              f"({size['after'] / size['before']:.0%}) | {before['accuracy']:.3f} -> {after['accuracy']:.3f} | "
              f"{before['loss']:.4f} -> {after['loss']:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
