# The two commands a newcomer needs:  make demo   (the main job)   make test   (the test suite).
# Both set themselves up: a virtual environment in .venv, the packages, the Debian data package.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgexfer-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install data bench clean help
help:
	@echo "make demo   - fine-tune, export, quantize, evaluate and benchmark the default -> runs/demo"
	@echo "make test   - run the test suite"
	@echo "make bench  - the benchmarks in benchmarks/ (see benchmarks/RESULTS.md)"

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[train,dev]"
	touch $@

data: $(FMNIST)
$(FMNIST):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: install data
	$(VENV)/bin/edgexfer run

test: install data
	$(PY) -m pytest -q

bench: install data
	$(PY) -m pip install -q --disable-pip-version-check -e ".[openvino]"
	$(PY) benchmarks/bench_demo.py
	$(PY) benchmarks/bench_runtime.py

clean:
	rm -rf $(VENV) runs build *.egg-info
