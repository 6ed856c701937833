"""Issue 26's bounds that needed more than a bounded parser: a multipart flood is refused from the first
bytes of its body, before the rest is read (`multipart.PartScanner`, on both REST servers: 400 with
Connection: close); valid uploads, chunked or not, keep their keep-alive connection. Counting bytes, not
time: a flood is answered while most of its declared body was never sent. After a burst of large requests
nothing keeps one (the inference thread's last batch, a gRPC refusal's frames; ONNX Runtime's arenas grown by
large inputs are shrunk once quiet) and glibc's trim threshold is fixed (`tune_malloc`). A tiny ONNX model, raw sockets on
127.0.0.1."""
import http.client
import socket

import pytest

from edgexfer.runtime.multipart import MAX_PART_HEAD, MAX_PARTS, PartScanner, boundary, parts
from edgexfer.runtime.protocol import HTTPError
from tests.test_serve_hostile_uploads import B, CTYPE, curl_body, flood, models, png_bytes  # noqa: F401 (fixture)
from tests.test_serve_framing import SERVERS, parse, serving


def fed(body: bytes, piece: int) -> tuple[int, list]:
    """Feed `body` `piece` bytes at a time into a growing buffer: (bytes fed when it refused or ended,
    the parts found)."""
    scan, buf = PartScanner(boundary(CTYPE)), bytearray()
    for i in range(0, len(body), piece):
        buf += body[i:i + piece]
        try:
            found = scan.feed(buf, len(buf), final=len(buf) == len(body))
        except HTTPError as e:
            assert e.status == 400 and "\n" not in str(e)
            return len(buf), [str(e)]
    return len(buf), found


def test_scanner_refuses_from_a_prefix():
    big = flood(100_000)
    got, why = fed(big, 512)
    assert f"more than {MAX_PARTS} parts" in why[0] and got <= (MAX_PARTS + 2) * 70 + 512, got
    header_flood = f"--{B}\r\n".encode() + b"X-A: b\r\n" * 100_000
    got, why = fed(header_flood, 1024)
    assert str(MAX_PART_HEAD) in why[0] and got <= MAX_PART_HEAD + 2048, got
    bad_line = f"--{B}junk\r\n".encode() + b"x" * 100_000
    got, why = fed(bad_line, 1024)
    assert "CRLF" in why[0] and got <= 1024


@pytest.mark.parametrize("piece", [1, 7, 64, 1 << 16])
def test_scanner_finds_what_parts_finds(piece):
    img = png_bytes()
    for body in (curl_body(img), b"preamble\r\n" + curl_body(img) + b"epilogue",
                 curl_body(img) + flood(50),  # delimiters in the epilogue are ignored, not counted
                 flood(MAX_PARTS - 1)[:-len(f"--{B}--\r\n")] + curl_body(img)):
        assert fed(body, piece)[1] == parts(body, B.encode())


def send_head(s: socket.socket, length: int | None, ctype: str = CTYPE, keep: bool = False) -> None:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    s.sendall(f"POST /v2/models/tiny/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{framing}\r\n"
              f"{'' if keep else 'Connection: close'}\r\n\r\n".encode())


def answer_then_eof(s: socket.socket) -> tuple[int, dict, bytes]:
    out = b""
    while True:
        try:
            b = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not b:
            break
        out += b
    return parse(out)


@pytest.mark.parametrize("kind", SERVERS)
def test_flood_answered_before_its_body_is_sent(kind, models):  # noqa: F811
    """A 6.5 MB flood of which 64 KiB is sent: the 400 comes anyway (its rest was never waited for), then
    the connection closes."""
    big = flood(100_000)
    with serving(kind, models, access_log=False) as srv:
        with srv.connect() as s:
            send_head(s, len(big), keep=True)
            s.sendall(big[:1 << 16])
            st, h, out = answer_then_eof(s)
        assert st == 400 and f"more than {MAX_PARTS} parts" in out.decode() and h.get("connection") == "close", (st, h, out)
        if kind == "stdlib":  # a chunked flood too
            with srv.connect() as s:
                send_head(s, None, keep=True)
                s.sendall(b"%x\r\n%s\r\n" % (1 << 16, big[:1 << 16]))
                st, h, out = answer_then_eof(s)
            assert st == 400 and h.get("connection") == "close", (st, h, out)
        # a valid upload (Content-Length, then chunked) and a raw-bytes body on one keep-alive connection
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        img = png_bytes()
        for body, headers in ((curl_body(img), {"Content-Type": CTYPE}),
                              (iter([curl_body(img)[:50], curl_body(img)[50:]]), {"Content-Type": CTYPE}),
                              (img, {"Content-Type": "application/octet-stream"})):
            c.request("POST", "/v2/models/tiny/classify?top_k=1", body, headers,
                      encode_chunked=not isinstance(body, bytes))
            r = c.getresponse()
            assert r.status == 200 and r.getheader("connection") != "close", (r.status, r.read())
            r.read()
        c.close()


# -- memory after a burst: nothing keeps a request's bytes, and freed heaps go back to the OS -------

def test_refused_flood_counts_only_its_bytes_read_towards_a_trim():
    from edgexfer.runtime.protocol import TRIM_AFTER, BodyBudget

    b = BodyBudget(1 << 30)
    b.take(TRIM_AFTER)
    b.give(TRIM_AFTER, 64 * 1024)  # declared 64 MB, read 64 KiB: nothing to trim
    assert b.released == 64 * 1024 and not b._trim_wanted and b.used == 0


def test_batcher_keeps_no_request_once_answered():
    """The inference thread drops its last batch before waiting for the next (it held a 16 MB request)."""
    import asyncio
    import weakref

    import numpy as np

    from edgexfer.runtime.batcher import BatchConfig, DynamicBatcher

    class Fake:
        def run(self, x):
            return {"logits": np.zeros((len(x), 2), np.float32)}

    async def go():
        b = DynamicBatcher(Fake(), BatchConfig(max_batch_size=8, max_queue_delay_ms=1, timeout_s=10))
        b.start()
        x = np.ones((3, 4), np.float32)
        ref = weakref.ref(x)
        out = await b.submit(x)
        del x, out
        for _ in range(100):  # the thread lets go after handing the answer to the loop
            if ref() is None:
                break
            await asyncio.sleep(0.01)
        alive = ref() is not None
        await b.stop()
        return alive

    assert not asyncio.run(go())


def test_arenas_grown_by_large_inputs_are_shrunk_once(models):  # noqa: F811
    import numpy as np

    from edgexfer.runtime.model import SHRINK_AFTER_BYTES, EdgeModel, shrink_arenas

    m = EdgeModel(next(iter(models.values())), threads=1)
    shrink_arenas()  # (others' from earlier tests)
    seen = []
    real = m.session.run
    m.session = type("S", (), {"run": lambda self, *a: (seen.append(a[2] if len(a) > 2 else None), real(*a))[1]})()
    m.run(np.zeros((1, *m.input_shape), np.float32))
    assert shrink_arenas() == 0  # a small input: nothing to give back, no extra run
    rows = SHRINK_AFTER_BYTES // (4 * int(np.prod(m.input_shape))) + 1
    m.run(np.zeros((rows, *m.input_shape), np.float32))
    assert shrink_arenas() == 1 and shrink_arenas() == 0
    assert seen[:2] == [None, None] and len(seen) == 3
    assert seen[2].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


def test_grpc_refusal_keeps_no_request_bytes(models):  # noqa: F811
    """grpc keeps an abort's exception, and with it the handler's frames: the request's bytes are gone from
    them (a 16 MB request held until the next call)."""
    pytest.importorskip("grpc")
    import asyncio

    from edgexfer.runtime.dataplane import DataPlane
    from edgexfer.runtime.grpc_server import Servicer
    from tests.test_serve_hostile_uploads import infer_request

    class Aborted(Exception):
        pass

    class Context:
        def invocation_metadata(self):
            return ()

        def peer(self):
            return "test"

        async def abort(self, code, message):
            raise Aborted(code, message)

    data = infer_request("nope", 64)
    servicer = Servicer(DataPlane(models, 1, access_log=False), {})
    with pytest.raises(Aborted) as e:
        asyncio.run(servicer.ModelInfer(data, Context()))
    assert e.value.args[0].name == "NOT_FOUND"
    held = []
    tb = e.value.__traceback__
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_filename.endswith("grpc_server.py"):
            held += [f.f_code.co_name for v in f.f_locals.values() if v is data]
        tb = tb.tb_next
    assert not held, held


def test_tune_malloc_fixes_the_trim_threshold():
    import os
    import subprocess
    import sys

    code = "from edgexfer.runtime.protocol import tune_malloc; print(tune_malloc())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "EDGEXFER_MALLOC_TRIM": "0"})
    import ctypes.util
    glibc = "libc.so" in (ctypes.util.find_library("c") or "") and os.uname().sysname == "Linux"
    assert on.stdout.strip() == str(glibc) and off.stdout.strip() == "False", (on, off)
