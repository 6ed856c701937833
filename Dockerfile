# Runtime-only image: numpy + onnxruntime + Pillow, serving a model over HTTP (Open Inference Protocol v2).
#   docker build -t edgexfer-runtime .
#   docker run -p 8000:8000 -v $PWD/runs/demo:/models/demo:ro edgexfer-runtime
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgexfer ./edgexfer
COPY exporters ./exporters
COPY runtime ./runtime
# The runtime and its HTTP server (starlette + uvicorn): no torch, no onnx, no training toolchain.
RUN pip install --disable-pip-version-check ".[serve]" && rm -rf /src

RUN useradd --create-home --uid 10001 edge
USER edge
WORKDIR /home/edge
EXPOSE 8000
# The server binds to 127.0.0.1 unless told otherwise; inside a container it must listen on all interfaces.
ENV EDGEXFER_HOST=0.0.0.0 EDGEXFER_PORT=8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "edgexfer.runtime.server"]
CMD ["/models/demo"]
