# The two commands a newcomer needs:  make demo   (the main job)   make test   (the test suite).
# Both set themselves up: a virtual environment in .venv, the packages, the Debian data package.
# A developer's command after every edit:  make test-fast  (the fast tier: a tiny random backbone, in-process).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgexfer-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

INC    := .venv-inc/.edgexfer-inc-installed

.PHONY: demo test test-fast install data bench inc arm64 verify-arm64 node web browser clean help
help:
	@echo "make demo   - fine-tune, export, quantize, evaluate and benchmark the default -> runs/demo"
	@echo "make test   - run the test suite (all of it: the system tests too)"
	@echo "make test-fast - the fast tier only (no real weights, subprocesses, venvs, arm64, Node, browser): about a minute"
	@echo "make bench  - the benchmarks in benchmarks/ (see benchmarks/RESULTS.md)"
	@echo "make verify-arm64 - the demo's FP32 and INT8 files and an arm64 bundle under emulated arm64 (root)"

install: $(STAMP)
$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 7 ] || { \
		echo "make: $(VENV) needs about 7 GB free (PyTorch from PyPI is a CUDA build); $$free GB free here"; exit 1; }
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

# An arm64 Debian root filesystem run under qemu user-mode emulation, with the runtime's aarch64 wheels
# (requirements-runtime.txt, the Docker image's pins), cached in ~/.cache/edgexfer/arm64 (EDGEXFER_ARM64_CACHE):
# about 7 min the first time (debootstrap + pip under emulation), seconds after. Needs root; without it the
# arm64 tests skip and say why.
arm64: install
ifeq ($(shell id -u),0)
	@{ command -v debootstrap && [ -e /usr/bin/qemu-aarch64-static ]; } >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap; }
	$(PY) -m edgexfer.runtime.emulate setup
else
	@echo "make arm64: not root, so no emulated arm64 root filesystem; the arm64 tests will skip"
endif

# The full arm64 check (benchmarks/RESULTS.md): the demo's FP32 and INT8 files on 200 test images, then an
# arm64 bundle installed offline in the emulated root filesystem, classifying an image.
verify-arm64: arm64 data
	@[ -f runs/demo/model.int8.onnx ] || $(MAKE) demo
	$(VENV)/bin/edgexfer verify --arch arm64 runs/demo --samples 200
	EDGEXFER_ARM64_FULL=1 $(PY) -m pytest -q tests/test_arm64.py

demo: install data
	$(VENV)/bin/edgexfer run

# The embed-anywhere examples (README "Embed anywhere"): Node.js with onnxruntime-node (examples/node), and
# onnxruntime-web's WASM build vendored into examples/web/vendor (not committed; no CDN at run time), both
# from the npm registry at the versions in their package-lock.json; headless Chromium from Debian for the
# browser test (Playwright's Python package drives it: no browser download). Each step is skipped when done.
NODE_MODULES := examples/node/node_modules/.package-lock.json
WEB_VENDOR   := examples/web/vendor/ort.wasm.min.js
node: $(NODE_MODULES)
$(NODE_MODULES): examples/node/package-lock.json
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; }
	cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error
	touch $@

web: $(WEB_VENDOR)
$(WEB_VENDOR): examples/web/package-lock.json
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; }
	cd examples/web && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p examples/web/vendor
	cp examples/web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm \
	   examples/web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs examples/web/vendor/
	cp examples/web/node_modules/onnxruntime-web/dist/ort.wasm.min.js $@

browser: install web
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

test: install data inc arm64 node browser
	$(PY) -m pytest -q

# The fast tier (tests/conftest.py marks the rest `system`): every module's logic on a tiny random backbone, in
# this process; a test that hangs fails after 120 s.
test-fast: install data
	$(PY) -m pytest -q -m "not system" --timeout=120

bench: install data
	$(PY) -m pip install -q --disable-pip-version-check -e ".[openvino]"
	$(PY) benchmarks/bench_demo.py
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_transfer.py

clean:
	rm -rf $(VENV) .venv-inc runs build *.egg-info

# The OIP gRPC stubs (runtime/grpc_predict_v2_pb2*.py, checked in) from runtime/grpc_predict_v2.proto.
.PHONY: grpc-proto
grpc-proto:
	mkdir -p build/proto
	$(PY) -m grpc_tools.protoc -Iedgexfer/runtime=runtime --python_out=build/proto \
	    --grpc_python_out=build/proto edgexfer/runtime/grpc_predict_v2.proto
	sed 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' \
	    build/proto/edgexfer/runtime/grpc_predict_v2_pb2.py > runtime/grpc_predict_v2_pb2.py
	cp build/proto/edgexfer/runtime/grpc_predict_v2_pb2_grpc.py runtime/
