#!/usr/bin/env bash
# The speeds issue 21's no-regression criterion compares, for the tree this runs from (repository root):
# `lqmf train` tokens/s at seq 512 and 2048 under the 7.3 GiB cap (--max-memory 8GB, docs/performance.md)
# and `lqmf serve` at 1 and 16 clients (benchmarks/serve_load.py, docs/serving.md), on the
# Mistral-7B-shaped 4-bit model of gpu_train_bench.py. Run old and new trees in one sitting on one card.
# Usage: OUT=dir benchmarks/speed_check.sh LABEL
LABEL=${1:-tree}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "from gpu_train_bench import ensure_model; ensure_model()" || exit 1
mkdir -p "$OUT/train-$LABEL"
timeout ${TRAIN_TIMEOUT:-300} python3 benchmarks/gpu_train_bench.py --seq 512 2048 --micro-batch 16 \
    --steps ${STEPS:-5} --extra "--max-memory 8GB" --out "$OUT/train-$LABEL" 2>&1 | grep RESULT
timeout ${SERVE_TIMEOUT:-240} python3 benchmarks/serve_load.py --model /tmp/m7b --device cuda --4bit --clients 1 16 \
    --rounds ${ROUNDS:-2} --max-batch 32 --max-seq-len 512 --mixed-clients 1 --load-repeats 1 \
    --out "$OUT/serve-$LABEL.json" 2>&1 | grep -v "it/s]" | grep '"clients"' | tail -2
