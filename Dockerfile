# Runtime-only image for linux/amd64 and linux/arm64: numpy + onnxruntime + Pillow (+ uvicorn,
# grpcio), serving models over the Open Inference Protocol v2: REST on 8000, gRPC on 8001. No torch, no
# onnx, no training toolchain.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t edgexfer-runtime:0.1.0 .   # add --push for a registry
#   docker run -p 8000:8000 -p 8001:8001 -v $PWD/runs/demo:/models/demo:ro edgexfer-runtime:0.1.0
#
# The pins are requirements-runtime.txt: the emulated arm64 check (`make arm64`, `edgexfer verify
# --arch arm64`) installs the very same file into Debian bookworm with CPython 3.11, and
# tests/test_arm64.py holds the two together.
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# The edgexfer wheel is pure Python: build it once, on the build machine's own platform.
FROM --platform=$BUILDPLATFORM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgexfer ./edgexfer
COPY exporters ./exporters
COPY runtime ./runtime
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps -w /wheels .

# The image itself, per target platform (TARGETPLATFORM is set by buildx: linux/amd64 or linux/arm64).
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
ARG TARGETPLATFORM
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements-runtime.txt /tmp/requirements-runtime.txt
COPY --from=wheel /wheels /tmp/wheels
# Binary wheels only (manylinux x86_64 or aarch64, as the platform asks), then edgexfer with no further deps.
RUN cd /tmp && pip install --only-binary=:all: -r requirements-runtime.txt \
    && pip install --no-deps /tmp/wheels/edgexfer-*.whl \
    && rm -rf /tmp/wheels /tmp/requirements-runtime.txt \
    && python -c "import platform, onnxruntime; print('${TARGETPLATFORM:-native}', platform.machine(), onnxruntime.__version__)"

RUN useradd --create-home --uid 10001 edge
USER edge
WORKDIR /home/edge
EXPOSE 8000 8001
# The server binds to 127.0.0.1 unless told otherwise; inside a container it must listen on all interfaces.
# REST on EDGEXFER_PORT, the OIP gRPC API on EDGEXFER_GRPC_PORT (empty: none).
ENV EDGEXFER_HOST=0.0.0.0 EDGEXFER_PORT=8000 EDGEXFER_GRPC_PORT=8001
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "edgexfer.runtime", "serve"]
CMD ["/models/demo"]
