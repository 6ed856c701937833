"""Issue 13, the servers: what a client sends cannot stall or crash them, on both the batching server
(oip.py) and the standard-library one (server.py). Raw sockets on 127.0.0.1, so that malformed framing
reaches the server as sent."""
import contextlib
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime import EdgeModel
from edgexfer.runtime.protocol import MAX_BODY
from edgexfer.runtime.server import make_server, resolve_models
from tests._live import free_port

HEADER = "Inference-Header-Content-Length"
SERVERS = ["stdlib", "uvicorn"]


def _needs_uvicorn():
    pytest.importorskip("uvicorn")
    pytest.importorskip("prometheus_client")


class Served:
    """A server on 127.0.0.1: its port, and raw requests to it."""

    def __init__(self, port: int, httpd=None):
        self.port, self.httpd = port, httpd

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.settimeout(timeout)
        return s

    def raw(self, data: bytes, half_close: bool = False, timeout: float = 10.0) -> bytes:
        """Send `data`, read until the server closes (or `timeout`): every byte answered."""
        with self.connect(timeout) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):  # answered and closed before the body was all sent
                return read_all(s)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            return read_all(s)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, dict, bytes]:
        head = {"Host": "x", "Connection": "close", **({"Content-Length": str(len(body))} if body else {}),
                **(headers or {})}
        data = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n" + body
        return parse(self.raw(data, timeout=timeout))


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            out += b
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def parse(resp: bytes) -> tuple[int, dict, bytes]:
    """The first response in `resp`: status, headers (lower-case), body."""
    assert resp.startswith(b"HTTP/1.1 "), resp[:200]
    head, _, rest = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", len(rest)))
    return int(lines[0].split()[1]), headers, rest[:n]


def strict_json(data: bytes):
    def no_constants(c):
        raise AssertionError(f"not JSON: {c}")
    return json.loads(data, parse_constant=no_constants)


def binary_infer(x: np.ndarray, binary_out: bool = True) -> tuple[bytes, dict]:
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                       "parameters": {"binary_data_size": x.nbytes}}]}
    if binary_out:
        req["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}]
    head = json.dumps(req).encode()
    return head + x.astype("<f4").tobytes(), {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


@contextlib.contextmanager
def serving(kind: str, models: dict, **kw):
    if kind == "stdlib":
        httpd = make_server(models, port=0, threads=1, **kw)
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        try:
            yield Served(httpd.server_address[1], httpd)
        finally:
            httpd.shutdown()
            httpd.server_close()
    else:
        _needs_uvicorn()
        from edgexfer.runtime.oip import BatchConfig, create_app
        from tests._live import live

        app = create_app(models, threads=1, batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=1, timeout_s=20), **kw)
        with live(app) as url:
            s = Served(int(url.rsplit(":", 1)[1]))
            s.app = app
            yield s


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tiny_run):
    with serving(request.param, resolve_models([tiny_run])) as s:
        s.kind = request.param
        yield s


@pytest.fixture(scope="module")
def stdlib(tiny_run):
    with serving("stdlib", resolve_models([tiny_run])) as s:
        yield s


# -- item 5 --------------------------------------------------------------------------------------

def test_huge_shape_is_400_not_500(server):
    """[2**54, 3, 64, 64]: np.prod overflowed int64 (to 0 bytes here) -> 500."""
    shape = [2**54, 3, 64, 64]
    for size in (0, 4 * shape[0] * 3 * 64 * 64):
        head = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                       "parameters": {"binary_data_size": size}}]}).encode()
        st, _, body = server.request("POST", "/v2/models/tiny/infer", head + b"\0" * 64, {HEADER: str(len(head))})
        assert st == 400, body
        assert "shape" in strict_json(body)["error"]
    st, _, body = server.request("POST", "/v2/models/tiny/infer", json.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": [0.0]}]}).encode())
    assert st == 400, body


@pytest.mark.parametrize("kind", SERVERS)
def test_nan_outputs_are_valid_json(kind, tiny_run):
    """An FP32 model fed NaN answers NaN logits: in JSON they are null, never a bare NaN."""
    with serving(kind, resolve_models([tiny_run / "model.onnx"])) as s:
        x = np.full((2, 3, 64, 64), np.nan, np.float32)
        body, headers = binary_infer(x, binary_out=False)
        st, h, data = s.request("POST", "/v2/models/model/infer", body, headers)
        assert st == 200, data
        out = strict_json(data)["outputs"][0]
        assert out["shape"] == [2, 3] and out["data"] == [None] * 6


def test_access_log_cannot_forge_lines(server, caplog):
    caplog.set_level(logging.INFO, logger="edgexfer.access")
    if server.kind == "uvicorn":  # the path is percent-decoded before it is logged
        st, _, _ = server.request("GET", "/v2/health/live%0A127.0.0.1%20%22GET%20/forged%22%20200")
    else:  # the standard library's request line carries raw bytes
        st, _, _ = server.request("GET", "/v2/health/\x1b[2Klive\x7fforged")
    assert st == 404
    time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgexfer.access"]
    assert lines and all(line.isprintable() for line in lines), lines


def test_bytes_in_flight_are_capped(tiny_run):
    """Two ~790 kB bodies at once against a 1 MiB cap: the second gets 503 with Retry-After (its bytes
    never held); once the first is answered, the second goes through."""
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    body, headers = binary_infer(x)
    head = ("POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + f"Content-Length: {len(body)}\r\n\r\n").encode()
    for kind in SERVERS:
        if kind == "uvicorn":
            _needs_uvicorn()
        with serving(kind, resolve_models([tiny_run]), max_bytes_in_flight=1 << 20) as s:
            with s.connect() as a:
                a.sendall(head + body[:1000])  # held: its Content-Length is promised
                time.sleep(0.5)
                st, h, data = parse(s.raw(head + body))
                assert st == 503 and h.get("retry-after") == "1", (kind, st, data)
                a.sendall(body[1000:])
                assert parse(read_all(a))[0] == 200
            assert parse(s.raw(head + body))[0] == 200


# -- item 3, both servers --------------------------------------------------------------------------

def test_image_limits_on_the_image_endpoint(server):
    bomb = png(Image.new("1", (20000, 20000)))  # 48 kB, 400 M pixels
    st, _, body = server.request("POST", "/v2/models/tiny/classify", bomb)
    assert st == 413 and "too large" in strict_json(body)["error"]
    thin = png(Image.new("L", (1, 4000)))
    st, _, body = server.request("POST", "/v2/models/tiny/classify", thin)
    assert st == 400 and "aspect ratio" in strict_json(body)["error"]
    big = png(Image.new("RGB", (7000, 6000)))  # 42 M pixels > 40 M, checked before decoding
    st, _, body = server.request("POST", "/v2/models/tiny/classify", big)
    assert st == 413 and "--max-image-pixels" in strict_json(body)["error"]
    assert server.request("GET", "/v2/health/ready")[0] == 200


def test_batching_server_decodes_off_the_event_loop(tiny_run, image_folder):
    import asyncio

    _needs_uvicorn()
    with serving("uvicorn", resolve_models([tiny_run])) as s:
        model = s.app.state.batchers["tiny"].model
        seen = []
        real = model.preprocess

        def spy(data):
            try:
                asyncio.get_running_loop()
                seen.append("event loop")
            except RuntimeError:
                seen.append(threading.current_thread().name)
            return real(data)

        model.preprocess = spy
        st, _, body = s.request("POST", "/v2/models/tiny/classify?top_k=1", next(image_folder.rglob("*.png")).read_bytes())
        assert st == 200 and len(strict_json(body)["predictions"]) == 1
        assert seen and "event loop" not in seen and seen[0].startswith("edgexfer-decode"), seen


# -- item 4: the standard-library server ------------------------------------------------------------

def test_negative_content_length_is_400(stdlib):
    """Content-Length: -1 read until the client closed, without limit."""
    resp = stdlib.raw(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + b"x" * 1000,
                      timeout=5)
    st, h, body = parse(resp)
    assert st == 400 and "Content-Length" in strict_json(body)["error"]


@pytest.mark.parametrize("value", ["abc", "1e3", "12, 13", "+5", " "])
def test_malformed_content_length_is_400(stdlib, value):
    st, _, body = parse(stdlib.raw(f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n"
                                   "\r\n{}".encode(), timeout=5))
    assert st == 400, body


def test_chunked_body_is_read(stdlib, tiny_run):
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    body, headers = binary_infer(x)
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (body[:100], body[100:5000], body[5000:]))
    data = ("POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + chunks + b"0\r\n\r\n"
    st, h, out = parse(stdlib.raw(data))
    assert st == 200, out
    n = int(h[HEADER.lower()])
    got = np.frombuffer(out[n:], "<f4").reshape(2, 3)
    np.testing.assert_allclose(got, EdgeModel(tiny_run / "model.int8.onnx").run(x)["label"], atol=1e-5)
    st, _, out = parse(stdlib.raw(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                                  b"\r\n", timeout=5))
    assert st == 400 and "transfer coding" in strict_json(out)["error"]
    st, _, out = parse(stdlib.raw(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                  b"\r\nzz\r\n", timeout=5))
    assert st == 400


SMUGGLED = b"GET /v2/models/tiny HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("head", [
    b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),  # 404
    b"GET /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),  # 405
    b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),  # 404
    b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),  # 413
    b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",  # 400
])
def test_unread_body_is_never_a_request(stdlib, head):
    """A body left unread by an error answer was parsed as the next request on the connection."""
    resp = stdlib.raw(head + SMUGGLED, half_close=True)
    assert resp.count(b"HTTP/1.1 ") == 1, resp
    assert parse(resp)[0] in (400, 404, 405, 413)


def test_drained_body_keeps_the_connection(stdlib):
    """A small unread body is read and dropped: the next request on the connection is answered."""
    with stdlib.connect() as s:
        s.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = read_all(s)
    assert resp.count(b"HTTP/1.1 ") == 2 and b'{"ready": true}' in resp, resp


def test_listen_backlog(stdlib):
    assert stdlib.httpd.request_queue_size >= 128


def test_top_k_on_the_image_endpoint(stdlib, image_folder):
    img = next(image_folder.rglob("*.png")).read_bytes()
    st, _, body = stdlib.request("POST", "/v2/models/tiny/classify?top_k=1", img)
    assert st == 200 and len(strict_json(body)["predictions"]) == 1
    assert stdlib.request("POST", "/v2/models/tiny/classify?top_k=x", img)[0] == 400
    assert stdlib.request("POST", "/v2/models/tiny/classify?top_k=0", img)[0] == 400


def test_errors_are_json_even_from_the_request_line(stdlib):
    for data in (b"garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"BREW /v2 HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /v2 HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"):
        st, _, body = parse(stdlib.raw(data, timeout=5))
        assert 400 <= st < 500 and strict_json(body)["error"], (data, st, body)


@pytest.mark.parametrize("kind", SERVERS)
def test_port_in_use_is_one_line(tiny_run, kind):
    if kind == "uvicorn":
        _needs_uvicorn()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "serve", str(tiny_run), "--server", kind,
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and "in use" in p.stderr.lower() and len(p.stderr.splitlines()) == 1


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60) -> "Served":
    """A Served client once the server process `proc` on `port` answers ready (it must not exit first)."""
    s = Served(port)
    deadline = time.time() + timeout
    while True:
        try:
            if s.request("GET", "/v2/health/ready", timeout=2)[0] == 200:
                return s
        except OSError:
            pass
        assert time.time() < deadline and proc.poll() is None, "server did not start"
        time.sleep(0.2)


def test_sigterm_answers_every_request_in_flight(tiny_run):
    """Eight requests whose bodies are still arriving when SIGTERM comes: every one is answered with its
    own rows, new connections are refused, and the server exits 0."""
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "edgexfer.runtime", "serve", str(tiny_run), "--server", "stdlib",
                          "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        s = wait_ready(port, p)
        m = EdgeModel(tiny_run / "model.int8.onnx")
        xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 3, 64, 64)).astype(np.float32) for i in range(8)]
        conns, bodies = [], []
        for x in xs:
            body, headers = binary_infer(x)
            c = s.connect(timeout=30)
            c.sendall(("POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers.items()) + f"Content-Length: {len(body)}\r\n\r\n").encode()
                + body[:len(body) // 2])
            conns.append(c)
            bodies.append(body)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for c, body, x in zip(conns, bodies, xs):
            c.sendall(body[len(body) // 2:])
            st, h, out = parse(read_all(c))
            c.close()
            assert st == 200, out
            n = int(h[HEADER.lower()])
            np.testing.assert_allclose(np.frombuffer(out[n:], "<f4").reshape(len(x), 3), m.run(x)["label"], atol=1e-5)
        assert p.wait(timeout=30) == 0
        assert b"Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- the bounds: mixed load, memory ----------------------------------------------------------------

HOSTILE = [
    lambda s: s.request("POST", "/v2/models/tiny/classify", png(Image.new("1", (20000, 20000)))),
    lambda s: s.request("POST", "/v2/models/tiny/classify", png(Image.new("L", (1, 4000)))),
    lambda s: s.request("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [{
        "name": "input", "shape": [2**54, 3, 64, 64], "datatype": "FP32", "parameters": {"binary_data_size": 0}}]}
    ).encode(), {HEADER: "200"}),
    lambda s: parse(s.raw(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", timeout=10)),
    lambda s: parse(s.raw(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
                          half_close=True)),
    lambda s: parse(s.raw(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\nxx",
                          half_close=True)),
    lambda s: s.request("POST", "/v2/models/tiny/infer", b"\xff" * 300_000),
    lambda s: s.request("GET", "/v2/models/tiny/%0A%1b"),
]


@pytest.mark.parametrize("kind", SERVERS)
def test_valid_requests_never_fail_beside_hostile_ones(kind, tiny_run):
    """32 clients for a few seconds, a third of them hostile: every valid request gets its own rows,
    no hostile one gets a 5xx."""
    m = EdgeModel(tiny_run / "model.int8.onnx")
    xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 3, 64, 64)).astype(np.float32) for i in range(8)]
    want = [m.run(x)["label"] for x in xs]
    failures, counts = [], {"valid": 0, "hostile": 0}
    with serving(kind, resolve_models([tiny_run]), access_log=False) as s:
        deadline = time.time() + 4

        def client(k: int):
            i = k
            while time.time() < deadline:
                i += 1
                try:
                    if k % 3 == 0:
                        try:
                            st, _, body = HOSTILE[i % len(HOSTILE)](s)
                        except (AssertionError, ConnectionResetError):  # no answer: refused at the connection
                            st, body = 0, b""
                        counts["hostile"] += 1
                        if st >= 500:
                            failures.append(("hostile", i % len(HOSTILE), st, body[:200]))
                    else:
                        body, headers = binary_infer(xs[i % 8])
                        st, h, out = s.request("POST", "/v2/models/tiny/infer", body, headers)
                        counts["valid"] += 1
                        n = int(h[HEADER.lower()])
                        got = np.frombuffer(out[n:], "<f4").reshape(want[i % 8].shape)
                        if st != 200 or not np.allclose(got, want[i % 8], atol=1e-5):
                            failures.append(("valid", st, out[:200]))
                except Exception as e:  # noqa: BLE001 - a failed request of either kind
                    failures.append(("error", k % 3 == 0, repr(e)))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert s.request("GET", "/v2/health/ready")[0] == 200
    assert not failures, failures[:5]
    assert counts["valid"] >= 32 and counts["hostile"] >= 8, counts


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.parametrize("kind", SERVERS)
def test_memory_under_body_and_image_attacks_is_bounded(kind, tiny_run):
    """The server's peak RSS (VmHWM) grows by about its limits, not by what is sent: 24 clients each
    sending an 8 MiB body at once against --max-inflight-mib 32 (192 MiB sent); then 16 clients each
    sending a 3000x3000 PNG (9 M pixels, 36 MB decoded) at once, decoded at most min(4, cores) at a time."""
    import os

    if kind == "uvicorn":
        _needs_uvicorn()
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "edgexfer.runtime", "serve", str(tiny_run), "--server", kind,
                          "--port", str(port), "--threads", "1", "--no-access-log", "--max-inflight-mib", "32",
                          "--max-image-pixels", "10000000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        s = wait_ready(port, p)
        small = png(Image.new("RGB", (300, 300), (200, 30, 30)))
        assert s.request("POST", "/v2/models/tiny/classify", small)[0] == 200  # warm: first decode, first run
        body, headers = binary_infer(np.zeros((1, 3, 64, 64), np.float32))
        assert s.request("POST", "/v2/models/tiny/infer", body, headers)[0] == 200
        base = _peak_rss_mib(p.pid)

        def attack(n: int, send) -> list:
            out: list = [None] * n

            def one(i):
                try:
                    out[i] = send()[0]
                except OSError as e:
                    out[i] = repr(e)
            ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
            return out

        big = b"\xff" * (8 << 20)
        got = attack(24, lambda: s.request("POST", "/v2/models/tiny/infer", big, timeout=60))
        assert set(got) <= {400, 503} and 503 in got, got
        bodies = _peak_rss_mib(p.pid) - base
        assert bodies < 32 + 40, f"peak RSS grew {bodies:.0f} MiB under 192 MiB of bodies (cap 32 MiB)"

        image = png(Image.new("RGB", (3000, 3000), (10, 200, 10)))
        got = attack(16, lambda: s.request("POST", "/v2/models/tiny/classify", image, timeout=120))
        assert set(got) == {200}, got
        images = _peak_rss_mib(p.pid) - base
        workers = max(1, min(4, os.cpu_count() or 1))
        assert images < workers * 36 * 1.5 + 40, f"peak RSS grew {images:.0f} MiB decoding 16 x 36 MB ({workers} at a time)"
        assert s.request("GET", "/v2/health/ready")[0] == 200
    finally:
        p.terminate()
        p.wait(30)


def test_header_cache_keeps_only_short_headers(tiny_run):
    """The binary-extension header cache is keyed by the header's bytes: 64 padded 16 MiB headers would
    have held 1 GB. Headers over MAX_CACHED_HEADER bytes are checked, not kept."""
    from edgexfer.runtime.protocol import MAX_CACHED_HEADER, HeaderCache, parse_infer

    m = EdgeModel(tiny_run / "model.int8.onnx")
    cache = HeaderCache()
    x = np.zeros((1, 3, 64, 64), np.float32)
    for pad in (0, MAX_CACHED_HEADER):
        head = json.dumps({"id": "x" * pad, "inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                                        "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        got, h = parse_infer(head + x.tobytes(), str(len(head)), m, cache)
        assert got.shape == (1, 3, 64, 64) and h.req["id"] == "x" * pad
    assert len(cache) == 1 and all(len(k) <= MAX_CACHED_HEADER for k in cache)
