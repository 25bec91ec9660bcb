# The quick start needs only Python >= 3.11 and make: `make run`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow lint format migrate-check lock clean bench profile

help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/tokenvend: pyproject.toml requirements-dev.lock clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps -e clients/python
	@touch $@

install: $(BIN)/tokenvend ## Create .venv from the lock file

run: install ## Serve on the embedded default (SQLite, in-process cache, dev IdM); PORT=8000
	$(BIN)/tokenvend serve --dev --port $(PORT)

test: install ## Run the whole test suite (PostgreSQL and Redis tests skip when they are absent, fail in CI)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install ## Only the slow tests
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

LINTED := app tests migrations bench clients/python

lint: install ## ruff (lint + format check) and mypy strict
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/mypy --strict clients/python/src

format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

migrate-check: install ## alembic upgrade head + drift check on TOKENVEND_DATABASE_URL
	$(BIN)/alembic upgrade head
	$(BIN)/alembic check

bench: install ## Benchmark against a bare FastAPI reference (bench/README.md); BENCH_ARGS=--quick
	@sh bench/ensure-wrk.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

profile: install ## Profile the cached vend (py-spy, else pyinstrument); BENCH_ARGS=...
	@sh bench/ensure-wrk.sh
	$(BIN)/python -m bench --profile $(BENCH_ARGS)

lock: ## Re-resolve the lock files from pyproject.toml
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml -o requirements.lock --python-version 3.11 -q
	$(BIN)/uv pip compile pyproject.toml --extra dev -o requirements-dev.lock --python-version 3.11 -q

clean: ## Remove the venv, caches and the dev state
	rm -rf $(VENV) .tokenvend .pytest_cache .mypy_cache .ruff_cache
