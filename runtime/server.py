"""A small HTTP server over `EdgeModel`, speaking the Open Inference Protocol (KServe v2): JSON tensors
and the binary tensor extension (`edgexfer.runtime.protocol`), one request at a time per thread, no
batching. Standard library only, so it runs on the board with the runtime install; `oip.py` is the
batching server for when starlette and uvicorn are installed. Endpoints:

    GET  /v2/health/live   /v2/health/ready   /v2   /v2/models/{m}   /v2/models/{m}/ready
    POST /v2/models/{m}/infer      {"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}
    POST /v2/models/{m}/classify   raw image bytes or a multipart upload -> {"model", "predictions": [...]}

    curl --data-binary @cat.jpg http://127.0.0.1:8000/v2/models/demo/classify
    curl -F image=@cat.jpg http://127.0.0.1:8000/v2/models/demo/classify

Bound to 127.0.0.1 unless told otherwise. With a token, every endpoint but /v2/health/* wants
`Authorization: Bearer TOKEN` (401 otherwise), as in `oip.py`.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


from edgexfer.runtime.errors import ImageError, RuntimeInputError
from edgexfer.runtime.model import EdgeModel
from edgexfer.runtime.openapi import OPEN_PATHS
from edgexfer.runtime.protocol import (HEADER_LEN, MAX_BODY, HTTPError, infer_response, model_metadata,
                                       multipart_file, parse_infer)

log = logging.getLogger(__name__)
access_log = logging.getLogger("edgexfer.access")

_ROUTE = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?(?P<rest>/ready|/infer|/classify)?$")
PREFERRED_FILES = ("model.int8.onnx", "model.onnx", "model.fp16.onnx")


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


class ModelServer:
    def __init__(self, models: dict[str, Path], threads: int | None = None, token: str | None = None,
                 access_log: bool = True):
        # No spinning: the HTTP threads need the cores that idle ONNX Runtime workers would busy-wait on
        # (with it, the batching server answered about a third fewer requests; benchmarks/RESULTS.md).
        self.models = {name: EdgeModel(path, threads=threads, spinning=False) for name, path in models.items()}
        self.token, self.access_log = token, access_log

    def model(self, name: str) -> EdgeModel:
        try:
            return self.models[name]
        except KeyError:
            raise HTTPError(404, f"unknown model {name!r}; serving {sorted(self.models)}") from None

    def metadata(self, name: str) -> dict:
        return model_metadata(name, self.model(name))

    def infer(self, name: str, body: bytes, header_len: str | None) -> tuple[bytes, dict]:
        """A v2 infer body (JSON, or the binary tensor extension) -> response bytes and headers."""
        m = self.model(name)
        x, h = parse_infer(body, header_len, m)
        return infer_response(name, h, m, m.run(x))

    def classify(self, name: str, data: bytes, top_k: int = 5) -> dict:
        m = self.model(name)
        try:
            return {"model": name, "predictions": m.predict(data, top_k=top_k)}
        except (ImageError, RuntimeInputError) as e:
            raise HTTPError(400, str(e)) from None

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass  # one access-log line per request comes from _dispatch, with its duration

            def log_error(self, fmt, *args):
                log.warning("%s %s", self.address_string(), fmt % args)

            def _send(self, status: int, obj) -> None:
                """`obj`: a JSON-able value, (value, extra headers), or (bytes, headers) already encoded."""
                data, headers = obj if isinstance(obj, tuple) else (obj, {})
                if not isinstance(data, bytes):
                    data, headers = json.dumps(data).encode(), {"content-type": "application/json", **headers}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                t0, status = time.perf_counter(), 200
                try:
                    self._authorize()
                    self._send(200, self._route(method))
                except HTTPError as e:
                    status = e.status
                    self._send(e.status, ({"error": str(e)}, e.headers))
                except Exception as e:  # never let one request take the server down
                    status = 500
                    log.exception("internal error")
                    self._send(500, {"error": f"internal error: {type(e).__name__}"})
                if server.access_log:
                    r = _ROUTE.match(self.path.split("?")[0].rstrip("/"))
                    model = r["model"] if r and r["model"] in server.models else "-"
                    access_log.info('%s "%s %s" %d %.1fms model=%s', self.client_address[0], method,
                                    self.path.split("?")[0], status, (time.perf_counter() - t0) * 1e3, model)

            def _authorize(self) -> None:
                if not server.token or self.path.split("?")[0].rstrip("/") in OPEN_PATHS:
                    return
                got = self.headers.get("Authorization")
                scheme, _, cred = (got or "").partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), server.token.encode()):
                    return
                self.close_connection = True  # the body stays unread
                raise HTTPError(401, "wrong bearer token" if got else "bearer token required",
                                {"WWW-Authenticate": 'Bearer realm="edgexfer"' + (', error="invalid_token"' if got else "")})

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    raise HTTPError(413, f"body of {n} bytes exceeds {MAX_BODY}")
                return self.rfile.read(n)

            def _route(self, method: str):
                path = self.path.split("?")[0].rstrip("/")
                if method == "GET" and path in ("/v2/health/live", "/v2/health/ready"):
                    return {"live": True} if path.endswith("live") else {"ready": True}
                if method == "GET" and path == "/v2":
                    from edgexfer import __version__
                    return {"name": "edgexfer", "version": __version__, "extensions": ["binary_tensor_data"]}
                r = _ROUTE.match(path)
                if not r:
                    raise HTTPError(404, f"no route {method} {path}")
                name, rest = r["model"], r["rest"]
                if method == "GET" and rest is None:
                    return server.metadata(name)
                if method == "GET" and rest == "/ready":
                    server.model(name)
                    return {"name": name, "ready": True}
                if method == "POST" and rest == "/infer":
                    return server.infer(name, self._body(), self.headers.get(HEADER_LEN))
                if method == "POST" and rest == "/classify":
                    data, ct = self._body(), self.headers.get("Content-Type", "")
                    return server.classify(name, multipart_file(data, ct) if ct.startswith("multipart/form-data") else data)
                raise HTTPError(405 if rest else 404, f"no route {method} {path}")

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        return Handler


def make_server(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
                threads: int | None = None, token: str | None = None, access_log: bool = True) -> ThreadingHTTPServer:
    ms = ModelServer(models, threads, token, access_log)
    httpd = ThreadingHTTPServer((host, port), ms.handler())
    httpd.daemon_threads = True
    return httpd


def serve(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          token: str | None = None, access_log: bool = True) -> None:
    httpd = make_server(models, host, port, threads, token, access_log)
    log.info("serving %s on http://%s:%d/v2", ", ".join(models), host, httpd.server_address[1])
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()



if __name__ == "__main__":  # python -m edgexfer.runtime.server MODEL... == edgexfer serve MODEL...
    from edgexfer.runtime.cli import main

    main(["serve", *__import__("sys").argv[1:]])
