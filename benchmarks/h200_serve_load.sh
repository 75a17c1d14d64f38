#!/usr/bin/env bash
# The H200 run behind docs/serving.md's continuous-batching table (issue 12), from the repository root:
# a tiny-model smoke test of `lqmf serve` on CUDA, then the Mistral-7B-shaped 4-bit model of
# benchmarks/gpu_train_bench.py under 1, 4, 16 and 32 concurrent clients, and a 16 x 1,024-token
# memory run. Results go to $OUT (default /tmp/out).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/benchmarks:$PYTHONPATH CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, \
peft.__version__, bitsandbytes.__version__)" >> "$OUT/gpu.txt" 2>&1
timeout 150 python3 benchmarks/serve_load.py --shape tiny --device cuda --clients 1 4 16 --rounds 1 \
    --new-tokens 32 --max-batch 16 --mixed-clients 4 --load-repeats 3 --out "$OUT/tiny-cuda.json" --server-log "$OUT/tiny-server.log" \
    > "$OUT/tiny-cuda.log" 2>&1 || { echo "tiny smoke failed"; tail -50 "$OUT/tiny-cuda.log"; }
tail -5 "$OUT/tiny-cuda.log"
python3 -c "from gpu_train_bench import ensure_model; ensure_model()" || exit 1
python3 benchmarks/serve_load.py --model /tmp/m7b --device cuda --4bit --clients ${CLIENTS:-1 4 16 32} \
    --rounds ${ROUNDS:-2} --max-batch 32 --max-seq-len 512 --mixed-clients 16 --load-repeats 5 \
    --memory-run 16 1024 --out "$OUT/h200-serve-load.json" --server-log "$OUT/h200-server.log" 2>&1 | grep -v "it/s]" | tee "$OUT/h200-serve-load.log"
