# Two commands do all set-up on a fresh machine (Python 3.11+ and the package registries):
#   make sandbox   install, then run operator + emulated cluster + emulated Chainguard
#   make test      install, then run the whole test suite
# `make lint` runs ruff check, ruff format --check and mypy --strict on the package.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: sandbox serve test lint crd bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml testkit/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[lint]' -e ./testkit
	touch $@

sandbox: $(VENV)/.installed
	$(BIN)/cgid-sandbox

serve: $(VENV)/.installed
	$(BIN)/cgid-sandbox --serve --workdir sandbox-state

test: $(VENV)/.installed
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check operator testkit tests bench
	$(BIN)/ruff format --check operator testkit tests bench
	$(BIN)/mypy

crd: $(VENV)/.installed
	$(BIN)/python -m chainguard_identity_operator.crd > crds/chainguardidentity.yaml

bench: $(VENV)/.installed
	$(BIN)/python bench/convergence.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
