# pocketgpt developer entry points. `make test` is the project's test command.
#   make serve         runtime dependencies only (no test tooling), trains the starter on first run, serves
#   make test / lint   the `dev` extra too (pytest, ruff, playwright, ...)
#   make test-ray      the Ray Serve tests (marker ray)
#   make test-docker   builds the image and runs it with Compose (needs a Docker engine; see tests/test_docker_e2e.py)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# One stamp per install mode of scripts/install.sh: `make serve` never waits for the dev extra, and a runtime
# install never passes for a dev one. Each is redone when the dependency list or the installer changes.
RUNTIME := $(VENV)/.installed-runtime
DEV     := $(VENV)/.installed-dev
BENCH   := $(VENV)/.installed-bench

.PHONY: venv dev test test-ray test-docker lint serve bench

venv: $(RUNTIME)
dev: $(DEV)

$(VENV)/.installed-%: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh $*

test: $(DEV)
	$(BIN)/python -m pytest -q

# The Ray Serve tests (marker `ray`, excluded from `make test`): installs the ray extra, starts a local Ray.
test-ray: $(DEV)
	$(BIN)/python -m pip install -q -e '.[ray]'
	$(BIN)/python -m pytest -q -m ray

# Its own step (it takes minutes): the image built by the legacy builder, then compose up / stop / restart.
test-docker: $(DEV)
	$(BIN)/python -m pytest -q -m docker tests/test_docker_e2e.py

lint: $(DEV)
	$(BIN)/ruff check .

# First run: trains the starter model into ./checkpoints (a few minutes on CPU), then serves it on
# http://127.0.0.1:8000. Later runs serve at once. Settings: POCKETGPT_* variables (see docker/entrypoint.sh).
serve: $(RUNTIME)
	PATH="$(CURDIR)/$(BIN):$$PATH" sh docker/entrypoint.sh

# Writes docs/benchmarks.md (+ JSON and plots), with the `bench` extra (transformers, matplotlib).
bench: $(BENCH)
	$(BIN)/python -m bench
