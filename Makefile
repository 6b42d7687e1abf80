# pocketgpt developer entry points. `make test` is the project's test command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-ray lint serve bench

venv: $(STAMP)

# Re-run the installer only when the dependency list or the installer changes.
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh

test: venv
	$(BIN)/python -m pytest -q

# The Ray Serve tests (marker `ray`, excluded from `make test`): installs the ray extra, starts a local Ray.
test-ray: venv
	$(BIN)/python -m pip install -q -e '.[ray]'
	$(BIN)/python -m pytest -q -m ray

lint: venv
	$(BIN)/ruff check .

# First run: trains the starter model into ./checkpoints (a few minutes on CPU), then serves it on
# http://127.0.0.1:8000. Later runs serve at once. Settings: POCKETGPT_* variables (see docker/entrypoint.sh).
serve: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" sh docker/entrypoint.sh

# Writes docs/benchmarks.md (+ JSON and plots). Needs the `bench` extra (transformers, matplotlib).
bench: venv
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench
