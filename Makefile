# One-command entry points. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(if $(MEDISTILL_DATA),$(MEDISTILL_DATA),$(abspath ../shared/data/medmnist))

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[test,ray]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	MEDISTILL_DATA="$(DATA)" $(BIN)/medistill demo

test: install-test
	MEDISTILL_DATA="$(DATA)" $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
