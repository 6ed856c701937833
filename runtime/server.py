"""A small HTTP server over `EdgeModel`, speaking the Open Inference Protocol (KServe v2): JSON tensors
and the binary tensor extension (`edgexfer.runtime.protocol`), one request at a time per thread, no
batching. Standard library only, so it runs on the board with the runtime install; `oip.py` is the
batching server for when uvicorn is installed. Both are adapters over `dataplane.DataPlane`, which
decides routes, authorisation, validation, answers and error statuses; this module frames HTTP/1.1
requests and answers. Endpoints (`/v2/models/{m}/versions/1/...` too):

    GET  /v2/health/live   /v2/health/ready   /v2   /v2/models/{m}   /v2/models/{m}/ready   /v2/openapi.json
    POST /v2/models/{m}/infer      {"inputs": [{"name", "shape", "datatype": "FP32", "data"}]}
    POST /v2/models/{m}/classify   raw image bytes or a multipart upload -> {"model", "predictions": [...]}

    curl --data-binary @cat.jpg http://127.0.0.1:8000/v2/models/demo/classify
    curl -F image=@cat.jpg http://127.0.0.1:8000/v2/models/demo/classify?top_k=3

Bound to 127.0.0.1 unless told otherwise. With a token, every endpoint but /v2/health/* wants
`Authorization: Bearer TOKEN` (401 otherwise), as in `oip.py`.

Request handling, as in the batching server: a body is framed by a valid Content-Length or chunked
Transfer-Encoding (anything else, another transfer coding included: 400), at most MAX_BODY bytes (413),
and bodies held at once are capped server-wide (`BodyBudget`: 503); a body left unread by an error is
read and dropped (up to MAX_BODY) or the connection closed, so it is never taken for a request; a
multipart /classify body is checked as it is read (`multipart.PartScanner`), and one refused part-way (more
than 16 parts, a part's headers too long) is answered 400 after REFUSED_DELAY_S, its connection closed and
the rest of it never read (a client looping such floods gets little of the server); every
error is a one-line JSON `{"error": ...}`, never a traceback; images are bounded by the model's limits
before decoding (413, 400); a request's head (its line and headers) must arrive within `head_timeout_s`
of the connection's opening or its last answer (an idle keep-alive connection closes then; a head begun
and not finished gets 408), and a body read waits at most `IDLE_TIMEOUT_S` for each piece; at most
`MAX_CONNECTIONS` connections are served at once: past them a new connection takes the slot of the one
that has waited longest for a head (slow or idle clients cannot hold every slot), and only when every
connection has a request in hand is it 503; `serve` drains on SIGTERM: stops accepting, answers every
request in flight, then returns.
"""
from __future__ import annotations

import gc
import io
import json
import logging
import re
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgexfer.runtime.dataplane import PREFERRED_FILES, DataPlane, resolve_models  # noqa: F401 (public here too)
from edgexfer.runtime.multipart import scanner
from edgexfer.runtime.preprocess import ImageLimits
from edgexfer.runtime.protocol import (HEADER_LEN, MAX_BODIES_IN_FLIGHT, MAX_BODY, BodyBudget, HTTPError,
                                       LockedBodyBudget, log_safe, tune_malloc)

log = logging.getLogger(__name__)
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,8}$")
IDLE_TIMEOUT_S = 30.0      # a connection waiting this long for a read or a write is closed
HEAD_TIMEOUT_S = 10.0      # a request's line and headers arrive within this, from opening or the last answer
MAX_CONNECTIONS = 256      # connections (threads) served at once; past them 503 and close
DRAIN_TIMEOUT_S = 30.0     # on SIGTERM, how long requests in flight may take to finish
DRAIN_CHUNK = 64 * 1024
LINGER_S = 10.0            # closing with a body unread: how long what the client still sends is read and dropped
LINGER_REFUSED = 256 * 1024  # ... at most this much of a body refused part-way (a multipart flood): then closed
REFUSED_DELAY_S = 0.1      # a body refused part-way is answered after this (its connection then closes)
READ_CHUNK = 64 * 1024     # a multipart body is read and checked (`multipart.PartScanner`) this much at a time


IDLE, HEAD, BUSY = 0, 1, 2  # a connection waits for a request, reads its head, or has one in hand


class DeadlineReader(socket.SocketIO):
    """A socket's reads, each waiting at most until `deadline` (time.monotonic; None: IDLE_TIMEOUT_S): one
    byte every few seconds cannot stretch a request head past it."""

    deadline: float | None = None

    def readinto(self, b):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            self._sock.settimeout(min(left, IDLE_TIMEOUT_S))
        return super().readinto(b)


class ModelServer:
    """The standard-library adapter over the data plane: a thread per connection, no batching."""

    def __init__(self, models: dict[str, Path], threads: int | None = None, token: str | None = None,
                 access_log: bool = True, image_limits: ImageLimits = ImageLimits(), decode_workers: int | None = None,
                 dataplane: DataPlane | None = None):
        self.dp = dataplane or DataPlane(models, threads, token=token, access_log=access_log, image_limits=image_limits)
        self.models = self.dp.models
        self.decoder = self.dp.decoder(decode_workers)  # images are decoded in a few threads of their own

    def answer(self, call, body, header_len: str | None, content_type: str):
        """A routed call's answer: a JSON-able value, or (bytes, headers). `body()` reads the request body."""
        dp, name = self.dp, call.model
        if call.kind == "infer":
            x, h = dp.infer_input(name, body(), header_len)
            return dp.infer_answer(name, h, dp.models[name].run(x))
        if call.kind == "classify":
            top_k = dp.top_k(call.query)
            scan = scanner(content_type)  # a multipart body is checked as it is read: a flood is refused early
            x = self.decoder.submit(dp.image_input, name, body(scan), content_type).result()
            return dp.classify_answer(name, dp.models[name].run(x), top_k)
        return dp.simple(call)

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = IDLE_TIMEOUT_S
            disable_nagle_algorithm = True  # an answer's head and body are two writes: no 40 ms delayed-ACK stall

            def log_message(self, fmt, *args):
                pass  # one access-log line per request comes from _dispatch, with its duration

            def log_error(self, fmt, *args):
                log.warning("%s %s", self.address_string(), log_safe(fmt % args))

            def setup(self):
                super().setup()
                self.rfile.close()  # the standard library's reader, replaced by one with a deadline for heads
                self._reader = DeadlineReader(self.connection, "rb")
                self.rfile = io.BufferedReader(self._reader)

            # -- framing -------------------------------------------------------------------------
            def handle_one_request(self):
                """The standard library's, with the request counted in flight from its first line to its
                answer (SIGTERM waits for it), and an unknown method answered 405 in JSON."""
                self._unread, self._charged, self._length, self._authorized = False, 0, None, False
                self._refused, self._held = False, None  # a body refused part-way, the bytes of it read
                self._reader.deadline = time.monotonic() + self.server.head_timeout
                try:
                    self.raw_requestline = self.rfile.readline(65537)
                except (TimeoutError, OSError):  # idle past the head timeout, or gone, drained or evicted
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
                    try:
                        parsed = self.parse_request()
                    except TimeoutError:
                        self.connection.settimeout(1.0)
                        self.send_error(408, f"request head not received within {self.server.head_timeout:g} s")
                        return
                    self._reader.deadline = None
                    self.connection.settimeout(IDLE_TIMEOUT_S)
                    if not parsed:
                        return
                    if not self.server.busy(self):  # evicted while its head came in
                        self.close_connection = True
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

            def _body(self, scan=None) -> bytes | bytearray:
                """The request body. With `scan` (a `multipart.PartScanner`), it is fed the body READ_CHUNK
                at a time, and once it refuses, the rest is never read: 400, and the connection closes."""
                if self._length is None:
                    return self._chunked(scan)
                n = self._length
                if n > MAX_BODY:
                    raise HTTPError(413, f"body of {n} bytes exceeds {MAX_BODY}")
                self.server.budget.take(n)
                self._charged = n
                if scan is None:
                    data = self.rfile.read(n)
                    got = len(data)
                else:  # grown as it comes: a flood refused early never has its declared size allocated
                    data, got = bytearray(), 0
                    while got < n:
                        piece = self.rfile.read1(min(n - got, READ_CHUNK))
                        if not piece:
                            break
                        data += piece
                        got = self._held = len(data)
                        self._scan(scan, data, got, final=got == n)
                if got < n:
                    self.close_connection = True
                    raise HTTPError(400, f"body ended after {got} of {n} bytes")
                self._unread = False
                return data

            def _scan(self, scan, data, n: int, final: bool) -> None:
                try:
                    scan.feed(data, n, final)
                except HTTPError:
                    self._refused = not final  # the rest of the body stays unread
                    if final:
                        self._unread = False
                    raise

            def _chunked(self, scan=None) -> bytes | bytearray:
                """A chunked body, within MAX_BODY and the server's budget; a framing error closes. With
                `scan`, checked as it comes (`_body`)."""
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
                    self._held = size
                    if scan is None:
                        chunks.append(data)
                    else:  # one growing buffer to scan
                        chunks = chunks or [bytearray()]
                        chunks[0] += data
                        self._scan(scan, chunks[0], size, final=False)
                for _ in range(64):  # trailer fields, dropped
                    line = self.rfile.readline(8194)
                    if line in (b"\r\n", b"\n"):
                        break
                    if not line.endswith(b"\n"):
                        raise HTTPError(400, "malformed chunked body")
                else:
                    raise HTTPError(400, "too many trailer fields")
                self._unread, self.close_connection = False, keep
                return chunks[0] if scan is not None and chunks else b"".join(chunks)

            def _settle_body(self) -> None:
                """Before an answer: a body nobody read (an error, 503 past the budget) is read and dropped
                when its length is known and within MAX_BODY, so that the client reads the answer and the
                connection stays usable; otherwise the connection closes after the answer, lingering."""
                if not self._unread:
                    return
                n = self._length
                if self._refused:  # a multipart flood: what it still sends is dropped, within LINGER_REFUSED
                    self.close_connection, self._linger = True, LINGER_REFUSED
                    time.sleep(REFUSED_DELAY_S)  # the GIL released: a client looping floods loops slowly
                    return
                if n is None or n > MAX_BODY or not self._authorized:
                    self.close_connection, self._linger = True, float("inf")
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
                left = getattr(self, "_linger", 0)
                if left:  # the body sent on while the answer is read: drop it (at most `left` bytes, LINGER_S)
                    c = self.connection
                    try:
                        c.shutdown(socket.SHUT_WR)
                        c.settimeout(LINGER_S / 5)
                        deadline = time.monotonic() + LINGER_S
                        while left > 0 and time.monotonic() < deadline:
                            got = len(c.recv(min(left, DRAIN_CHUNK)))
                            if not got:
                                break
                            left -= got
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
                if server.dp.access:
                    logging.getLogger("edgexfer.access").info('%s "%s" %d', self.client_address[0],
                                                              log_safe(self.requestline[:200]), code)

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
                t0, status, dp, name = time.perf_counter(), 200, server.dp, ""
                try:
                    try:
                        bad = self.__dict__.pop("_bad_frame", None)
                        if bad is not None:
                            raise bad
                        try:
                            dp.authorize(self.path.split("?")[0], self.headers.get("Authorization"))
                        except HTTPError:
                            self.close_connection = True  # the body stays unread
                            raise
                        self._authorized = True
                        call = dp.route(method, self.path)
                        name = call.model
                        answer = server.answer(call, self._body, self.headers.get(HEADER_LEN),
                                               self.headers.get("Content-Type", ""))
                    except Exception as e:  # never let one request take the server down (500, logged)
                        status, message, extra = dp.failure(e)
                        answer = dp.error_body(status, message, extra)
                    finally:
                        if self._charged:  # a flood refused early: only the bytes read count towards a trim
                            self.server.budget.give(self._charged, self._held)
                            self._charged = 0
                    self._settle_body()
                    self._send(status, dp.encode(answer))
                finally:
                    dp.log_access(self.client_address[0], method, self.path.split("?")[0], status,
                                  time.perf_counter() - t0, name or dp.model_of_path(self.path))

        return Handler


class EdgeHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog for bursts, a cap on connections (when full, the connection
    that has waited longest for a request head gives its slot to the new one), its requests in flight
    counted (so that `drain` can wait for them) and its connections' errors logged in one line."""

    request_queue_size = 128
    daemon_threads = True
    block_on_close = False  # server_close must not wait on idle keep-alive connections; `drain` waits

    def __init__(self, address, handler, budget: BodyBudget, max_connections: int = MAX_CONNECTIONS,
                 head_timeout_s: float = HEAD_TIMEOUT_S):
        self.budget, self.max_connections, self.head_timeout = budget, max_connections, head_timeout_s
        self.draining = False
        self.evicted = 0  # connections closed to make room for a new one
        self._cond = threading.Condition()
        self._conns: dict = {}  # connection socket -> [IDLE/HEAD/BUSY, since when (monotonic)]
        super().__init__(address, handler)

    def in_flight(self) -> int:
        """Requests begun (their line received) and not yet answered."""
        with self._cond:
            return sum(1 for state, _ in self._conns.values() if state != IDLE)

    def _set(self, conn, state: int) -> None:
        with self._cond:
            if conn in self._conns:  # not when evicted meanwhile
                self._conns[conn][0] = state
                if state == IDLE:
                    self._conns[conn][1] = time.monotonic()
            self._cond.notify_all()

    def enter(self, h) -> None:
        self._set(h.connection, HEAD)

    def busy(self, h) -> bool:
        """The request's head is in: its connection can no longer be evicted. False when it already was."""
        with self._cond:
            if h.connection not in self._conns:
                return False
        self._set(h.connection, BUSY)
        return True

    def leave(self, h) -> None:
        self._set(h.connection, IDLE)

    def _evict(self) -> bool:
        """With the lock held: close the connection that has waited longest for a request head, if any."""
        waiting = [(since, conn) for conn, (state, since) in self._conns.items() if state != BUSY]
        if not waiting:
            return False
        _, conn = min(waiting, key=lambda w: w[0])
        del self._conns[conn]
        self.evicted += 1
        try:
            conn.shutdown(socket.SHUT_RDWR)  # its thread reads end-of-file and ends
        except OSError:
            pass
        return True

    def process_request(self, request, client_address):
        with self._cond:
            full = self.draining or (len(self._conns) >= self.max_connections and not self._evict())
            if not full:
                self._conns[request] = [IDLE, time.monotonic()]
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
                for conn, (state, _) in list(self._conns.items()):
                    if state == IDLE:
                        try:
                            conn.shutdown(socket.SHUT_RD)  # its thread reads end-of-file and ends
                        except OSError:
                            pass
                if not any(state != IDLE for state, _ in self._conns.values()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))


def make_server(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
                threads: int | None = None, token: str | None = None, access_log: bool = True,
                image_limits: ImageLimits = ImageLimits(), max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT,
                max_connections: int = MAX_CONNECTIONS, head_timeout_s: float = HEAD_TIMEOUT_S) -> EdgeHTTPServer:
    ms = ModelServer(models, threads, token, access_log, image_limits)
    return EdgeHTTPServer((host, port), ms.handler(), LockedBodyBudget(max_bytes_in_flight), max_connections,
                          head_timeout_s)


def serve(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          token: str | None = None, access_log: bool = True, image_limits: ImageLimits = ImageLimits(),
          max_bytes_in_flight: int = MAX_BODIES_IN_FLIGHT, head_timeout_s: float = HEAD_TIMEOUT_S) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain: stop accepting, answer what is in flight, return. A port it
    cannot listen on is a RuntimeInputError naming it."""
    import errno

    from edgexfer.runtime.errors import RuntimeInputError

    tune_malloc()  # freed bodies of a burst go back to the OS, not into heaps that keep them
    try:
        httpd = make_server(models, host, port, threads, token, access_log, image_limits, max_bytes_in_flight,
                            head_timeout_s=head_timeout_s)
    except OSError as e:  # binding: one line, not a traceback
        if isinstance(e, FileNotFoundError) or e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        raise RuntimeInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    # what was loaded so far (modules, models) lives as long as the server: out of the cyclic collector's
    # sight, each full collection under load takes microseconds, not the ~7 ms of walking all of it
    gc.collect()
    gc.freeze()
    from edgexfer.runtime.dataplane import served_urls

    log.info("%s", served_urls(models, host, httpd.server_address[1]))

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
