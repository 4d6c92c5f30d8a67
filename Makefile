# The two commands of the README: `make dev` and `make test`. Both install first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The TypeScript client: its npm dependencies come from the committed lock file.
TS := clients/typescript
TS_INSTALLED := $(TS)/node_modules/.installed
STUBS := clients/python/agentrun/v1 $(TS)/src/gen

.PHONY: dev test check stubs breaking bench bench-streams

# Two distributions: the client (clients/python) and the service (here), which depends on it.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e clients/python -e '.[dev]'
	touch $@

$(TS_INSTALLED): $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund
	touch $@

# The whole dev stack (Temporal, Redis or embedded Valkey, model, worker, server) and a live streaming run.
dev: $(INSTALLED)
	$(VENV)/bin/agentrun dev

# Tests against a real Temporal dev server, Redis (REDIS_URL, else embedded Valkey) and gRPC over sockets: the
# Python suite, then the TypeScript client's tests (Node's test runner; each file starts its own stack).
test: $(INSTALLED) $(TS_INSTALLED)
	$(PYTHON) -m pytest
	cd $(TS) && npm test

# Contract, generated stubs of both languages, lint and types.
check: $(INSTALLED) $(TS_INSTALLED)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code
	$(MAKE) --no-print-directory stubs
	@git diff --exit-code -- $(STUBS) || (echo "generated stubs are out of date: run make stubs and commit" && exit 1)
	@test -z "$$(git status --porcelain -- $(STUBS))" || (echo "untracked generated files: run make stubs and commit" && exit 1)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	cd $(TS) && npm run --silent typecheck

# Both languages' stubs from proto/: Python through grpc_tools, TypeScript through buf with the plugin from npm.
stubs: $(INSTALLED) $(TS_INSTALLED)
	$(PYTHON) clients/python/generate.py
	$(VENV)/bin/buf generate --template $(TS)/buf.gen.yaml

# The contract against the one last committed on main (see .ci/breaking).
breaking: $(INSTALLED)
	BUF=$(VENV)/bin/buf .ci/breaking

# Figures, not assertions: see each module's docstring. `make bench` is the cost of a token and of a run.
bench: $(INSTALLED)
	$(PYTHON) -m bench.speed

bench-streams: $(INSTALLED)
	$(PYTHON) -m bench.streams
