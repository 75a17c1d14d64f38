#!/usr/bin/env bash
# Run from the device's repository root (/work/main's copy): GPU check on the branch, then single-stream speed main vs branch.
ROOT=$PWD
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -c "import pyarrow, pandas; print('pyarrow', pyarrow.__version__, 'pandas', pandas.__version__)" 2>&1 | tail -1
cd .carry/decoder
export PYTHONPATH=$PWD/src:/tmp/site
(time timeout 110 bash benchmarks/gpu_check.sh) 2>&1 | tail -25
BENCH=$PWD/benchmarks
timeout 90 python3 -c "import sys; sys.path.insert(0, '$BENCH'); from gpu_train_bench import ensure_model; ensure_model()" 2>&1 | tail -2
for label in main branch; do
  if [ $label = main ]; then SRC=$ROOT/src; else SRC=$PWD/src; fi
  PYTHONPATH=$SRC:$BENCH:/tmp/site timeout 75 python3 $BENCH/single_stream_bench.py --label $label --out $OUT/single-stream-$label.json 2>&1 | grep -E "RESULT|Error|error" | tail -3
done
