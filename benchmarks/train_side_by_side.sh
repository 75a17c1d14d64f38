#!/usr/bin/env bash
# Issue 24's side-by-side training run on one GPU: LQMF from MAIN_SRC (today's main) and LQMF from
# NEW_SRC (a branch), then the Hugging Face QLoRA recipe, on the same Mistral-7B-shaped model and
# tokens, r=16 on q/k/v/o, effective batch 16; LQMF under a 7.3 GiB allocator cap (an 8 GB card) with a
# 7.8 GB budget, and for each LQMF the longest-sequence probe (micro-batch 1, 3 steps at LONG tokens).
#
#   OUT=/tmp/out bash benchmarks/train_side_by_side.sh src .carry/training/src      # from the repository root
#   SEQS="2048" HF=0 LONG=16384 ...                                               # a subset
#
# Writes $OUT/hf-SEQ/hf_train.json, $OUT/lqmf_train_main.json, $OUT/lqmf_train_new.json and
# $OUT/lqmf_long_{main,new}.json (gpu_train_bench.py's records: tokens/s, MFU, peaks, the plan).
set -u
MAIN_SRC=${1:?usage: train_side_by_side.sh MAIN_SRC NEW_SRC}
NEW_SRC=${2:?usage: train_side_by_side.sh MAIN_SRC NEW_SRC}
SEQS=${SEQS:-512 2048 8192}
STEPS=${STEPS:-4}
LONG=${LONG:-16384}
OUT=${OUT:-/tmp/out}
HERE=$(cd "$(dirname "$0")" && pwd)
# transformers 5.25 with the `kernels` package fetches Hub kernels when it loads a model; offline machines
# cannot (docs/measurements/gpu-check/before-1-train-hub-kernels-error.json): every run uses its own code.
export PYTHONUNBUFFERED=1 PYTHONPATH=$NEW_SRC:$HERE:${PYTHONPATH:-} USE_HUB_KERNELS=${USE_HUB_KERNELS:-NO}
python3 -c "from gpu_train_bench import ensure_model; ensure_model()" || exit
python3 "$HERE/gpu_train_bench.py" --seq $SEQS --micro-batch 16 --steps "$STEPS" --cap-gib 7.3 \
    --extra "--max-memory 7.8GB" --variant "main=$MAIN_SRC" --variant "new=$NEW_SRC" --long-probe "$LONG" \
    --out "$OUT"
if [ "${HF:-1}" = 1 ]; then
    for seq in $SEQS; do  # the recipe as written: micro-batch 2 x 8, no cap
        SEQ=$seq BS=2 GA=8 STEPS=$STEPS TRAIN_ONLY=1 OUT=$OUT/hf-$seq \
            python3 "$HERE/baseline/hf_qlora_baseline.py" 2>&1 | grep -E "RESULT|Error|error" | tail -3
    done
fi
