# `make test` and `make demo` set everything up from a fresh clone, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: this machine holds its CPU build on disk; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
READY := $(VENV)/.cast-ready

.PHONY: setup test lint bench demo clean gpu-check

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
	$(PY) bench/bench_stylize.py

# On a lent GPU machine, with its own python3 (no venv, no network): build, op benchmark, probe
# of the CUDA kernels, GPU tests, a stylisation step; every log into $(OUT). QUICK=1: a shorter
# second call (bench/gpu_check.sh says what it leaves out).
OUT ?= gpu-check-out
gpu-check:
	OUT=$(OUT) bench/gpu_check.sh

# Smaller and shorter than the defaults (512 px, 200 steps per scale), to stay under 10 minutes
# on 2 CPU cores; the weights, pooling and kernels are the defaults.
DEMO := --size 384 --scales 2 --iters 40 --quiet
SWAP := --size 256 --scales 2 --iters 40 --quiet

demo: $(READY)
	mkdir -p out
	$(PY) -m cast stylize examples/tubingen.jpg examples/starry_night.jpg \
		-o out/tubingen_starry_night.jpg $(DEMO)
	$(PY) -m cast mask examples/tubingen.jpg examples/tubingen_trimap.png -o out/tubingen_sky.png
	$(PY) -m cast stylize examples/tubingen.jpg examples/starry_night.jpg examples/the_scream.jpg \
		--soft-mask out/tubingen_sky.png -o out/tubingen_sky_starry_town_scream.jpg $(DEMO)
	$(PY) -m cast mask examples/hoovertowernight.jpg examples/hoovertowernight_trimap.png \
		-o out/hoovertowernight_sky.png
	$(PY) -m cast swap examples/tubingen.jpg examples/hoovertowernight.jpg \
		--mask-a out/tubingen_sky.png --mask-b out/hoovertowernight_sky.png \
		-o out/tubingen_with_hoover_sky.jpg out/hoovertowernight_with_tubingen_sky.jpg $(SWAP)
	@echo "wrote into out/: tubingen_starry_night.jpg, tubingen_sky.png," \
		"tubingen_sky_starry_town_scream.jpg, hoovertowernight_sky.png," \
		"tubingen_with_hoover_sky.jpg, hoovertowernight_with_tubingen_sky.jpg"

clean:
	rm -rf build *.egg-info cast/*.so $(VENV)
