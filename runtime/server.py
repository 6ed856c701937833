"""A small HTTP server over `EdgeModel`, speaking the Open Inference Protocol (KServe v2): JSON tensors
and the binary tensor extension (`edgexfer.runtime.protocol`), one request at a time per thread, no
batching. Standard library only, so it runs on the board with the runtime install; `oip.py` is the
batching server for when starlette and uvicorn are installed. Endpoints:

    GET  /v2/health/live   /v2/health/ready   /v2   /v2/models/{m}   /v2/models/{m}/ready
    POST /v2/models/{m}/infer      {"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}
    POST /v2/models/{m}/classify   raw image bytes or a multipart upload -> {"model", "predictions": [...]}

    curl --data-binary @cat.jpg http://127.0.0.1:8000/v2/models/demo/classify
    curl -F image=@cat.jpg http://127.0.0.1:8000/v2/models/demo/classify?top_k=3

Bound to 127.0.0.1 unless told otherwise. With a token, every endpoint but /v2/health/* wants
`Authorization: Bearer TOKEN` (401 otherwise), as in `oip.py`.

Request handling, as in the batching server: a body is framed by a valid Content-Length or chunked
Transfer-Encoding (anything else, another transfer coding included: 400), at most MAX_BODY bytes (413),
and bodies held at once are capped server-wide (`BodyBudget`: 503); a body left unread by an error is
read and dropped (up to MAX_BODY) or the connection closed, so it is never taken for a request; every
error is a one-line JSON `{"error": ...}`, never a traceback; images are bounded by the model's limits
before decoding (413, 400); idle connections time out after `IDLE_TIMEOUT_S`; at most `MAX_CONNECTIONS`
connections are served at once (503 past them); `serve` drains on SIGTERM: stops accepting, answers
every request in flight, then returns.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from edgexfer.runtime.errors import ImageError, ImageTooLarge, RuntimeInputError
from edgexfer.runtime.model import EdgeModel
from edgexfer.runtime.openapi import OPEN_PATHS
from edgexfer.runtime.preprocess import ImageLimits
from edgexfer.runtime.protocol import (HEADER_LEN, MAX_BODIES_IN_FLIGHT, MAX_BODY, BodyBudget, HTTPError,
                                       LockedBodyBudget, infer_response, log_safe, model_metadata, multipart_file,
                                       parse_infer)

log = logging.getLogger(__name__)
access_log = logging.getLogger("edgexfer.access")

_ROUTE = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?(?P<rest>/ready|/infer|/classify)?$")
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,8}$")
PREFERRED_FILES = ("model.int8.onnx", "model.onnx", "model.fp16.onnx")
IDLE_TIMEOUT_S = 30.0      # a connection waiting this long for a read or a write is closed
MAX_CONNECTIONS = 256      # connections (threads) served at once; past them 503 and close
DRAIN_TIMEOUT_S = 30.0     # on SIGTERM, how long requests in flight may take to finish
DRAIN_CHUNK = 64 * 1024
LINGER_S = 10.0            # closing with a body unread: how long what the client still sends is read and dropped


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
                 access_log: bool = True, image_limits: ImageLimits = ImageLimits(), decode_workers: int | None = None):
        # No spinning: the HTTP threads need the cores that idle ONNX Runtime workers would busy-wait on
        # (with it, the batching server answered about a third fewer requests; benchmarks/RESULTS.md).
        self.models = {name: EdgeModel(path, threads=threads, spinning=False, max_image_pixels=image_limits.max_pixels,
                                       max_aspect_ratio=image_limits.max_aspect)
                       for name, path in models.items()}
        self.token, self.access_log = token, access_log
        # Images are decoded in a few threads of their own, as in the batching server: each decode may take the
        # pixel limit in memory, and in a thread per connection the memory freed stays with that thread's malloc
        # arena (16 clients decoding 36 MB images at once: 500 MB of peak RSS, against 70 MB here).
        self.decoder = ThreadPoolExecutor(decode_workers or max(1, min(4, os.cpu_count() or 1)),
                                          thread_name_prefix="edgexfer-decode")

    def model(self, name: str) -> EdgeModel:
        try:
            return self.models[name]
        except KeyError:
            raise HTTPError(404, f"unknown model {name[:200]!r}; serving {sorted(self.models)}") from None

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
            x = self.decoder.submit(m.preprocess, data).result()
            return {"model": name, "predictions": m.decode(m.run(x), top_k=top_k)[0]}
        except ImageTooLarge as e:
            raise HTTPError(413, str(e)) from None
        except (ImageError, RuntimeInputError) as e:
            raise HTTPError(400, str(e)) from None

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = IDLE_TIMEOUT_S

            def log_message(self, fmt, *args):
                pass  # one access-log line per request comes from _dispatch, with its duration

            def log_error(self, fmt, *args):
                log.warning("%s %s", self.address_string(), log_safe(fmt % args))

            # -- framing -------------------------------------------------------------------------
            def handle_one_request(self):
                """The standard library's, with the request counted in flight from its first line to its
                answer (SIGTERM waits for it), and an unknown method answered 405 in JSON."""
                self._unread, self._charged, self._length, self._authorized = False, 0, None, False
                try:
                    self.raw_requestline = self.rfile.readline(65537)
                except (TimeoutError, OSError):  # idle past IDLE_TIMEOUT_S, or gone, or drained
                    self.close_connection = True
                    return
                if not self.raw_requestline:
                    self.close_connection = True
                    return
                self.server.enter(self)
                try:
                    if len(self.raw_requestline) > 65536:
                        self.requestline = self.request_version = self.command = ""
                        self.send_error(414)
                        return
                    if not self.parse_request():
                        return
                    self._frame()
                    self._dispatch(self.command)
                    self.wfile.flush()
                except TimeoutError as e:
                    self.log_error("request timed out: %r", e)
                    self.close_connection = True
                except OSError:  # the client went away mid-request
                    self.close_connection = True
                finally:
                    self.server.leave(self)
                    if self.server.draining:
                        self.close_connection = True

            def _frame(self) -> None:
                """What the headers say about the body: `_length` (None: chunked), `_unread`."""
                te = self.headers.get_all("Transfer-Encoding") or []
                cl = self.headers.get_all("Content-Length") or []
                if te:
                    self._unread = True
                    if cl:
                        raise_now = HTTPError(400, "both Transfer-Encoding and Content-Length")
                    elif ",".join(te).strip().lower() != "chunked":
                        raise_now = HTTPError(400, f"transfer coding {log_safe(','.join(te))[:100]!r} not "
                                                   "supported; send Content-Length or chunked")
                    else:
                        return
                elif not cl:
                    self._length = 0
                    return
                elif len(set(v.strip() for v in cl)) != 1 or not cl[0].strip().isdigit() or not cl[0].isascii():
                    self._unread = True
                    raise_now = HTTPError(400, f"bad Content-Length {log_safe(cl[0])[:40]!r}")
                else:
                    self._length = int(cl[0].strip())
                    self._unread = self._length > 0
                    return
                self._bad_frame = raise_now

            def _body(self) -> bytes:
                if self._length is None:
                    return self._chunked()
                n = self._length
                if n > MAX_BODY:
                    raise HTTPError(413, f"body of {n} bytes exceeds {MAX_BODY}")
                self.server.budget.take(n)
                self._charged = n
                data = self.rfile.read(n)
                if len(data) < n:
                    self.close_connection = True
                    raise HTTPError(400, f"body ended after {len(data)} of {n} bytes")
                self._unread = False
                return data

            def _chunked(self) -> bytes:
                """A chunked body, within MAX_BODY and the server's budget; a framing error closes."""
                chunks, size, keep = [], 0, self.close_connection
                self.close_connection = True  # until the whole body is read
                while True:
                    line = self.rfile.readline(1026)
                    size_s = line.split(b";", 1)[0].strip()
                    if not line.endswith(b"\n") or not _CHUNK_SIZE.match(size_s):
                        raise HTTPError(400, "malformed chunked body")
                    n = int(size_s, 16)
                    if n == 0:
                        break
                    size += n
                    if size > MAX_BODY:
                        raise HTTPError(413, f"body exceeds {MAX_BODY} bytes")
                    self.server.budget.take(n)
                    self._charged += n
                    data = self.rfile.read(n)
                    if len(data) < n or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                        raise HTTPError(400, "malformed chunked body")
                    chunks.append(data)
                for _ in range(64):  # trailer fields, dropped
                    line = self.rfile.readline(8194)
                    if line in (b"\r\n", b"\n"):
                        break
                    if not line.endswith(b"\n"):
                        raise HTTPError(400, "malformed chunked body")
                else:
                    raise HTTPError(400, "too many trailer fields")
                self._unread, self.close_connection = False, keep
                return b"".join(chunks)

            def _settle_body(self) -> None:
                """Before an answer: a body nobody read (an error, 503 past the budget) is read and dropped
                when its length is known and within MAX_BODY, so that the client reads the answer and the
                connection stays usable; otherwise the connection closes after the answer, lingering."""
                if not self._unread:
                    return
                n = self._length
                if n is None or n > MAX_BODY or not self._authorized:
                    self.close_connection = self._linger = True
                    return
                try:
                    while n > 0:
                        got = self.rfile.read(min(n, DRAIN_CHUNK))
                        if not got:
                            break
                        n -= len(got)
                except OSError:
                    n = 1
                self._unread = False
                if n > 0:
                    self.close_connection = True

            def finish(self):
                super().finish()
                if getattr(self, "_linger", False):  # the body sent on while the answer is read: drop it
                    c = self.connection
                    try:
                        c.shutdown(socket.SHUT_WR)
                        c.settimeout(LINGER_S / 5)
                        deadline = time.monotonic() + LINGER_S
                        while time.monotonic() < deadline and c.recv(DRAIN_CHUNK):
                            pass
                    except OSError:
                        pass

            # -- answers -------------------------------------------------------------------------
            def send_error(self, code, message=None, explain=None):
                """The standard library's errors (a bad request line, too many headers) as JSON, closing; an
                unknown HTTP version is a malformed request (400, as uvicorn answers it), not a server error."""
                self.close_connection = True
                code = 400 if code == 505 else code
                if self.request_version == "HTTP/0.9":  # a request line that did not parse: answer in 1.1
                    self.request_version = "HTTP/1.1"
                self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})
                if server.access_log:
                    access_log.info('%s "%s" %d', self.client_address[0], log_safe(self.requestline[:200]), code)

            def _send(self, status: int, obj) -> None:
                """`obj`: a JSON-able value, (value, extra headers), or (bytes, headers) already encoded."""
                data, headers = obj if isinstance(obj, tuple) else (obj, {})
                if not isinstance(data, bytes):
                    data = json.dumps(data, allow_nan=False).encode()
                    headers = {"content-type": "application/json", **headers}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection or self.server.draining:
                    self.close_connection = True
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                t0, status = time.perf_counter(), 200
                try:
                    try:
                        bad = self.__dict__.pop("_bad_frame", None)
                        if bad is not None:
                            raise bad
                        self._authorize()
                        answer = self._route(method)
                    except HTTPError as e:
                        status, answer = e.status, ({"error": str(e)}, e.headers)
                    except Exception as e:  # never let one request take the server down
                        status, answer = 500, {"error": f"internal error: {type(e).__name__}"}
                        log.exception("internal error")
                    finally:
                        if self._charged:
                            self.server.budget.give(self._charged)
                            self._charged = 0
                    self._settle_body()
                    self._send(status, answer)
                finally:
                    if server.access_log:
                        path = self.path.split("?")[0]
                        r = _ROUTE.match(path.rstrip("/"))
                        model = r["model"] if r and r["model"] in server.models else "-"
                        access_log.info('%s "%s %s" %d %.1fms model=%s', self.client_address[0], log_safe(method),
                                        log_safe(path), status, (time.perf_counter() - t0) * 1e3, model)

            def _authorize(self) -> None:
                if not server.token or self.path.split("?")[0].rstrip("/") in OPEN_PATHS:
                    self._authorized = True
                    return
                got = self.headers.get("Authorization")
                scheme, _, cred = (got or "").partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), server.token.encode()):
                    self._authorized = True
                    return
                self.close_connection = True  # the body stays unread
                raise HTTPError(401, "wrong bearer token" if got else "bearer token required",
                                {"WWW-Authenticate": 'Bearer realm="edgexfer"' + (', error="invalid_token"' if got else "")})

            def _route(self, method: str):
                path, _, query = self.path.partition("?")
                path = path.rstrip("/")
                if method == "HEAD":
                    method = "GET"
                if method == "GET" and path in ("/v2/health/live", "/v2/health/ready"):
                    return {"live": True} if path.endswith("live") else {"ready": True}
                if method == "GET" and path == "/v2":
                    from edgexfer import __version__
                    return {"name": "edgexfer", "version": __version__, "extensions": ["binary_tensor_data"]}
                if method == "GET" and not path.startswith("/v2"):  # the in-browser page: runtime/webpage.py
                    from edgexfer.runtime.webpage import static_file

                    page = static_file(path or "/", next(iter(server.models.values())).path)
                    if page:
                        return page[0], {"content-type": page[1]}
                r = _ROUTE.match(path)
                if not r:
                    raise HTTPError(404, f"no route {method} {log_safe(path)[:200]}")
                name, rest = r["model"], r["rest"]
                if method == "GET" and rest is None:
                    return server.metadata(name)
                if method == "GET" and rest == "/ready":
                    server.model(name)
                    return {"name": name, "ready": True}
                if method == "POST" and rest == "/infer":
                    server.model(name)  # 404 before the body is read
                    return server.infer(name, self._body(), self.headers.get(HEADER_LEN))
                if method == "POST" and rest == "/classify":
                    server.model(name)
                    top_k = _top_k(query)
                    data, ct = self._body(), self.headers.get("Content-Type", "")
                    data = multipart_file(data, ct) if ct.startswith("multipart/form-data") else data
                    return server.classify(name, data, top_k)
                raise HTTPError(405 if rest else 404,
                                f"no route {log_safe(method)[:20]} {log_safe(path)[:200]}")


        return Handler


def _top_k(query: str) -> int:
    try:
        values = parse_qs(query, max_num_fields=20).get("top_k")
        top_k = int(values[-1]) if values else 5
    except ValueError:
        raise HTTPError(400, "top_k must be an integer") from None
    if top_k < 1:
        raise HTTPError(400, "top_k must be >= 1")
    return top_k


class EdgeHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog for bursts, a cap on connections, its requests in flight
    counted (so that `drain` can wait for them) and its connections' errors logged in one line."""

    request_queue_size = 128
    daemon_threads = True
    block_on_close = False  # server_close must not wait on idle keep-alive connections; `drain` waits

    def __init__(self, address, handler, budget: BodyBudget, max_connections: int = MAX_CONNECTIONS):
        self.budget, self.max_connections = budget, max_connections
        self.draining = False
        self._cond = threading.Condition()
        self._conns: dict = {}  # connection socket -> whether a request is in flight on it
        super().__init__(address, handler)

    def in_flight(self) -> int:
        with self._cond:
            return sum(self._conns.values())

    def enter(self, h) -> None:
        with self._cond:
            self._conns[h.connection] = True

    def leave(self, h) -> None:
        with self._cond:
            if h.connection in self._conns:
                self._conns[h.connection] = False
            self._cond.notify_all()

    def process_request(self, request, client_address):
        with self._cond:
            full = len(self._conns) >= self.max_connections or self.draining
            if not full:
                self._conns[request] = False
        if full:
            body = b'{"error": "too many connections; retry later"}'
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1"
                                b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._cond:
            self._conns.pop(request, None)
            self._cond.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        import sys

        e = sys.exc_info()[1]
        log.warning("%s connection error: %s", client_address[0], log_safe(str(e) or type(e).__name__)[:200])

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Stop accepting (the listening socket closes), close idle connections, wait for the requests in
        flight to be answered. After `serve_forever` has returned. True when all were answered in time."""
        self.draining = True
        try:
            self.socket.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for conn, busy in list(self._conns.items()):
                    if not busy:
                        try:
                            conn.shutdown(socket.SHUT_RD)  # its thread reads end-of-file and ends
                        except OSError:
                            pass
                if not any(self._conns.values()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))


def make_server(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
                threads: int | None = None, token: str | None = None, access_log: bool = True,
                image_limits: ImageLimits = ImageLimits(), max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT,
                max_connections: int = MAX_CONNECTIONS) -> EdgeHTTPServer:
    ms = ModelServer(models, threads, token, access_log, image_limits)
    return EdgeHTTPServer((host, port), ms.handler(), LockedBodyBudget(max_bytes_in_flight), max_connections)


def serve(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          token: str | None = None, access_log: bool = True, image_limits: ImageLimits = ImageLimits(),
          max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain: stop accepting, answer what is in flight, return."""
    httpd = make_server(models, host, port, threads, token, access_log, image_limits, max_bytes_in_flight)
    log.info("serving %s on http://%s:%d/v2", ", ".join(models), host, httpd.server_address[1])

    def on_term(signum, frame):  # shutdown() waits for serve_forever, which runs in this very thread
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if not httpd.drain():
            log.warning("stopped with %d requests still in flight after %g s", httpd.in_flight(), DRAIN_TIMEOUT_S)
        httpd.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # python -m edgexfer.runtime.server MODEL... == edgexfer serve MODEL...
    from edgexfer.runtime.cli import main

    main(["serve", *__import__("sys").argv[1:]])
