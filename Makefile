# The two commands a newcomer needs:  make demo   (the main job)   make test   (the test suite).
# Both set themselves up: a virtual environment in .venv, the packages, the Debian data package.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgexfer-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

INC    := .venv-inc/.edgexfer-inc-installed

.PHONY: demo test install data bench inc clean help
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

# Intel Neural Compressor's ONNX half pins numpy<2: it gets an interpreter of its own, which the
# accuracy guard runs (edgexfer.exporters.inc); the main environment keeps numpy 2.
inc: $(INC)
$(INC):
	$(PYTHON) -m venv .venv-inc
	.venv-inc/bin/pip install -q --disable-pip-version-check "onnx-neural-compressor>=1.0" prettytable scipy
	touch $@

demo: install data
	$(VENV)/bin/edgexfer run

test: install data inc
	$(PY) -m pytest -q

bench: install data
	$(PY) -m pip install -q --disable-pip-version-check -e ".[openvino]"
	$(PY) benchmarks/bench_demo.py
	$(PY) benchmarks/bench_runtime.py

clean:
	rm -rf $(VENV) .venv-inc runs build *.egg-info
