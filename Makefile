# `make test` and `make demo` set everything up from a fresh clone, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: this machine holds its CPU build on disk; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
READY := $(VENV)/.cast-ready

.PHONY: setup test lint bench demo clean

setup: $(READY)

$(READY): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	touch $@

test: $(READY)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(READY)
	$(PY) -m ruff check .

bench: $(READY)
	$(PY) bench/bench_masked_gram.py

demo: $(READY)
	@echo "make demo arrives with the stylisation tool (issue 3)"

clean:
	rm -rf build *.egg-info cast/*.so $(VENV)
