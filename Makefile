# `make demo` and `make test` work from a fresh clone: each creates .venv when missing and installs
# rlora into it with the exact versions CI tests (constraints.txt; pyproject.toml holds the ranges).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rlora demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or distributed"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
