#!/usr/bin/env bash
# Issue 23's serving run on one GPU: `lqmf serve` from two source trees, one after the other, on the
# Mistral-7B-shaped random model (benchmarks/gpu_train_bench.py builds /tmp/m7b), NF4, 128 new tokens a
# request, each tree driven by its own benchmarks/serve_load.py with the openai client:
#
#   OUT=/tmp/out bash benchmarks/serve_side_by_side.sh BASE_TREE NEW_TREE [more serve_load options for NEW]
#
# BASE_TREE and NEW_TREE are repository roots (src/ and benchmarks/ in each). Writes
# $OUT/serve-base.json and $OUT/serve-new.json (serve_load.py's reports), the servers' logs to $LOGS (/tmp).
set -u
BASE=${1:?usage: serve_side_by_side.sh BASE_TREE NEW_TREE [options]}
NEW=${2:?usage: serve_side_by_side.sh BASE_TREE NEW_TREE [options]}
shift 2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 USE_HUB_KERNELS=${USE_HUB_KERNELS:-NO}
PYTHONPATH=$NEW/src:$NEW/benchmarks:${PYTHONPATH:-} python3 -c "from gpu_train_bench import ensure_model; ensure_model()" || exit
COMMON=(--model /tmp/m7b --device cuda --4bit --clients 1 16 32 --rounds 1 --max-batch 32 --max-seq-len 512
        --mixed-clients 16 --load-repeats 1)
for side in base new; do
    tree=$BASE; more=()
    if [ "$side" = new ]; then tree=$NEW; more=("$@"); fi
    echo "== $side: $tree"
    PYTHONPATH=$tree/src:${PYTHONPATH:-} python3 "$tree/benchmarks/serve_load.py" "${COMMON[@]}" "${more[@]}" \
        --out "$OUT/serve-$side.json" --server-log "${LOGS:-/tmp}/serve-$side.log" 2>&1 | cut -c1-400
done
