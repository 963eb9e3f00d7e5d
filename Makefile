# One-command entry points. Each creates .venv when missing and shows pip's progress.
# CPU=1 installs the CPU-only torch build from PyTorch's CPU wheel index first (no CUDA wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(if $(MEDISTILL_DATA),$(MEDISTILL_DATA),$(abspath ../shared/data/medmnist))
CPU ?= 0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
CPU_ONLY := $(filter 1,$(CPU))
INSTALLED := $(VENV)/.installed$(if $(CPU_ONLY),-cpu)

.PHONY: demo lint test test-fast install install-cpu install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(INSTALLED): $(BIN)/python pyproject.toml
	$(if $(CPU_ONLY),$(BIN)/pip install torch torchvision --index-url $(TORCH_CPU_INDEX))
	$(BIN)/pip install -e .
	@$(BIN)/medistill --version
	touch $@

$(VENV)/.installed-test: $(INSTALLED)
	$(BIN)/pip install -e ".[test,ray]"
	touch $@

install: $(INSTALLED)

install-cpu:
	$(MAKE) install CPU=1

install-test: $(VENV)/.installed-test

demo: $(INSTALLED)
	MEDISTILL_DATA="$(DATA)" $(BIN)/medistill demo

# ruff (lint, then formatting) and mypy with the configuration in pyproject.toml; .ci/run runs this before the tests
lint: install-test
	$(BIN)/ruff check src
	$(BIN)/ruff format --check src
	$(BIN)/mypy

test: install-test
	MEDISTILL_DATA="$(DATA)" $(BIN)/python -m pytest -q

test-fast: install-test
	MEDISTILL_DATA="$(DATA)" $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
