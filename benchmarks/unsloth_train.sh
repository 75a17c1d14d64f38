#!/usr/bin/env bash
# Unsloth's QLoRA training (benchmarks/baseline/unsloth_qlora.py) on a GPU machine, at SEQS (default 512
# and 2048), STEPS optimizer steps each, micro-batch 2 x 8: the HF recipe's model, tokens and LoRA
# (issue 24's side by side). Run from the repository root with $OUT set:
#
#   bash benchmarks/unsloth_train.sh            # SEQS="2048" STEPS=6 BUDGET=400 bash benchmarks/unsloth_train.sh
#
# Unsloth pins transformers <= 5.17, so this uses the machine's transformers (5.17.0 on the GPU image)
# with the wheels of .whl-unsloth/ installed into /tmp/usite, plus bitsandbytes and peft from .whl/
# (never .whl's transformers 5.25 or datasets 5). .whl-unsloth/ holds unsloth and unsloth_zoo
# 2026.10.9 (`pip download --no-deps`, then `zip -d unsloth-*.whl 'studio/*' 'unsloth_cli/*'` and
# `zip -d unsloth_zoo-*.whl 'unsloth_zoo/mlx/*'` keeping mlx/__init__.py and runtime.py, which is what
# `import unsloth` reads off Apple silicon), trl 1.15.0, datasets 4.8.5, dill and multiprocess: 5.4 MiB.
# Writes $OUT/unsloth-SEQ.log and $OUT/unsloth-SEQ/unsloth_train.json; prints each run's RESULT line.
set -u
OUT=${OUT:-/tmp/out}
SEQS=${SEQS:-512 2048}
STEPS=${STEPS:-4}
BUDGET=${BUDGET:-400}  # seconds for the whole script; each run gets at most 240 of what is left
T0=$SECONDS
# Offline machine: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE make Unsloth skip its statistics download, its
# has_internet() probe and its raw.githubusercontent mapper refresh, and keep transformers off the Hub;
# UNSLOTH_DISABLE_STATISTICS says the same to get_statistics() explicitly; UNSLOTH_DISABLE_CPU_FALLBACK
# makes a run that sees no GPU fail instead of training on the CPU; UNSLOTH_COMPILE_LOCATION keeps
# Unsloth's generated modules out of the repository (default ./unsloth_compiled_cache);
# USE_HUB_KERNELS=NO as every other script here (no Hub kernels offline).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_DISABLE_CPU_FALLBACK=1 \
    UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache USE_HUB_KERNELS=NO
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys, torch, transformers, triton, accelerate, huggingface_hub as h; print('image: python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'accelerate', accelerate.__version__, 'hub', h.__version__)"
rm -rf /tmp/usite
if ! python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/usite .whl-unsloth/*.whl \
        .whl/bitsandbytes-*.whl .whl/peft-*.whl; then
    echo 'RESULT {"error": "pip install of .whl-unsloth failed"}'; exit 1
fi
echo "== model $(date +%T)"
# /tmp/m7b with its 32,000-token tokenizer (Unsloth's loader needs one); a no-op when both are there.
PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 150 python3 -c "from gpu_train_bench import ensure_model; ensure_model()" \
    2>&1 | grep -vE "Warn|warn|it/s]" | tail -3
ls /tmp/m7b
export PYTHONPATH=/tmp/usite:$PWD/benchmarks
for seq in $SEQS; do
    left=$((BUDGET - (SECONDS - T0) - 10))
    limit=$((left < 240 ? left : 240))
    if [ "$limit" -lt 60 ]; then
        echo "RESULT {\"seq\": $seq, \"error\": \"skipped: ${left}s of the budget left\"}"; continue
    fi
    echo "== unsloth SEQ=$seq STEPS=$STEPS (limit ${limit}s) $(date +%T)"
    SEQ=$seq STEPS=$STEPS BS=2 GA=8 OUT=$OUT/unsloth-$seq timeout -k 10 "$limit" \
        python3 benchmarks/baseline/unsloth_qlora.py > "$OUT/unsloth-$seq.log" 2>&1
    echo "rc=$?"
    grep -E "Unsloth" "$OUT/unsloth-$seq.log" | grep -v "^RESULT" | awk '!seen[$0]++' | head -15 | cut -c1-250
    if grep -q "^RESULT" "$OUT/unsloth-$seq.log"; then
        grep "^RESULT" "$OUT/unsloth-$seq.log" | cut -c1-4000
    else
        echo "no RESULT line; log tail:"; tail -30 "$OUT/unsloth-$seq.log" | cut -c1-300
    fi
done
echo "== done in $((SECONDS - T0)) s $(date +%T)"
