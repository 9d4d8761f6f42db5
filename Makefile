# Two commands on a fresh machine:  make repro  (the pipeline)   make test  (ruff + pytest)
# Both create .venv from this project's own files when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first so pip never resolves the project's `torch>=` range to a multi-GB CUDA
# build on a machine without a GPU. Override TORCH_SPEC / TORCH_PIP_ARGS for another build, e.g.
# TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>" on a laptop where PyPI's default is CUDA.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test lint format ui venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

repro: venv
	$(BIN)/dvc repro

test: venv lint
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

clean-venv:
	rm -rf $(VENV)
