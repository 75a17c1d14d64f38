#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for the benchmarks of docs/serving.md and docs/performance.md,
# downloaded here (where pip reaches the registries) at the versions this checkout's .venv runs, into
# .whl/ (the engine's libraries; bitsandbytes trimmed to its CUDA 13 libraries to fit the 64 MiB a call
# carries), .whl-extra/ (the server and its client: fastapi, uvicorn, openai and what they need that
# the machine's image lacks) and .whl-liger/ (liger-kernel). Run from the repository root after
# `make setup`; the folders are git-ignored through .git/info/exclude. On the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl .whl-extra/*.whl .whl-liger/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
PIP=${PIP:-.venv/bin/python -m pip}
ENGINE="bitsandbytes peft transformers datasets huggingface_hub httpx2 httpcore2 hf-xet idna truststore dill multiprocess"
SERVER="fastapi uvicorn pydantic pydantic_core openai starlette annotated-types typing-inspection jiter sniffio
typer opentelemetry-api"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64"

pinned() {  # NAME==VERSION for each name, as installed in the venv
    for name in "$@"; do
        echo "$name==$($PIP show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
    done
}

download() {  # folder, names...
    local folder=$1; shift
    rm -rf "$folder"
    # shellcheck disable=SC2046,SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
        -d "$folder" $(pinned "$@")
}

for folder in .whl .whl-extra .whl-liger; do
    grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done
# shellcheck disable=SC2086
download .whl $ENGINE
# shellcheck disable=SC2086
download .whl-extra $SERVER
download .whl-liger liger_kernel
zip -q -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*' \
    'bitsandbytes/libbitsandbytes_cpu*' 'bitsandbytes/libbitsandbytes_xpu*' >/dev/null 2>&1 || true
du -ch .whl .whl-extra .whl-liger | tail -1
