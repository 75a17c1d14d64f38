# LQMF developer entry points. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LQMF := $(VENV)/bin/lqmf
STAMP := $(VENV)/.lqmf-installed
# CPU build of torch unless a GPU is present (or torch is already installed in the venv).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEMO := build/demo
# Flower without its pins (typer < 0.21 and others clash with lqmf's); its dependencies come from lqmf[federated].
FLWR_SPEC ?= flwr>=1.42,<1.43
# make test: two pytest workers, one per CI core (pytest-xdist; each worker builds the session fixtures once)
TEST_WORKERS ?= 2

.PHONY: setup test lint format demo bench-registry clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[serve,bench,dev]"
	$(PY) -m pip install -q --no-deps "$(FLWR_SPEC)"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks

test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: setup
	LQMF=$(LQMF) bash scripts/demo.sh $(DEMO)

bench-registry: setup
	$(PY) benchmarks/registry_bench.py

clean:
	rm -rf build .pytest_cache .ruff_cache

# The GPU check (tests/gpu/, skipped without CUDA): the fast path against stock PEFT on a 4-bit model.
gpu-check: setup
	PATH=$(VENV)/bin:$$PATH bash benchmarks/gpu_check.sh
