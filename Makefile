# Two commands for a newcomer: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch first, pinned to the CPU build on disk, so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	bash examples/demo.sh

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

# ruff: pyflakes, pycodestyle (100 columns), import order, unused noqa markers (pyproject.toml)
lint: install
	$(VENV)/bin/ruff check src tests bench examples backends

bench: install
	$(PY) bench/prep.py

clean:
	rm -rf $(VENV) demo build .pytest_cache

# The GPU check on a GPU machine's own python3 (no .venv, no network; docs/benchmarks.md).
# ARGS passes options, e.g. `make gpu-check ARGS=--cpu` for the dry run here.
.PHONY: gpu-check
gpu-check:
	bash bench/gpu_check.sh $(ARGS)
