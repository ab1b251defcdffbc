# The README's commands. Everything installs into ./.venv with pinned versions (uv, uv.lock).
SHELL := /bin/bash
PYTHON ?= python3
export RECSYS_HOME ?= $(CURDIR)/.recsys
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed
RUN_DAYS ?= 14
RUN_EVENTS_PER_DAY ?= 50000
RUN_MALFORMED_PER_DAY ?= 20

.PHONY: install run ui test lint fmt bench clean help

help:
	@echo "make run    install, generate $(RUN_DAYS) days of sample events, materialize them, print a summary, serve the API"
	@echo "make test   install, lint, check the Dagster definitions, run the test suite"
	@echo "make ui     open the Dagster UI (webserver + daemon) on http://127.0.0.1:3000"
	@echo "make bench  benchmarks next to bare-library baselines; figures go to docs/benchmarks.md"

install: $(STAMP)

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras --python $(PYTHON) --quiet
	@touch $(STAMP)

run: install
	$(VENV)/bin/recsys generate --days $(RUN_DAYS) --events-per-day $(RUN_EVENTS_PER_DAY) --malformed-per-day $(RUN_MALFORMED_PER_DAY)
	$(VENV)/bin/recsys run --start $$(date -u -d "$(RUN_DAYS) days ago" +%F) --end $$(date -u -d "1 day ago" +%F)
	@echo
	@echo "Data is under $(RECSYS_HOME). In another terminal, open the Dagster UI with: make ui  (http://127.0.0.1:3000)"
	@echo "Now serving the published manifests; Ctrl-C stops the API."
	$(VENV)/bin/recsys serve --host 127.0.0.1 --port 8000

ui: install
	$(VENV)/bin/recsys ui

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/sqlfluff lint dbt_like_sql
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(VENV)/bin/dg check defs
	$(VENV)/bin/pytest -q

bench: install
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache .mypy_cache
