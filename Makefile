# qvq-local developer entry points.  Every target installs what it needs first, so each works on a
# fresh clone by itself:  make demo   |   make test
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
EXTRAS  ?= all,dev,parity

.PHONY: install test lint demo bench clean help

help:
	@echo "make install  - local virtualenv in $(VENV) with .[$(EXTRAS)] (llama-cpp-python builds from source once, ~6-11 min on 2 cores; with CUDA where nvcc is found)"
	@echo "make demo     - tiny synthetic model -> convert for this machine -> qvq ask on examples/chart.png"
	@echo "make test     - the test suite (unit, CLI, parity against transformers on CPU)"
	@echo "make bench    - speed and memory on this machine, against the raw libraries and the bandwidth bound"
	@echo "make lint     - ruff"

# llama.cpp's GPU backend for this machine: -DGGML_CUDA=on where an NVIDIA GPU and a CUDA toolkit (nvcc on
# PATH, or CUDA_HOME) are both here, llama.cpp's default elsewhere (Metal on macOS, CPU).  CMAKE_ARGS wins
# if set; QVQ_CUDA=1 / QVQ_CUDA=0 force CUDA on or off (qvq_local/build_flags.py).
ifeq ($(origin LLAMA_CMAKE_ARGS), undefined)
LLAMA_CMAKE_ARGS := $(shell $(PYTHON) qvq_local/build_flags.py)
endif

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# A GPU build must not come from pip's cache of a CPU wheel: build it first, uncached.  If it
	@# fails (an incomplete toolkit), say so and go on with the default build.
	if [ -n "$(LLAMA_CMAKE_ARGS)" ]; then \
		echo "building llama-cpp-python with CMAKE_ARGS=$(LLAMA_CMAKE_ARGS)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --no-cache-dir \
			"$$($(PYTHON) -c 'import sys; sys.path.insert(0, "qvq_local"); import build_flags; print(build_flags.LLAMA_CPP_PIN)')" \
		|| echo "warning: the llama-cpp-python build with $(LLAMA_CMAKE_ARGS) failed; installing the default (CPU) build. QVQ_CUDA=0 skips the attempt."; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 MLX_DISABLE_COMPILE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check qvq_local convert tests examples tools
	$(BIN)/ruff format --check qvq_local convert tests examples tools

demo: $(STAMP)
	QVQ=$(BIN)/qvq bash examples/demo.sh

bench: $(STAMP)
	$(BIN)/qvq bench --shape 2b --backend all --runs 3 --json bench-out/bench.json --chart bench-out/bench.png
	@# Off Apple Silicon MLX has no fast quantised kernels, so the 2b run skips it with a reason; the tiny
	@# shape then measures both backends side by side so every figure exists for each (qvq/raw ratios too).
	if [ "$$(uname -s)-$$(uname -m)" != "Darwin-arm64" ]; then \
		$(BIN)/qvq bench --shape tiny --backend all --runs 3 --json bench-out/bench-tiny.json --chart bench-out/bench-tiny.png; \
	fi

clean:
	rm -rf $(VENV) .demo bench-out .pytest_cache build *.egg-info
