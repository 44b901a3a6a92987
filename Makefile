# moerun: two commands on a fresh machine.
#   make demo   install, then chat-free generation on the embedded demo model (no download)
#   make test   install, then ruff's lint and format check and the test suite (what CI runs: the fast tier)
#   make test-all  install, then both tiers (adds the slow sweeps: every alias, compile)
#   make serve  install, then the demo model behind an OpenAI/Ollama API on 127.0.0.1:8000
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so that pip takes the local CPU build instead of gigabytes of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: install demo chat serve lint test test-all test-gpu clean

# setup.py builds moerun's C kernels (moerun/kernels/cpu.c) in place: a changed source rebuilds.
$(VENV)/.installed: pyproject.toml setup.py moerun/kernels/cpu.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moerun generate demo "count from 7"

chat: install
	$(VENV)/bin/moerun chat demo

serve: install
	$(VENV)/bin/moerun serve demo

# ruff's lint and format check (configured in pyproject.toml) run before the tests, as CI does.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info moerun/kernels/_cpu*.so
