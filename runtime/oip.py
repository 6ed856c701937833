"""Open Inference Protocol (KServe v2 REST) over `EdgeModel`, on starlette + uvicorn, with dynamic batching.

    edgexfer serve runs/demo --server uvicorn        # needs: pip install "edgexfer[serve]"

Speaks JSON tensors and the binary tensor extension (tritonclient's default: an
`Inference-Header-Content-Length` header, the JSON header, then raw little-endian bytes), so
tritonclient and KServe tooling work unchanged. Requests for one model are batched up to
`max_batch_size` or `max_queue_delay_ms` (Triton's meaning of both); inference runs off the event loop
in one worker thread per model; each request gets exactly its own rows back. A full queue answers 503
with Retry-After, a request not answered within `timeout_s` 504, a body over the limit 413, a malformed
request 400, an unknown model 404, a missing or wrong bearer token (when one is set) 401. Request bodies
held at once are capped server-wide (`BodyBudget`: 503 past it); images are decoded off the event loop,
in a small pool of their own, within the model's image limits (413 over the pixel budget, 400 over the
aspect ratio), checked before decoding.

Around every request sits one small ASGI layer (`Edge`): the token check, Prometheus metrics
(`/metrics`: requests, errors, a latency histogram per model, the batch-size histogram, queue depth,
requests in flight) and one access-log line (logger `edgexfer.access`). The OpenAPI document of all
this is served at `/v2/openapi.json` (`openapi.py`).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgexfer.runtime.errors import ImageError, ImageTooLarge, RuntimeInputError
from edgexfer.runtime.model import EdgeModel
from edgexfer.runtime.openapi import OPEN_PATHS, openapi_document
from edgexfer.runtime.preprocess import ImageLimits
from edgexfer.runtime.protocol import (
    HEADER_LEN,
    MAX_BODIES_IN_FLIGHT,
    MAX_BODY,
    BodyBudget,
    HeaderCache,
    HTTPError,
    infer_response,
    log_safe,
    parse_infer,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("edgexfer.access")

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWITCH_INTERVAL_US = 20.0  # the server process's GIL switch interval (see serve)


class QueueFull(Exception):
    pass


@dataclass
class BatchConfig:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256           # pending requests per model before 503
    timeout_s: float = 30.0        # per request, from acceptance to its rows (504 past it)
    instances: int = 1             # copies of each model running batches side by side (Triton's instance count)


class DynamicBatcher:
    """Collects requests for one model into batches (size or delay bound) and computes them off the
    event loop, on `len(models)` instances side by side. Each instance is a thread with its own ONNX
    Runtime session that takes the next batch from the shared queue itself as soon as it is free, so a
    busy event loop never delays a batch, and the loop answers one batch and reads the next requests
    while another batch computes.

    A batch starts when `max_batch_size` rows are waiting, or `max_queue_delay_ms` after its oldest
    request arrived (Triton's meaning of both). A request larger than `max_batch_size` runs alone."""

    def __init__(self, model: EdgeModel | list[EdgeModel], cfg: BatchConfig, observe=None):
        self.models = model if isinstance(model, list) else [model]
        self.model, self.cfg = self.models[0], cfg
        self.cond = threading.Condition(threading.Lock())  # guards pending, pending_rows, closed
        self.pending: deque[tuple[np.ndarray, asyncio.Future, float]] = deque()  # (rows, answer, arrival)
        self.pending_rows = 0
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.deadlines: deque[tuple[float, asyncio.Future]] = deque()  # in arrival order, so in deadline order
        self.sweep_s = min(0.05, cfg.timeout_s / 4)  # a late request gets its 504 within this much
        self._sweeper: asyncio.TimerHandle | None = None
        self.waiting = 0  # submitted requests not yet answered
        self.recent_batches: deque[int] = deque(maxlen=1024)  # rows per batch, newest last (tests, debugging)
        self.observe = observe or (lambda rows: None)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.threads = [threading.Thread(target=self._instance, args=(m,), name=f"edgexfer-infer-{i}", daemon=True)
                        for i, m in enumerate(self.models)]
        for t in self.threads:
            t.start()
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    def depth(self) -> int:
        return len(self.pending)

    async def stop(self) -> None:
        while self.waiting:  # answer what was accepted (each waits at most timeout_s)
            await asyncio.sleep(0.01)
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in self.threads:
            await asyncio.get_running_loop().run_in_executor(None, t.join)

    def _sweep(self) -> None:
        """Answer 504 to the requests past their deadline (one timer per model, not one per request)."""
        d, now = self.deadlines, self.loop.time()
        while d and (d[0][1].done() or d[0][0] <= now):
            _, f = d.popleft()
            if not f.done():
                f.set_exception(asyncio.TimeoutError())
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.pending) >= self.cfg.max_queue:
            raise QueueFull
        fut = self.loop.create_future()
        with self.cond:
            was = self.pending_rows
            self.pending.append((x, fut, time.monotonic()))
            self.pending_rows += len(x)
            if was == 0 or (was < self.cfg.max_batch_size <= self.pending_rows):
                self.cond.notify_all()  # an idle instance starts a batch; a gathering one stops waiting
        self.deadlines.append((self.loop.time() + self.cfg.timeout_s, fut))
        self.waiting += 1
        try:
            return await fut
        finally:
            self.waiting -= 1

    def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]] | None:
        """Blocks until a batch is due, then takes it: the oldest waiting requests, up to max_batch_size
        rows (at least one request), dropping those already answered (timed out). None: stopped."""
        cfg, delay = self.cfg, self.cfg.max_queue_delay_ms / 1e3
        with self.cond:
            while True:
                while not self.pending:
                    if self.closed:
                        return None
                    self.cond.wait()
                left = delay - (time.monotonic() - self.pending[0][2])
                if self.pending_rows >= cfg.max_batch_size or left <= 0:
                    break
                self.cond.wait(left)
            items, rows = [], 0
            while self.pending:
                n = len(self.pending[0][0])
                if items and rows + n > cfg.max_batch_size:
                    break
                x, f, _ = self.pending.popleft()
                self.pending_rows -= n
                if not f.done():
                    items.append((x, f))
                    rows += n
            if self.pending:
                self.cond.notify()  # what is left over is another instance's
            return items

    @staticmethod
    def _gather(items) -> np.ndarray:
        """The batch's rows in one array. One bytes join holds the GIL throughout: np.concatenate lets go
        of it for every row of 500+ values, and while the event loop runs the thread then waits a switch
        interval to get it back, each time (16 rows of 3x32x32: 0.5 ms of a 5 ms batch)."""
        xs = [x for x, _ in items]
        if len(xs) == 1:
            return xs[0]
        if all(x.flags.c_contiguous and x.dtype == xs[0].dtype and x.shape[1:] == xs[0].shape[1:] for x in xs):
            return np.frombuffer(b"".join(xs), xs[0].dtype).reshape(-1, *xs[0].shape[1:])
        return np.concatenate(xs)

    def _instance(self, model: EdgeModel) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            if not items:
                continue
            xb = self._gather(items)
            try:
                outs, err = model.run(xb), None
            except Exception as e:  # one bad batch must not stop the instance
                outs, err = None, e
            self.loop.call_soon_threadsafe(self._answer, items, len(xb), outs, err)

    def _answer(self, items, rows: int, outs, err) -> None:
        """On the event loop: each request its own rows (the batch's bookkeeping too, off the instance thread)."""
        self.recent_batches.append(rows)
        self.observe(rows)
        start = 0
        for x, f in items:
            n = len(x)
            if not f.done():
                if err is not None:
                    f.set_exception(err)
                else:
                    f.set_result({k: v[start:start + n] for k, v in outs.items()})
            start += n


def failure(e: BaseException, timeout_s: float) -> tuple[int, str, dict]:
    """An exception raised while answering a request -> (status, message, headers): one mapping for the
    starlette routes and the raw infer path."""
    if isinstance(e, HTTPError):
        return e.status, str(e), e.headers
    if isinstance(e, QueueFull):
        return 503, "queue full; retry later", {"Retry-After": "1"}
    if isinstance(e, asyncio.TimeoutError):
        return 504, f"no answer within {timeout_s:g} s", {}
    status = getattr(e, "status_code", None)  # starlette's HTTPException, e.g. a malformed multipart body
    if isinstance(status, int) and 400 <= status < 500:
        return status, str(getattr(e, "detail", e)), dict(getattr(e, "headers", None) or {})
    log.error("internal error", exc_info=e)  # never let one request take the server down
    return 500, f"internal error: {type(e).__name__}", {}


async def read_body(receive, content_length: bytes | None, budget: BodyBudget | None = None) -> bytes:
    """The request body from ASGI `receive`, 413 past MAX_BODY (counted as it comes, for chunked bodies).
    With `budget`, its bytes are charged there first (a Content-Length's before any is read; 503 when
    spent); the caller gives back len(body) once the request is answered."""
    try:
        declared = 0 if content_length is None else int(content_length)
    except ValueError:
        raise HTTPError(400, "bad Content-Length") from None
    if declared > MAX_BODY:
        raise HTTPError(413, f"body of {declared} bytes exceeds {MAX_BODY}")
    taken = 0
    if budget is not None and declared > 0:
        try:
            budget.take(declared)
        except HTTPError:
            await discard_body(receive)  # so that the client, still sending, reads the 503
            raise
        taken = declared
    try:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HTTPError(400, "client disconnected")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise HTTPError(413, f"body exceeds {MAX_BODY} bytes")
            if budget is not None and size > taken:
                try:
                    budget.take(size - taken)
                except HTTPError:
                    if msg.get("more_body", False):
                        await discard_body(receive, size)
                    raise
                taken = size
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
    except BaseException:
        if taken:
            budget.give(taken)
        raise
    if taken != size:
        budget.give(taken - size)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def discard_body(receive, size: int = 0) -> None:
    """Read the rest of a refused request's body and drop it (at most MAX_BODY bytes in all)."""
    while size <= MAX_BODY:
        msg = await receive()
        size += len(msg.get("body", b""))
        if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
            return


class Metrics:
    """Prometheus metrics of one app, in their own registry (several apps in one process stay apart)."""

    def __init__(self, batchers: dict[str, DynamicBatcher]):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # no *_created series beside every counter (process-wide)

        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgexfer_requests", "HTTP requests answered, by model and status code",
                                ["model", "code"], registry=r)
        self.errors = Counter("edgexfer_errors", "requests answered with a 4xx or 5xx status", ["model"], registry=r)
        self.duration = Histogram("edgexfer_request_duration_seconds", "time from request to response, by model",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("edgexfer_batch_size", "rows per inference batch", ["model"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = 0  # read at scrape time (a Gauge's inc and dec would take its lock twice a request)
        Gauge("edgexfer_requests_in_flight", "requests accepted and not yet answered",
              registry=r).set_function(lambda: self.in_flight)
        depth = Gauge("edgexfer_queue_depth", "requests waiting for a batch", ["model"], registry=r)
        for name, b in batchers.items():
            depth.labels(name).set_function(b.depth)
            b.observe = self.batch.labels(name).observe
            self.duration.labels(name)  # every served model shows from the start
        self._children: dict = {}

    def record(self, model: str, status: int, seconds: float) -> None:
        """One answered request (the label lookups cached: this runs once per request)."""
        c = self._children.get((model, status))
        if c is None:
            c = self._children[(model, status)] = (
                self.requests.labels(model, str(status)), self.errors.labels(model) if status >= 400 else None,
                self.duration.labels(model) if model else None)
        c[0].inc()
        if c[1] is not None:
            c[1].inc()
        if c[2] is not None:
            c[2].observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Edge:
    """ASGI layer around the app: bearer token, metrics, one access-log line per request. `fast` maps the
    exact path of each model's infer endpoint to a raw ASGI handler for POST (the hot path skips
    starlette's routing, middleware and Request/Response objects); everything else goes to `app`."""

    def __init__(self, app, *, metrics: Metrics, models, token: str | None, access: bool, fast: dict):
        self.app, self.metrics, self.models, self.access, self.fast = app, metrics, models, access, fast
        self.token = token.encode() if token else None
        self.state = app.state  # batchers and metrics, for tests and embedding

    def authorized(self, scope) -> bool:
        for k, v in scope["headers"]:
            if k == b"authorization":
                scheme, _, cred = v.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), self.token)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight += 1
        try:
            if self.token and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
                wrong = any(k == b"authorization" for k, _ in scope["headers"])
                body = json.dumps({"error": "wrong bearer token" if wrong else "bearer token required"}).encode()
                await send_status({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="edgexfer"' + (b', error="invalid_token"' if wrong else b""))]})
                await send({"type": "http.response.body", "body": body})
            elif scope["method"] == "POST" and scope["path"] in self.fast:
                name, handler = self.fast[scope["path"]]
                scope["path_params"] = {"model": name}
                status = await handler(scope, receive, send)
            else:
                await self.app(scope, receive, send_status)
        finally:
            m.in_flight -= 1
            dt = time.perf_counter() - t0
            model = (scope.get("path_params") or {}).get("model", "")
            model = model if model in self.models else ""  # unknown names must not grow the label set
            m.record(model, status, dt)
            if self.access:
                client = scope.get("client") or ("-", 0)
                access_log.info('%s "%s %s" %d %.1fms model=%s', client[0], scope["method"], log_safe(scope["path"]),
                                status, dt * 1e3, model or "-")


def create_app(models: dict[str, Path], *, threads: int | None = None, batch: BatchConfig = BatchConfig(),
               token: str | None = None, access_log: bool = True, image_limits: ImageLimits = ImageLimits(),
               max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT, decode_workers: int | None = None):
    """The ASGI app. `image_limits` bound each uploaded image (decoded off the event loop in
    `decode_workers` threads, default min(4, cores)); `max_bytes_in_flight` caps request-body bytes held
    at once (503 past it)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from edgexfer import __version__
    from edgexfer.runtime.server import ModelServer

    ms = ModelServer(models, threads, image_limits=image_limits)
    batchers = {n: DynamicBatcher([m] + [EdgeModel(models[n], threads=threads, spinning=False)
                                         for _ in range(batch.instances - 1)], batch)
                for n, m in ms.models.items()}
    metrics = Metrics(batchers)
    budget = BodyBudget(max_bytes_in_flight)
    decode_workers = decode_workers or max(1, min(4, os.cpu_count() or 1))
    decoder: list = []  # the image-decoding pool, made by the lifespan (its threads die with the server)
    doc = json.dumps(openapi_document(ms.models, version=__version__, token=bool(token),
                                      timeout_s=batch.timeout_s)).encode()

    async def body_of(request: Request) -> bytes:
        request._body = data = await read_body(request.receive, request.headers.get("content-length"), budget)
        request.scope["edgexfer.charged"] = len(data)  # given back by `guard` once answered
        return data  # request.form() reads it from request._body

    def error(status: int, message: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers=headers)

    def guard(handler):
        async def wrapped(request: Request):
            try:
                return await handler(request)
            except Exception as e:
                return error(*failure(e, batch.timeout_s))
            finally:
                budget.give(request.scope.pop("edgexfer.charged", 0))
        return wrapped

    def model_of(request: Request) -> tuple[str, EdgeModel]:
        name = request.path_params["model"]
        return name, ms.model(name)  # 404 for an unknown name

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": True})

    async def server_meta(request):
        return JSONResponse({"name": "edgexfer", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_meta(request):
        name, _ = model_of(request)
        return JSONResponse(ms.metadata(name))

    async def model_ready(request):
        name, _ = model_of(request)
        return JSONResponse({"name": name, "ready": True})

    async def infer(request):  # served models take the raw path below; this answers 404 for the others
        name, model = model_of(request)
        x, h = parse_infer(await body_of(request), request.headers.get(HEADER_LEN), model)
        data, headers = infer_response(name, h, model, await batchers[name].submit(x))
        return Response(data, 200, headers=headers)

    def raw_infer(name: str):
        model, batcher = ms.models[name], batchers[name]
        header_len_key = HEADER_LEN.lower().encode()
        cache = HeaderCache()

        async def handle(scope, receive, send):
            header_len = content_length = None
            for k, v in scope["headers"]:
                if k == header_len_key:
                    header_len = v.decode("latin-1")
                elif k == b"content-length":
                    content_length = v
            charged = 0
            try:
                body = await read_body(receive, content_length, budget)
                charged = len(body)
                x, h = parse_infer(body, header_len, model, cache)
                data, headers = infer_response(name, h, model, await batcher.submit(x))
                status = 200
            except Exception as e:
                status, message, extra = failure(e, batch.timeout_s)
                data, headers = json.dumps({"error": message}).encode(), {"content-type": "application/json", **extra}
            finally:
                budget.give(charged)
            await send({"type": "http.response.start", "status": status, "headers": [
                *((k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()),
                (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return status
        return handle

    async def image_bytes(request: Request) -> bytes:
        data = await body_of(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return data
        try:
            form = await request.form()
        except AssertionError:  # starlette without python-multipart
            raise HTTPError(400, "multipart uploads need python-multipart on the server; "
                                 "send the image bytes as the body instead") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        f = form.get("image") if hasattr(form.get("image"), "read") else (files[0] if files else None)
        if f is None:
            raise HTTPError(400, "multipart upload without a file; send it as -F image=@cat.jpg")
        return await f.read()

    async def classify(request):
        name, model = model_of(request)
        try:
            top_k = int(request.query_params.get("top_k", 5))
        except ValueError:
            raise HTTPError(400, "top_k must be an integer") from None
        if top_k < 1:
            raise HTTPError(400, "top_k must be >= 1")
        data = await image_bytes(request)
        try:  # off the event loop: a large image must not stall every other endpoint
            x = await asyncio.get_running_loop().run_in_executor(decoder[0] if decoder else None,
                                                                   model.preprocess, data)
        except ImageTooLarge as e:
            raise HTTPError(413, str(e)) from None
        except (ImageError, RuntimeInputError) as e:
            raise HTTPError(400, str(e)) from None
        outs = await batchers[name].submit(x)
        return JSONResponse({"model": name, "predictions": model.decode(outs, top_k=top_k)[0]})

    async def metrics_text(request):
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(request):
        return Response(doc, media_type="application/json")

    async def not_found(request, exc):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        from concurrent.futures import ThreadPoolExecutor

        decoder[:] = [ThreadPoolExecutor(decode_workers, thread_name_prefix="edgexfer-decode")]
        for b in batchers.values():
            b.start()
        yield
        for b in batchers.values():  # graceful shutdown: answer every accepted request first
            await b.stop()
        decoder[0].shutdown(wait=False)

    g = guard
    routes = [
        Route("/v2/health/live", g(live)), Route("/v2/health/ready", g(ready)), Route("/v2", g(server_meta)),
        Route("/v2/models/{model}", g(model_meta)), Route("/v2/models/{model}/ready", g(model_ready)),
        Route("/v2/models/{model}/infer", g(infer), methods=["POST"]),
        Route("/v2/models/{model}/classify", g(classify), methods=["POST"]),
        Route("/metrics", g(metrics_text)),
        Route("/v2/openapi.json", openapi), Route("/openapi.json", openapi),
    ]

    async def webpage(request):  # the in-browser page and its files: runtime/webpage.py
        from starlette.exceptions import HTTPException

        from edgexfer.runtime.webpage import static_file

        page = static_file(request.url.path, next(iter(ms.models.values())).path)
        if page is None:
            raise HTTPException(404, "Not Found")
        return Response(page[0], media_type=page[1])

    routes.append(Route("/{path:path}", webpage))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.batchers, app.state.metrics = batchers, metrics
    fast = {f"/v2/models/{n}/infer": (n, raw_infer(n)) for n in ms.models}
    return Edge(app, metrics=metrics, models=frozenset(ms.models), token=token, access=access_log, fast=fast)


class CoalescingTransport:
    """A transport that holds what is written until the end of the current event-loop step and sends it
    with one write. uvicorn writes a response's status line and headers, then its body, as two writes:
    two system calls and two TCP segments for the client to read. Ordering is kept; closing, EOF and a
    protocol switch flush first; nothing waits past the step that wrote it."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop, self._held = transport, loop, []

    def write(self, data) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held = self._held
        if held:
            self._held = []
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def set_protocol(self, protocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name):  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


def http_protocol():
    """uvicorn's HTTP protocol (httptools when installed, else h11) writing through CoalescingTransport."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class EdgeHTTP(base):
        def connection_made(self, transport):
            super().connection_made(CoalescingTransport(transport, self.loop))

    return EdgeHTTP


def serve(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          batch: BatchConfig = BatchConfig(), token: str | None = None, access_log: bool = True,
          switch_interval_us: float | None = None, image_limits: ImageLimits = ImageLimits(),
          max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT) -> None:
    import sys

    import uvicorn

    # An inference thread needs the GIL for a moment after each batch (ONNX Runtime's outputs, the answers,
    # the next batch). While the event loop runs Python it waits out a whole switch interval for it, each
    # time (Python's default: 5 ms). With a model computing 16 images in 4 ms that wait cost a third of its
    # throughput at 1 ms; at 20 us the server keeps ~0.8 of the offline rate (benchmarks/RESULTS.md).
    sys.setswitchinterval((switch_interval_us or SWITCH_INTERVAL_US) / 1e6)
    app = create_app(models, threads=threads, batch=batch, token=token, access_log=access_log,
                     image_limits=image_limits, max_bytes_in_flight=max_bytes_in_flight)
    # uvicorn's own access log is replaced by ours (with the duration and the model)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, server_header=False,
                proxy_headers=False, timeout_graceful_shutdown=30, http=http_protocol())
