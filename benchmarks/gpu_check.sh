#!/usr/bin/env bash
# The GPU check (tests/gpu/): greedy answers, logits and training steps of the fast path against stock
# PEFT + transformers' generate, on a 4-bit NF4 model with several adapters (tolerances: the module's
# docstring). Run from the repository root on a CUDA machine; `make gpu-check` runs it too.
# Writes the versions and the pytest log to $OUT (default /tmp/out); exits non-zero when a check fails.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0  # Triton kernels compiled, as served
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/gpu-check-versions.txt"
python3 -m pytest -p no:cacheprovider -q -s -rA --durations=0 tests/gpu "$@" 2>&1 | tee "$OUT/gpu-check.log"
