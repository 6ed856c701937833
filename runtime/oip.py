"""Open Inference Protocol (KServe v2 REST) over `EdgeModel`, on uvicorn, with dynamic batching.

    edgexfer serve runs/demo --server uvicorn        # needs: pip install "edgexfer[serve]"

An adapter over the serving core (`dataplane.py`: routing, authorisation, validation, answers, error
mapping, the access log — shared with the standard-library server, so both answer alike): this module
reads bodies from ASGI, batches inference (`batcher.py`) and writes answers through uvicorn with one
write per response (`transport.py`).

Speaks JSON tensors and the binary tensor extension (tritonclient's default: an
`Inference-Header-Content-Length` header, the JSON header, then raw little-endian bytes), so
tritonclient and KServe tooling work unchanged. Requests for one model are batched up to
`max_batch_size` or `max_queue_delay_ms` (Triton's meaning of both); inference runs off the event loop
in one worker thread per model instance; each request gets exactly its own rows back. A full queue answers
503 with Retry-After, a request not answered within `timeout_s` 504, a body over the limit 413, a
malformed request 400, an unknown model 404, a missing or wrong bearer token (when one is set) 401.
Request bodies held at once are capped server-wide (`BodyBudget`: 503 past it); images are decoded off
the event loop, in a small pool of their own, within the model's image limits (413 over the pixel
budget, 400 over the aspect ratio), checked before decoding.

Around every request sits one small ASGI layer (`Edge`): the token check, Prometheus metrics
(`/metrics`: requests, errors, a latency histogram per model, the batch-size histogram, queue depth,
requests in flight) and one access-log line (logger `edgexfer.access`). The OpenAPI document of all
this is served at `/v2/openapi.json` (`openapi.py`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from edgexfer.runtime.batcher import BatchConfig, DynamicBatcher, QueueFull  # noqa: F401 (public here too)
from edgexfer.runtime.dataplane import DataPlane
from edgexfer.runtime.multipart import PartScanner, scanner
from edgexfer.runtime.preprocess import ImageLimits
from edgexfer.runtime.protocol import (HEADER_LEN, MAX_BODIES_IN_FLIGHT, MAX_BODY, BodyBudget, HeaderCache, HTTPError,
                                       tune_malloc)
from edgexfer.runtime.transport import CoalescingTransport, http_protocol  # noqa: F401 (public here too)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWITCH_INTERVAL_US = 20.0  # the server process's GIL switch interval (see serve)
_HEADER_LEN_KEY = HEADER_LEN.lower().encode()


def failure(e: BaseException, timeout_s: float) -> tuple[int, str, dict]:
    """An exception raised while answering a request -> (status, message, headers) (`DataPlane.failure`)."""
    return DataPlane.failure(SimpleNamespace(timeout_s=timeout_s), e)


async def read_body(receive, content_length: bytes | None, budget: BodyBudget | None = None,
                    scan: PartScanner | None = None) -> bytes | bytearray:
    """The request body from ASGI `receive`, 413 past MAX_BODY (counted as it comes, for chunked bodies).
    With `budget`, its bytes are charged there first (a Content-Length's before any is read; 503 when
    spent); the caller gives back len(body) once the request is answered. With `scan`, a multipart body is
    checked as it comes: refused part-way, the rest is not read (400 with Connection: close)."""
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
            if scan is None:
                chunks.append(chunk)
            else:  # one growing buffer to scan
                chunks = chunks or [bytearray()]
                chunks[0] += chunk
                try:
                    scan.feed(chunks[0], size, final=not msg.get("more_body", False))
                except HTTPError as e:
                    if msg.get("more_body", False):
                        e.headers["Connection"] = "close"  # uvicorn closes after the answer: the rest unread
                    raise
            if not msg.get("more_body", False):
                break
    except BaseException:
        if taken:
            budget.give(taken, size)  # only the bytes read were held (a flood refused early)
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
    """The ASGI app: lifespan (batchers and the decoding pool start and stop with the server), and around
    every HTTP request the bearer token, metrics and one access-log line; `/metrics` here, every other
    request to `handle` (the data plane's routes)."""

    def __init__(self, dp: DataPlane, *, batchers: dict[str, DynamicBatcher], metrics: Metrics, budget: BodyBudget,
                 decode_workers: int | None):
        self.dp, self.batchers, self.metrics, self.budget = dp, batchers, metrics, budget
        self.decode_workers, self.decoder = decode_workers, None
        self.caches = {n: HeaderCache() for n in dp.models}  # checked binary-extension headers, per model
        self.state = SimpleNamespace(batchers=batchers, metrics=metrics, dataplane=dp)  # for tests and embedding

    async def lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.decoder = self.dp.decoder(self.decode_workers)
                for b in self.batchers.values():
                    b.start()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                for b in self.batchers.values():  # graceful shutdown: answer every accepted request first
                    await b.stop()
                if self.decoder is not None:
                    self.decoder.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        m = self.metrics
        m.in_flight += 1
        status, model = 500, ""
        try:
            status, model = await self.handle(scope, receive, send)
        finally:
            m.in_flight -= 1
            dt = time.perf_counter() - t0
            m.record(model, status, dt)
            client = scope.get("client") or ("-", 0)
            self.dp.log_access(client[0], scope["method"], scope["path"], status, dt, model)

    async def handle(self, scope, receive, send) -> tuple[int, str]:
        """Answer one request; (status, the served model it named or '')."""
        dp, method, path = self.dp, scope["method"], scope["path"]
        header_len = content_length = authorization = None
        content_type = ""
        for k, v in scope["headers"]:
            if k == _HEADER_LEN_KEY:
                header_len = v.decode("latin-1")
            elif k == b"content-length":
                content_length = v
            elif k == b"content-type":
                content_type = v.decode("latin-1")
            elif k == b"authorization":
                authorization = v
        charged, name = 0, ""
        try:
            dp.authorize(path, authorization)
            if path == "/metrics" and method in ("GET", "HEAD"):
                data, headers = self.metrics.text(), {"content-type": "text/plain; version=0.0.4; charset=utf-8"}
            else:
                query = scope.get("query_string", b"").decode("latin-1")
                call = dp.route(method, f"{path}?{query}" if query else path)
                name = call.model
                if call.kind == "infer":
                    body = await read_body(receive, content_length, self.budget)
                    charged = len(body)
                    x, h = dp.infer_input(name, body, header_len, self.caches[name])
                    data, headers = dp.infer_answer(name, h, await self.batchers[name].submit(x))
                elif call.kind == "classify":
                    top_k = dp.top_k(call.query)
                    body = await read_body(receive, content_length, self.budget, scanner(content_type))
                    charged = len(body)
                    # decoded off the event loop: a large image must not stall every other endpoint
                    x = await asyncio.get_running_loop().run_in_executor(self.decoder, dp.image_input, name, body,
                                                                         content_type)
                    outs = await self.batchers[name].submit(x)
                    data, headers = dp.encode(dp.classify_answer(name, outs, top_k))
                else:
                    data, headers = dp.encode(dp.simple(call))
            status = 200
        except Exception as e:
            status, message, extra = dp.failure(e)
            data, headers = dp.error_body(status, message, extra)
            name = name or dp.model_of_path(path)
        finally:
            self.budget.give(charged)
        await send({"type": "http.response.start", "status": status, "headers": [
            *((k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()),
            (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        return status, dp.served(name)


def create_app(models: dict[str, Path], *, threads: int | None = None, batch: BatchConfig = BatchConfig(),
               token: str | None = None, access_log: bool = True, image_limits: ImageLimits = ImageLimits(),
               max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT, decode_workers: int | None = None,
               dataplane: DataPlane | None = None):
    """The ASGI app. `image_limits` bound each uploaded image (decoded off the event loop in
    `decode_workers` threads, default min(4, cores)); `max_bytes_in_flight` caps request-body bytes held
    at once (503 past it). `dataplane`: one already made (shared with a gRPC front end), else one is."""
    dp = dataplane or DataPlane(models, threads, token=token, access_log=access_log, image_limits=image_limits,
                                timeout_s=batch.timeout_s)
    batchers = make_batchers(dp, batch)
    return Edge(dp, batchers=batchers, metrics=Metrics(batchers), budget=BodyBudget(max_bytes_in_flight),
                decode_workers=decode_workers)


def make_batchers(dp: DataPlane, batch: BatchConfig) -> dict[str, DynamicBatcher]:
    return {n: DynamicBatcher([m] + [dp.replica(n) for _ in range(batch.instances - 1)], batch)
            for n, m in dp.models.items()}


def serve(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          batch: BatchConfig = BatchConfig(), token: str | None = None, access_log: bool = True,
          switch_interval_us: float | None = None, image_limits: ImageLimits = ImageLimits(),
          max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT, grpc_port: int | None = None) -> None:
    """REST on `port`, and with `grpc_port` the OIP gRPC service too (grpc_server.py), both in one event
    loop over one data plane and the same batchers. SIGTERM: the gRPC server stops (answering what it
    accepted), then the REST one drains. A port it cannot listen on is an error before any model loads."""
    import sys

    from edgexfer.runtime.errors import RuntimeInputError

    check_listen(host, port, grpc_port)  # uvicorn would log a bind error and exit 3, after loading the models
    if grpc_port and grpc_port == port:
        raise RuntimeInputError(f"--grpc-port {grpc_port} is the REST --port too; give another")
    import uvicorn

    # An inference thread needs the GIL for a moment after each batch (ONNX Runtime's outputs, the answers,
    # the next batch). While the event loop runs Python it waits out a whole switch interval for it, each
    # time (Python's default: 5 ms). For a fast model that wait costs much of its throughput; the A/B of
    # intervals is in benchmarks/RESULTS.md, "The GIL switch interval".
    sys.setswitchinterval((switch_interval_us or SWITCH_INTERVAL_US) / 1e6)
    tune_malloc()  # freed bodies of a burst go back to the OS, not into heaps that keep them
    app = create_app(models, threads=threads, batch=batch, token=token, access_log=access_log,
                     image_limits=image_limits, max_bytes_in_flight=max_bytes_in_flight)
    # uvicorn's own access log is replaced by ours (with the duration and the model)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False, server_header=False,
                            proxy_headers=False, timeout_graceful_shutdown=30, http=http_protocol())
    uvicorn_server(config, grpc_port).run()


def check_listen(host: str, *ports: int | None) -> None:
    """Bind each port (0 and None: none to check) on `host` once and let it go: a port in use, or one this
    process may not have, is a RuntimeInputError naming it."""
    import socket

    from edgexfer.runtime.errors import RuntimeInputError

    for port in ports:
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                raise RuntimeInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def uvicorn_server(config, grpc_port: int | None = None):
    """A uvicorn.Server for `config` (its app: `create_app`'s); with `grpc_port`, one that also runs the OIP
    gRPC service in its event loop, started after the lifespan (the batchers) and stopped before the REST
    drain. Its `grpc_port` attribute is the bound gRPC port once started."""
    import uvicorn

    app = config.app

    class WithGRPC(uvicorn.Server):
        grpc = None

        async def startup(self, sockets=None):
            await super().startup(sockets)  # the lifespan has started the batchers
            if not self.should_exit and grpc_port is not None:
                from edgexfer.runtime.grpc_server import make_server

                self.grpc, self.grpc_port = make_server(app.dp, app.batchers, config.host, grpc_port, app.budget)
                await self.grpc.start()
            if not self.should_exit:
                from edgexfer.runtime.dataplane import served_urls

                socks = [s for srv in getattr(self, "servers", []) for s in srv.sockets]
                port = socks[0].getsockname()[1] if socks else config.port
                log.info("%s", served_urls(app.dp.paths, config.host, port, getattr(self, "grpc_port", None)))

        async def shutdown(self, sockets=None):
            if self.grpc is not None:
                await self.grpc.stop(app.dp.timeout_s)
            await super().shutdown(sockets)

    return WithGRPC(config)
