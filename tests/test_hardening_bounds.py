"""Issue 26's bounds that needed more than a bounded parser: a multipart flood is refused from the first
bytes of its body, before the rest is read (`multipart.PartScanner`, on both REST servers: 400 with
Connection: close); valid uploads, chunked or not, keep their keep-alive connection. Counting bytes, not
time: a flood is answered while most of its declared body was never sent. A tiny ONNX model, raw sockets
on 127.0.0.1."""
import http.client
import socket

import pytest

from edgexfer.runtime.multipart import MAX_PART_HEAD, MAX_PARTS, PartScanner, boundary, parts
from edgexfer.runtime.protocol import HTTPError
from tests.test_hardening_hostile import B, CTYPE, curl_body, flood, models, png_bytes  # noqa: F401 (fixture)
from tests.test_hardening_server import SERVERS, parse, serving


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
