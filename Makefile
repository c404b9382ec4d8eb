# Two commands do everything: `make demo` (the main job) and `make test` (the suite).
# `setup` is idempotent: the environment is built once per pin list, outside the clone, and
# `.venv` links to it, so later runs and fresh clones on the same machine start at once.
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV_CACHE ?= $(HOME)/.cache/worldmodel/venvs
PIN_HASH := $(shell cat requirements.txt | sha256sum | cut -c1-16)
VENV_DIR := $(VENV_CACHE)/py311-$(PIN_HASH)
PY := .venv/bin/python
EXP ?= demo
ARGS ?=

.PHONY: setup demo play test test-fast gpu-check lint format bench sweep clean

setup:
	@set -euo pipefail; \
	if [ ! -f "$(VENV_DIR)/.complete" ]; then \
	  echo "setup: building the environment for pin list $(PIN_HASH) in $(VENV_DIR)"; \
	  rm -rf "$(VENV_DIR)"; mkdir -p "$(VENV_CACHE)"; \
	  $(PYTHON_BIN) -m venv "$(VENV_DIR)"; \
	  "$(VENV_DIR)/bin/pip" install --quiet -r requirements.txt; \
	  touch "$(VENV_DIR)/.complete"; \
	fi; \
	ln -sfn "$(VENV_DIR)" .venv; \
	if ! $(PY) -c "import worldmodel, sys; sys.exit(0 if worldmodel.__file__.startswith('$(CURDIR)/') else 1)" 2>/dev/null; then \
	  $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .; \
	fi

demo: setup
	$(PY) run.py experiment=$(EXP) $(ARGS)

# The shipped demo world in the browser: prints the page's URL (http://127.0.0.1:8765/).
# 2 MaskGIT steps per frame keep the page at >= 15 frames/s on 2 busy cores (README, Play).
play: setup
	$(PY) run.py task=play play.ui=web play.steps=2 logger=none \
	  world=experiments/demo/world.safetensors $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

# Trains, evaluates and plays every model on cuda, nccl DDP and torch.compile; skips without a GPU.
gpu-check: setup
	$(PY) -m pytest -m gpu -rs tests/test_gpu.py $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) -m worldmodel.bench $(ARGS)

sweep: setup
	$(PY) run.py -m experiment=$(EXP) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
