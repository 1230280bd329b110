# `make run` and `make test` each build .venv from scratch when it is missing, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check bench clean image-check

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tda_collector --mode=live

# With coverage of src/tda_collector (the collector's subprocesses included; pyproject.toml's
# [tool.coverage]); below 80% the run fails.
test: $(STAMP)
	$(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=80

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# mypy --strict over src/ (configured in pyproject.toml): checks the Protocols against their
# implementations, which no review can.
typecheck: $(STAMP)
	$(BIN)/mypy

# What CI runs: lint, the type checker, then the tests.
check: lint typecheck test

# Builds the image from the Dockerfile with buildah (no Docker engine needed) and smoke-tests it
# against the fake exchange; root and Debian's mirror needed. See README, "Docker".
image-check: $(STAMP)
	PYTHON=$(BIN)/python deploy/image-check

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .coverage .coverage.*
