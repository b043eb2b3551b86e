# `make run` serves on 127.0.0.1:8000; `make test` runs the test suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/jwtauth serve --host 127.0.0.1 --port 8000

# pytest exits 5 when it collects no test; make fails on any non-zero exit, so that cannot pass.
# STRICT=1 (CI runs it) turns a skip for a missing service (PostgreSQL, Chromium) into a failure.
STRICT ?=
test: $(VENV)/.installed-dev services
	JWTAUTH_TEST_STRICT=$(STRICT) $(BIN)/python -m pytest

# Services the tests start themselves: PostgreSQL (a cluster of their own: initdb and pg_ctl in a temp dir, on a
# free port) and Debian's chromium (driven by Playwright at /usr/bin/chromium; `playwright install`, a browser
# download, is never run). Missing ones are installed with apt-get when make runs as root; elsewhere, or when
# apt-get fails, their tests are skipped with one line saying why (with STRICT=1, make stops here instead).
.PHONY: services
services:
	@missing=""; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=" postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing) \
				|| { echo "apt-get could not install$$missing: their tests will be skipped"; [ -z "$(STRICT)" ]; }; \
		else echo "missing:$$missing, and make is not root: their tests will be skipped"; [ -z "$(STRICT)" ]; fi; \
	fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check jwtauth tests scripts
	$(BIN)/ruff check jwtauth tests scripts
	$(BIN)/mypy jwtauth tests scripts

format: $(VENV)/.installed-dev
	$(BIN)/ruff format jwtauth tests scripts
	$(BIN)/ruff check --fix jwtauth tests scripts

# Throughput and latency of a real `jwtauth serve` next to the limits of its cryptography, with wrk
# (installed from the system packages when missing). A few minutes; prints a Markdown table and writes
# results/. Quick smoke test: make bench BENCH_SECONDS=3 BENCH_ARGS="--workers 1 --users 8"
# Against an earlier commit, served beside this checkout and measured in the same rounds, which endpoints are
# slower beyond the noise (exit status 1 if any): make bench BENCH_BEFORE=<commit>
BENCH_SECONDS ?= 10
BENCH_ARGS ?=
BENCH_BEFORE ?=
.PHONY: bench
bench: $(VENV)/.installed services
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python scripts/bench.py --seconds $(BENCH_SECONDS) $(if $(BENCH_BEFORE),--before $(BENCH_BEFORE)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The downstream example is held to the package's standard (mypy checks it through the tests importing it).
.PHONY: lint-examples
lint: lint-examples
lint-examples: $(VENV)/.installed-dev
	$(BIN)/ruff format --check examples
	$(BIN)/ruff check examples

# Node's jose for tests/test_interop.py, installed from tests/node/package-lock.json. Where node is missing
# that test reports a skip; the stamp is written only after an install, so installing node later counts.
NODE_STAMP := tests/node/node_modules/.installed
test: $(NODE_STAMP)
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v node >/dev/null && command -v npm >/dev/null; then \
		cd tests/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "node or npm not found: the Node jose interoperability test will be skipped"; fi
