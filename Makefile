# outreach: the two commands in README are `make up` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install up test lint typecheck bench bench-smoke services browser soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## Start the whole service on the embedded default (SQLite, in-process broker, provider sandbox).
up: install
	$(BIN)/outreach up

## Check PostgreSQL, Redis and RabbitMQ (starting local ones if possible) and Chromium (installing it if
## missing), then run the whole suite.
test: install services browser
	$(BIN)/pytest

services:
	scripts/test-services

## The browser tests drive Debian's Chromium; install it when it is missing.
browser:
	scripts/test-browser

lint: install
	$(BIN)/ruff check outreach workers tests bench
	$(BIN)/ruff format --check outreach workers tests bench
	$(BIN)/mypy outreach

## Full benchmarks (minutes); prints ratios against bare Dramatiq and writes bench/results/latest.json.
bench: install services
	$(BIN)/python -m bench

## Seconds-long run of every benchmark, as CI does.
bench-smoke: install services
	$(BIN)/python -m bench --smoke

## The fault tests at the issue's full sizes (10,000 enrollments, more kills, larger runs): tens of minutes.
soak: install services
	OUTREACH_FAULTS_ENROLLMENTS=10000 OUTREACH_FAULTS_KILLS=30 OUTREACH_FAULTS_REDIS_MESSAGES=2000 \
	OUTREACH_FAULTS_OUTAGE_MESSAGES=1000 OUTREACH_FAULTS_EXAMPLES=50 \
	$(BIN)/pytest tests/faults -q -s --timeout=3600

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache outreach.db*
