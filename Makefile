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
# Ports of the API (make run) and of the Dagster UI (make ui; make run prints links to it).
PORT ?= 8000
UI_PORT ?= 3000
export RECSYS_UI_URL ?= http://127.0.0.1:$(UI_PORT)
# Dagster knows the days from RECSYS_START_DATE on, and shows every one without data as missing. Unless the
# caller sets it, make run uses the first day it generates (or the first day of an earlier make run on the
# same RECSYS_HOME, whose partitions are still there) and records it in START_DATE_FILE; make ui reads it back.
START_DATE_FILE = $(RECSYS_HOME)/start_date
RUN_FIRST_DAY := $(shell date -u -d "$(RUN_DAYS) days ago" +%F)
RUN_LAST_DAY := $(shell date -u -d "1 day ago" +%F)
RECORDED_START_DATE := $(shell cat "$(START_DATE_FILE)" 2>/dev/null)
RUN_START_DATE = $(or $(RECSYS_START_DATE),$(firstword $(sort $(RECORDED_START_DATE) $(RUN_FIRST_DAY))))
UI_START_DATE = $(or $(RECSYS_START_DATE),$(RECORDED_START_DATE))
CHECK_PORT = $(VENV)/bin/python -m recsys_cli.ports --host 127.0.0.1

.PHONY: install run ui test lint fmt bench clean help up down compose-test extra-ca

help:
	@echo "make run    install, generate $(RUN_DAYS) days of sample events, materialize them, print a summary, serve the API on port $(PORT)"
	@echo "make test   install, lint, check the Dagster definitions, run the test suite"
	@echo "make ui     open the Dagster UI (webserver + daemon) on http://127.0.0.1:$(UI_PORT)"
	@echo "make bench  benchmarks next to bare-library baselines; figures go to docs/benchmarks.md"
	@echo "make up     build and start the docker-compose stack (Postgres, Dagster, two API replicas); make down stops it"
	@echo "make compose-test  build, start and exercise the compose stack end to end, then remove it"

install: $(STAMP)

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Byte-compiled at install: every later command starts without compiling its libraries (halves the start-up
# of a run where Python may not write bytecode caches).
$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras --python $(PYTHON) --quiet --compile-bytecode
	@touch $(STAMP)

run: install
	@$(CHECK_PORT) --command "make run" PORT=$(PORT)
	$(VENV)/bin/recsys generate --days $(RUN_DAYS) --events-per-day $(RUN_EVENTS_PER_DAY) --malformed-per-day $(RUN_MALFORMED_PER_DAY)
	@echo $(RUN_START_DATE) > "$(START_DATE_FILE)"
	RECSYS_START_DATE=$(RUN_START_DATE) $(VENV)/bin/recsys run --start $(RUN_FIRST_DAY) --end $(RUN_LAST_DAY)
	@echo
	@echo "Data is under $(RECSYS_HOME). In another terminal, open the Dagster UI with: make ui$(if $(filter-out 3000,$(UI_PORT)), UI_PORT=$(UI_PORT))  ($(RECSYS_UI_URL))"
	@echo "Now serving the published manifests; Ctrl-C stops the API."
	$(VENV)/bin/recsys serve --host 127.0.0.1 --port $(PORT)

ui: install
	@$(CHECK_PORT) --command "make ui" UI_PORT=$(UI_PORT)
	$(if $(UI_START_DATE),RECSYS_START_DATE=$(UI_START_DATE) )$(VENV)/bin/recsys ui --port $(UI_PORT)

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

# The docker-compose stack (docs/how-to/deploy.md). COMPOSE: docker-compose (1.x) or the docker compose plug-in.
COMPOSE ?= $(shell command -v docker-compose >/dev/null 2>&1 && echo docker-compose || echo docker compose)
# A CA bundle for the image builds' downloads behind a TLS-intercepting proxy (empty: none), copied into the
# build context; by default the one this shell's tools trust.
EXTRA_CA_FILE ?= $(SSL_CERT_FILE)
EXTRA_CA_COPY := deploy/extra-ca/extra-ca.pem

up: .env extra-ca
	$(COMPOSE) up --detach --build
	@echo "Dagster UI on http://127.0.0.1:$$(sed -n 's/^DAGSTER_WEBSERVER_PORT=//p' .env); API replicas on ports" \
		"$$(sed -n 's/^API_1_PORT=//p' .env) and $$(sed -n 's/^API_2_PORT=//p' .env); make down stops them"

down:
	$(COMPOSE) down

# The stack's settings, from the example with a password of its own.
.env:
	sed "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')/" .env.example > $@

extra-ca:
	@if [ -n "$(EXTRA_CA_FILE)" ] && ! cmp -s "$(EXTRA_CA_FILE)" $(EXTRA_CA_COPY); then cp "$(EXTRA_CA_FILE)" $(EXTRA_CA_COPY); fi

compose-test: extra-ca
	COMPOSE="$(COMPOSE)" $(PYTHON) deploy/compose_test.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache .mypy_cache
