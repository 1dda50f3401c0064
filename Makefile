# outreach: the two commands in README are `make up` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install up test lint typecheck bench bench-smoke services browser faketime time-travel soak clean

#: The instants the time-travel runs move the machine's clock to (UTC): China's National Day holidays, New York's
#: spring-forward night, a leap day's last minute and the last half-minute of a year.
TIME_TRAVEL_AT := "2026-10-02 03:00:00" "2027-03-14 06:59:00" "2028-02-29 23:59:00" "2026-12-31 23:59:30"
#: The one CI moves to after the whole suite has passed at the real date.
CI_TIME_TRAVEL_AT := "2026-10-02 03:00:00"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## Start the whole service on the embedded default (SQLite, in-process broker, provider sandbox).
up: install
	$(BIN)/outreach up

## Check PostgreSQL, Redis and RabbitMQ (starting local ones if possible), Chromium and faketime (installing them
## if missing), then run the whole suite at the real date, then the clock-sensitive tests with the clock moved.
test: install services browser faketime
	$(BIN)/pytest
	scripts/time-travel $(CI_TIME_TRAVEL_AT) -m clock -q

## The whole suite at each of the four TIME_TRAVEL_AT instants (TIME_TRAVEL_ARGS="-m clock" narrows it).
time-travel: install services browser faketime
	@for at in $(TIME_TRAVEL_AT); do scripts/time-travel "$$at" -q $(TIME_TRAVEL_ARGS) || exit 1; done

services:
	scripts/test-services

## The browser tests drive Debian's Chromium; install it when it is missing.
browser:
	scripts/test-browser

## The time-travel runs need Debian's faketime; install it when it is missing.
faketime: install
	scripts/test-faketime

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
