"""The serving core shared by every front end: the standard-library HTTP server (`server.py`), the batching
uvicorn one (`oip.py`) and the gRPC one (`grpc_server.py`) are adapters that frame requests and
answers; what a request means and what it is answered is decided here, once (KServe's DataPlane shape).

- the model repository: served names, their one version ("1"), readiness (`model`, `model_ready`);
- server and model metadata (`server_metadata`, `metadata`);
- authorisation (`authorize`: a bearer token on everything but the health probes);
- routing of the REST paths (`route`: /v2..., /v2/models/{m}[/versions/{v}][/ready|/infer|/classify], the
  OpenAPI document, and `static` for GETs outside /v2: the in-browser page of runtime/webpage.py);
- request validation (`infer_input`, `image_input`, `top_k`) and answers (`infer_answer`, `classify_answer`);
- error mapping to a status, message and headers (`failure`), and one body encoding (`encode`);
- the access-log line (`log_access`, logger `edgexfer.access`).

Standard library + numpy only (the runtime install): the adapters bring their transports.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from edgexfer.runtime.errors import ImageError, ImageTooLarge, RuntimeInputError
from edgexfer.runtime.model import EdgeModel
from edgexfer.runtime.multipart import multipart_file
from edgexfer.runtime.openapi import OPEN_PATHS
from edgexfer.runtime.preprocess import ImageLimits
from edgexfer.runtime.protocol import (HeaderCache, HTTPError, InferHeader, checked_header, infer_response, log_safe,
                                       model_metadata, parse_infer)

log = logging.getLogger("edgexfer.runtime.server")
access_log = logging.getLogger("edgexfer.access")

VERSION = "1"  # every served model has this one version
DEFAULT_TOP_K = 5
PREFERRED_FILES = ("model.int8.onnx", "model.onnx", "model.fp16.onnx")
_MODEL_ROUTE = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                          r"(?P<rest>/ready|/infer|/classify)?$")
OPENAPI_PATHS = frozenset({"/v2/openapi.json", "/openapi.json"})
_GET_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/v2", *OPENAPI_PATHS})


def served_urls(models, host: str, port: int, grpc_port: int | None = None) -> str:
    """What `serve` prints at start: each model's REST URLs (and gRPC address), and the browser page's."""
    from edgexfer.runtime.webpage import web_dir

    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else \
        f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    lines = [f"serving {len(models)} model{'s' if len(models) != 1 else ''} on {base}"
             + (f" (listening on all addresses, {host})" if shown != host and not shown.startswith("[") else "")
             + (f" and gRPC {shown}:{grpc_port}" if grpc_port else "") + "; Ctrl-C stops"]
    for name, path in models.items():
        lines.append(f"  {name} ({Path(path).name}): POST {base}/v2/models/{name}/classify (an image), "
                     f"POST {base}/v2/models/{name}/infer, GET {base}/v2/models/{name}"
                     + (f"; gRPC {shown}:{grpc_port} model_name {name!r}" if grpc_port else ""))
    lines.append(f"  browser page: {base}/" if web_dir() else f"  browser page: not installed ({base}/ says how)")
    lines.append(f"  API description: {base}/v2/openapi.json")
    return "\n".join(lines)


class QueueFull(Exception):
    """A model's batch queue is full (503 with Retry-After)."""


def resolve_models(paths) -> dict[str, Path]:
    """Run folders (their INT8 file if present, else FP32) or ONNX files -> {name: path}."""
    out: dict[str, Path] = {}
    for p in map(Path, paths):
        if p.is_dir():
            f = next((p / n for n in PREFERRED_FILES if (p / n).is_file()), None)
            if f is None:
                raise FileNotFoundError(f"no model file ({', '.join(PREFERRED_FILES)}) in {p}")
            name = p.name
        else:
            f, name = p, p.name.split(".")[0]
        if name in out:
            raise RuntimeInputError(f"two models named {name!r}; rename one file")
        out[name] = f
    return out


@dataclass(frozen=True)
class Call:
    """A routed REST request: what it asks (`kind`) and of which model. Kinds: live, ready, server, openapi,
    static (a GET outside /v2: `body`, `content_type`), metadata, model_ready, infer, classify."""
    kind: str
    model: str = ""
    query: str = ""
    body: bytes = b""
    content_type: str = ""


class DataPlane:
    def __init__(self, models: dict[str, Path], threads: int | None = None, token: str | None = None,
                 access_log: bool = True, image_limits: ImageLimits = ImageLimits(), timeout_s: float = 30.0):
        # No spinning: the request threads need the cores that idle ONNX Runtime workers would busy-wait on
        # (with it, the batching server answered about a third fewer requests; benchmarks/RESULTS.md).
        self.paths = dict(models)
        self.models = {name: EdgeModel(path, threads=threads, spinning=False, max_image_pixels=image_limits.max_pixels,
                                       max_aspect_ratio=image_limits.max_aspect)
                       for name, path in models.items()}
        self.threads, self.image_limits = threads, image_limits
        self.token, self.access, self.timeout_s = token, access_log, timeout_s
        self._token_b = token.encode() if token else None
        self._openapi: bytes | None = None

    # -- the model repository ------------------------------------------------------------------------
    def model(self, name: str, version: str | None = None) -> EdgeModel:
        try:
            m = self.models[name]
        except KeyError:
            raise HTTPError(404, f"unknown model {name[:200]!r}; serving {sorted(self.models)}") from None
        if version not in (None, "", VERSION):
            raise HTTPError(404, f"model {name!r} has no version {log_safe(version)[:40]!r}; it has {VERSION!r}")
        return m

    def replica(self, name: str) -> EdgeModel:
        """Another session of a served model (a batcher's further instance)."""
        return EdgeModel(self.paths[name], threads=self.threads, spinning=False)

    def served(self, name: str | None) -> str:
        """`name` when it is a served model, else '' (log and metric labels: unknown names must not grow them)."""
        return name if name in self.models else ""

    def model_ready(self, name: str, version: str | None = None) -> dict:
        self.model(name, version)
        return {"name": name, "ready": True}

    def metadata(self, name: str, version: str | None = None) -> dict:
        return model_metadata(name, self.model(name, version))

    @staticmethod
    def server_metadata() -> dict:
        from edgexfer import __version__

        return {"name": "edgexfer", "version": __version__, "extensions": ["binary_tensor_data"]}

    def openapi(self) -> bytes:
        if self._openapi is None:
            from edgexfer import __version__
            from edgexfer.runtime.openapi import openapi_document

            self._openapi = json.dumps(openapi_document(self.models, version=__version__, token=bool(self.token),
                                                        timeout_s=self.timeout_s)).encode()
        return self._openapi

    # -- authorisation and routing -------------------------------------------------------------------
    def authorize(self, path: str, authorization: str | bytes | None) -> None:
        """401 (with WWW-Authenticate) unless no token is set, the path is a health probe, or the request
        carries `Authorization: Bearer TOKEN`."""
        if not self._token_b or path in OPEN_PATHS:
            return
        if authorization is not None:
            got = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
            scheme, _, cred = got.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), self._token_b):
                return
        raise HTTPError(401, "wrong bearer token" if authorization is not None else "bearer token required",
                        {"WWW-Authenticate": 'Bearer realm="edgexfer"' +
                                             (', error="invalid_token"' if authorization is not None else "")})

    def route(self, method: str, target: str) -> Call:
        """A REST request line's method and target (path?query) -> the Call, or HTTPError 404/405. A
        trailing slash is ignored; HEAD is GET."""
        path, _, query = target.partition("?")
        path = path.rstrip("/")
        method = "GET" if method == "HEAD" else method
        if method == "GET":
            if path in ("/v2/health/live", "/v2/health/ready"):
                return Call("live" if path.endswith("live") else "ready")
            if path == "/v2":
                return Call("server")
            if path in OPENAPI_PATHS:
                return Call("openapi")
            if not path.startswith("/v2"):
                page = self.static(path or "/")
                if page is not None:
                    return Call("static", body=page[0], content_type=page[1])
                if path in ("", "/index.html"):  # a person at the server's address: how to get the page
                    from edgexfer.runtime.webpage import PAGE_MISSING

                    raise HTTPError(404, PAGE_MISSING)
        if path in _GET_PATHS:
            raise HTTPError(405, f"no route {log_safe(method)[:20]} {path}; it answers GET")
        r = _MODEL_ROUTE.match(path)
        if not r:
            raise HTTPError(404, f"no route {log_safe(method)[:20]} {log_safe(path)[:200]}")
        name, rest = r["model"], r["rest"]
        self.model(name, r["version"])  # 404 (unknown model or version) before anything is read
        if method == "GET" and rest is None:
            return Call("metadata", name)
        if method == "GET" and rest == "/ready":
            return Call("model_ready", name)
        if method == "POST" and rest == "/infer":
            return Call("infer", name)
        if method == "POST" and rest == "/classify":
            return Call("classify", name, query)
        raise HTTPError(405 if rest else 404, f"no route {log_safe(method)[:20]} {log_safe(path)[:200]}")

    def static(self, path: str) -> tuple[bytes, str] | None:
        """GETs outside /v2: the in-browser page (runtime/webpage.py) for the first model, else None (404).
        Further static routes go here."""
        from edgexfer.runtime.webpage import static_file

        return static_file(path, next(iter(self.paths.values()), None))

    def simple(self, call: Call):
        """The answer to a call that needs no body: a JSON-able value, or (bytes, headers)."""
        if call.kind == "live":
            return {"live": True}
        if call.kind == "ready":
            return {"ready": True}
        if call.kind == "server":
            return self.server_metadata()
        if call.kind == "openapi":
            return self.openapi(), {"content-type": "application/json"}
        if call.kind == "static":
            return call.body, {"content-type": call.content_type}
        if call.kind == "metadata":
            return self.metadata(call.model)
        if call.kind == "model_ready":
            return self.model_ready(call.model)
        raise ValueError(call.kind)

    # -- requests and answers ------------------------------------------------------------------------
    def infer_input(self, name: str, body: bytes, header_len: str | None,
                    cache: HeaderCache | None = None) -> tuple[np.ndarray, InferHeader]:
        return parse_infer(body, header_len, self.model(name), cache)

    def infer_header(self, name: str, head: bytes, cache: HeaderCache | None = None) -> InferHeader:
        """A v2 infer header alone, checked (the gRPC front end's tensor bytes stay where they arrived)."""
        return checked_header(head, self.model(name), cache)

    def infer_answer(self, name: str, h: InferHeader, outs: dict[str, np.ndarray]) -> tuple[bytes, dict]:
        return infer_response(name, h, self.models[name], outs)

    @staticmethod
    def top_k(query: str) -> int:
        try:
            values = parse_qs(query, max_num_fields=20).get("top_k")
            top_k = int(values[-1]) if values else DEFAULT_TOP_K
        except ValueError:
            raise HTTPError(400, "top_k must be an integer") from None
        if top_k < 1:
            raise HTTPError(400, "top_k must be >= 1")
        return top_k

    def image_input(self, name: str, body: bytes, content_type: str = "") -> np.ndarray:
        """A classify body (the image bytes, or a multipart upload) -> the model's input; 413 over the pixel
        budget, 400 for anything else wrong. Blocking (decoding): adapters call it in a worker thread."""
        m = self.model(name)
        multipart = content_type[:19].lower() == "multipart/form-data"  # bounded work: runtime/multipart.py
        data = multipart_file(body, content_type) if multipart else body
        try:
            return m.preprocess(data)
        except ImageTooLarge as e:
            raise HTTPError(413, str(e)) from None
        except (ImageError, RuntimeInputError) as e:
            raise HTTPError(400, str(e)) from None

    def classify_answer(self, name: str, outs: dict[str, np.ndarray], top_k: int) -> dict:
        return {"model": name, "predictions": self.models[name].decode(outs, top_k=top_k)[0]}

    def decoder(self, workers: int | None = None) -> ThreadPoolExecutor:
        """A pool for image decoding: each decode may take the pixel limit in memory, and in a thread per
        connection the memory freed stays with that thread's malloc arena (many clients decoding large images
        at once then hold several times the peak RSS of a small pool)."""
        return ThreadPoolExecutor(workers or max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="edgexfer-decode")

    # -- errors, encoding, the access log ------------------------------------------------------------
    def failure(self, e: BaseException) -> tuple[int, str, dict]:
        """An exception raised while answering -> (status, message, headers), for every adapter."""
        if isinstance(e, HTTPError):
            return e.status, str(e), e.headers
        if isinstance(e, QueueFull):
            return 503, "queue full; retry later", {"Retry-After": "1"}
        if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
            return 504, f"no answer within {self.timeout_s:g} s", {}
        if isinstance(e, ImageTooLarge):
            return 413, str(e), {}
        if isinstance(e, (ImageError, RuntimeInputError)):
            return 400, str(e), {}
        status = getattr(e, "status_code", None)  # a framework's HTTP exception
        if isinstance(status, int) and 400 <= status < 500:
            return status, str(getattr(e, "detail", e)), dict(getattr(e, "headers", None) or {})
        log.error("internal error", exc_info=e)  # never let one request take the server down
        return 500, f"internal error: {type(e).__name__}", {}

    @staticmethod
    def encode(obj) -> tuple[bytes, dict]:
        """A JSON-able value, or (bytes, headers) already encoded -> (body, headers): one encoding for all."""
        if isinstance(obj, tuple):
            return obj
        return json.dumps(obj, allow_nan=False).encode(), {"content-type": "application/json"}

    def error_body(self, status: int, message: str, headers: dict | None = None) -> tuple[bytes, dict]:
        return json.dumps({"error": message}).encode(), {"content-type": "application/json", **(headers or {})}

    def log_access(self, client: str, method: str, path: str, status: int, seconds: float, model: str = "") -> None:
        if self.access:
            access_log.info('%s "%s %s" %d %.1fms model=%s', client, log_safe(method), log_safe(path), status,
                            seconds * 1e3, self.served(model) or "-")

    def model_of_path(self, path: str) -> str:
        """The served model a request path names, else '' (for log and metric labels)."""
        r = _MODEL_ROUTE.match(path.split("?")[0].rstrip("/"))
        return self.served(r["model"]) if r else ""
