# Two commands do everything: `make demo` (the main job) and `make test` (the suite).
# `setup` is idempotent. The heavy packages of the lock (requirements.txt) are installed once per
# machine and lock, outside the clone, with no worldmodel in them; `.venv` is this clone's own
# small venv that sees them through a .pth file and holds this clone's editable install, so each
# clone runs its own code and later runs and fresh clones start in seconds.
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV_CACHE ?= $(HOME)/.cache/worldmodel/venvs
PIN_HASH := $(shell cat requirements.txt | sha256sum | cut -c1-16)
VENV_DIR := $(VENV_CACHE)/py311-$(PIN_HASH)
PY := .venv/bin/python
NB ?= notebooks/ablation.ipynb
EXP ?= demo
ARGS ?=

.PHONY: setup demo play test test-fast gpu-check lint format bench sweep notebook clean

# Setups on one machine take turns (flock), so two clones never build one environment at once.
setup:
	@set -euo pipefail; \
	mkdir -p "$(VENV_CACHE)"; \
	exec 9>"$(VENV_DIR).lock"; flock 9; \
	if [ ! -f "$(VENV_DIR)/.complete" ]; then \
	  echo "setup: installing the lock $(PIN_HASH) into $(VENV_DIR) (once per machine)"; \
	  rm -rf "$(VENV_DIR)"; \
	  $(PYTHON_BIN) -m venv "$(VENV_DIR)"; \
	  "$(VENV_DIR)/bin/pip" install --quiet -r requirements.txt; \
	  if "$(VENV_DIR)/bin/python" -c "import worldmodel" 2>/dev/null; then \
	    echo "setup: $(VENV_DIR) must not contain worldmodel" >&2; exit 1; fi; \
	  touch "$(VENV_DIR)/.complete"; \
	fi; \
	stamp="$(VENV_DIR) $(CURDIR)"; \
	if [ -L .venv ] || [ "$$(cat .venv/worldmodel-env 2>/dev/null)" != "$$stamp" ]; then \
	  echo "setup: making .venv over $(VENV_DIR)"; \
	  rm -rf .venv; \
	  "$(VENV_DIR)/bin/python" -m venv --without-pip .venv; \
	  shared=$$("$(VENV_DIR)/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))"); \
	  own=$$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))"); \
	  echo "import site; site.addsitedir('$$shared')" > "$$own/worldmodel_shared_env.pth"; \
	  for f in "$(VENV_DIR)"/bin/*; do \
	    name=$${f##*/}; \
	    case "$$name" in python*|activate*|Activate.ps1) continue;; esac; \
	    if head -n1 "$$f" | grep -q "^#!$(VENV_DIR)/bin/python"; then \
	      { echo "#!$(CURDIR)/.venv/bin/python"; tail -n +2 "$$f"; } > ".venv/bin/$$name"; \
	      chmod +x ".venv/bin/$$name"; \
	    else ln -s "$$f" ".venv/bin/$$name"; fi; \
	  done; \
	  for d in share/jupyter etc/jupyter; do \
	    if [ -d "$(VENV_DIR)/$$d" ]; then mkdir -p ".venv/$${d%/*}"; ln -s "$(VENV_DIR)/$$d" ".venv/$$d"; fi; \
	  done; \
	  echo "$$stamp" > .venv/worldmodel-env; \
	fi; \
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

# JupyterLab on the ablation notebook (NB=path for another), with this clone's kernel; jupyterlab
# comes with the lock. On a remote machine: make notebook ARGS="--no-browser --port 8888".
# As root (containers) JupyterLab refuses to start without --allow-root.
notebook: setup
	$(PY) -m jupyterlab $(NB) $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
