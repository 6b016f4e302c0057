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
	@echo "make install  - local virtualenv in $(VENV) with .[$(EXTRAS)] (llama-cpp-python builds from source once, ~6 min on 2 cores)"
	@echo "make demo     - tiny synthetic model -> convert for this machine -> qvq ask on examples/chart.png"
	@echo "make test     - the test suite (unit, CLI, parity against transformers on CPU)"
	@echo "make bench    - speed and memory on this machine, against the raw libraries and the bandwidth bound"
	@echo "make lint     - ruff"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 MLX_DISABLE_COMPILE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check qvq_local convert tests examples
	$(BIN)/ruff format --check qvq_local convert tests examples

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
