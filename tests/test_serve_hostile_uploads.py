"""Issue 26, hardening round two: bounded work per request. Multipart uploads are parsed in bounded,
linear work on both REST servers (part floods, RFC 2231 header floods and deep nesting are 400 at once,
never 500); the gRPC front end shares the REST in-flight byte budget (RESOURCE_EXHAUSTED past it, NOT_FOUND
for an unknown model before any tensor is decoded) and answers a malformed message INVALID_ARGUMENT with one
access-log line; the standard-library server closes a connection whose request head is slower than its
head timeout and, when full, gives the slot of the connection that has waited longest for a head to a new
one. A tiny ONNX model (tests/_onnx_model.py), no training run; raw sockets and channels on 127.0.0.1."""
import contextlib
import io
import logging
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.multipart import MAX_PART_HEAD, MAX_PARTS, multipart_file
from edgexfer.runtime.protocol import HTTPError
from edgexfer.runtime.server import make_server, resolve_models
from tests._onnx_model import good_meta, onnx_bytes
from tests.test_serve_framing import SERVERS, parse, read_all, serving

B = "XyZzy"
CTYPE = f"multipart/form-data; boundary={B}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    f = tmp_path_factory.mktemp("hostile") / "tiny.onnx"
    f.write_bytes(onnx_bytes(good_meta()))
    return resolve_models([f])


def png_bytes() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(b, "PNG")
    return b.getvalue()


def curl_body(data: bytes, field: str = "image", extra: str = "") -> bytes:
    """What `curl -F image=@x.png` sends."""
    return (f"--{B}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n{extra}\r\n").encode() + data + f"\r\n--{B}--\r\n".encode()


def flood(parts: int) -> bytes:
    """`parts` tiny form fields (the issue's probe: 10,000 of them in 0.55 MB)."""
    one = f"--{B}\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n".encode()
    return one * parts + f"--{B}--\r\n".encode()


def rfc2231_header(n: int = 20000) -> str:
    """A Content-Type with `n` RFC 2231 continuations of its boundary (the issue's: 20,000, 289 KB)."""
    return "multipart/form-data; " + "; ".join(f"boundary*{i}=x{i}" for i in range(n))


def nested(depth: int) -> tuple[bytes, str]:
    """A form-data part holding multipart/mixed holding multipart/mixed ... `depth` deep, an image inside."""
    body, inner = curl_body(png_bytes()), B
    for d in range(depth):
        b = f"n{d}"
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"\r\n"
                f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n").encode() + body + f"\r\n--{b}--\r\n".encode()
        inner = b
    return body, f"multipart/form-data; boundary={inner}"


def refused(body: bytes, ctype: str) -> str:
    with pytest.raises(HTTPError) as e:
        multipart_file(body, ctype)
    assert e.value.status == 400 and "\n" not in str(e.value)
    return str(e.value)


# -- the parser ------------------------------------------------------------------------------------

def test_what_curl_sends_is_read():
    img = png_bytes() + b"\r\n--XyZ not the boundary\r\n"
    assert multipart_file(curl_body(img), CTYPE) == img
    assert multipart_file(curl_body(img), f'Multipart/Form-Data; charset=utf-8; boundary="{B}"') == img
    assert multipart_file(b"preamble\r\n" + curl_body(img) + b"epilogue", CTYPE) == img
    other = f"--{B}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n".encode()
    assert multipart_file(other + curl_body(img, field="file"), CTYPE) == img  # the first part with a filename
    semi = curl_body(img).replace(b'filename="x.png"', b'filename="a;b \\"c\\".png"')
    assert multipart_file(semi, CTYPE) == img
    assert multipart_file(curl_body(img, extra="Content-Transfer-Encoding: binary\r\n"), CTYPE) == img
    assert multipart_file(flood(MAX_PARTS - 1)[:-len(f"--{B}--\r\n")] + curl_body(img), CTYPE) == img


def test_malformed_uploads_are_one_line_400():
    img = png_bytes()
    assert "base64" in refused(curl_body(img, extra="Content-Transfer-Encoding: base64\r\n"), CTYPE)
    assert "boundary" in refused(curl_body(img), "multipart/form-data")
    assert "boundary" in refused(curl_body(img), "multipart/form-data; boundary=")
    assert "two boundary" in refused(curl_body(img), CTYPE + "; boundary=other")
    assert "closing boundary" in refused(curl_body(img)[:-12], CTYPE)
    assert "without its boundary" in refused(b"no delimiter here", CTYPE)
    assert "without a file" in refused(f"--{B}--\r\n".encode(), CTYPE)
    assert str(MAX_PART_HEAD) in refused(f"--{B}\r\n".encode() + b"X-A: b\r\n" * 1200 + b"\r\nx\r\n--" + B.encode()
                                         + b"--", CTYPE)
    assert "parameters" in refused(curl_body(img), CTYPE + "; a=b" * 20)
    assert "header" in refused(curl_body(img).replace(b"Content-Type: image/png", b" folded"), CTYPE)


def test_floods_are_refused_after_a_bounded_prefix():
    """Counting work, not time: a part flood is refused once MAX_PARTS + 1 parts are seen, whatever follows
    (the stdlib MIME parser spent ~0.6 ms per part, 5 s per body under load)."""
    small, large = flood(10_000), flood(100_000)
    assert 0.5e6 < len(small) < 0.6e6 and 5e6 < len(large) < 6e6
    assert f"more than {MAX_PARTS} parts" in refused(small, CTYPE)

    class Counting(bytes):
        finds = 0

        def find(self, *a):
            Counting.finds += 1
            return super().find(*a)

    refused(Counting(large), CTYPE)
    assert Counting.finds <= 4 * (MAX_PARTS + 2), Counting.finds
    t = time.perf_counter()
    for body in (small, large):
        refused(body, CTYPE)
    refused(curl_body(png_bytes()), rfc2231_header())
    assert time.perf_counter() - t < 0.5  # the old parser: 11 s for the header alone


def test_rfc2231_and_nesting_are_400():
    ctype = rfc2231_header()
    assert 250_000 < len(ctype) < 500_000
    assert "characters" in refused(curl_body(png_bytes()), ctype)
    assert "RFC 2231" in refused(curl_body(png_bytes()), "multipart/form-data; boundary*0=a; boundary*1=b")
    body, ctype = nested(2000)
    assert "without a file" in refused(body, ctype)  # a nested multipart part is not a file


# -- both REST servers -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SERVERS)
def test_hostile_uploads_on_both_servers(kind, models, capfd):
    """The issue's probes against each server: 400 (or 431 for a header line over the server's own cap),
    quickly, no 500, no traceback, and a valid upload still answered."""
    from tests.test_fuzz import Errors  # (test_fuzz imports this module's fixtures)

    nest, nest_type = nested(2000)
    cases = [(flood(10_000), CTYPE), (flood(100_000), CTYPE), (nest, nest_type),
             (curl_body(png_bytes()), rfc2231_header(3000)),  # under the stdlib server's 64 KiB header line
             (curl_body(png_bytes()), rfc2231_header())]
    with serving(kind, models, access_log=False) as s, Errors() as errors:
        for body, ctype in cases:
            t = time.perf_counter()
            st, _, out = s.request("POST", "/v2/models/tiny/classify", body, {"Content-Type": ctype})
            assert st in (400, 431) and time.perf_counter() - t < 2.0, (st, out[:200], len(body), len(ctype))
            assert st == 431 or b"internal" not in out
        st, _, out = s.request("POST", "/v2/models/tiny/classify?top_k=2", curl_body(png_bytes()),
                               {"Content-Type": CTYPE})
        assert st == 200, out
        assert not errors.records, errors.records[:3]
    assert "Traceback" not in capfd.readouterr().err


# -- the standard-library server: slow heads -------------------------------------------------------

@contextlib.contextmanager
def stdlib_server(models, **kw):
    httpd = make_server(models, port=0, threads=1, access_log=False, **kw)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> tuple[float, bytes]:
    """Send `drip` a byte every 0.1 s until the server closes; (seconds taken, what it answered)."""
    t, got = time.monotonic(), b""
    sock.settimeout(0.1)
    while time.monotonic() - t < seconds:
        try:
            if drip:
                sock.sendall(drip[:1])
                drip = drip[1:] or b"x"
            b = sock.recv(4096)
            if not b:
                return time.monotonic() - t, got
            got += b
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t, got
    raise AssertionError(f"still open after {seconds} s")


def test_slow_head_is_closed_after_the_head_timeout(models):
    with stdlib_server(models, head_timeout_s=0.5) as httpd:
        port = httpd.server_address[1]
        with socket.create_connection(("127.0.0.1", port)) as c:  # one header byte every 0.1 s
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            took, got = closed_within(c, 5.0, b"X-Slow: " + b"a" * 1000)
        assert 0.4 < took < 3.0 and parse(got)[0] == 408, (took, got[:200])
        with socket.create_connection(("127.0.0.1", port)) as c:  # idle keep-alive after one answer
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            took, got = closed_within(c, 5.0)
            assert parse(got)[0] == 200 and took < 3.0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # a prompt request is unaffected
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert parse(read_all(c))[0] == 200


def test_slow_heads_cannot_hold_every_slot(models):
    """Every slot held by a connection sending its head a byte at a time: a new connection takes the slot
    of the one that has waited longest, so a valid request is answered 200, not 503."""
    with stdlib_server(models, head_timeout_s=30, max_connections=4) as httpd:
        port = httpd.server_address[1]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            for c in slow:
                c.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: a")
            time.sleep(0.3)
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    st, _, body = parse(read_all(c))
                    assert st == 200, body
            assert httpd.evicted == 1  # the first probe took a slow slot; the next found it free again
        finally:
            for c in slow:
                c.close()


# -- gRPC: the byte budget, malformed messages ----------------------------------------------------

@pytest.fixture(scope="module")
def grpc_served(models):
    """REST and gRPC in one uvicorn server, sharing a 1 MiB in-flight budget: (gRPC address, app)."""
    pytest.importorskip("grpc")
    pytest.importorskip("uvicorn")
    from edgexfer.runtime.oip import BatchConfig, create_app
    from tests._live import live_with_grpc

    app = create_app(models, threads=1, max_bytes_in_flight=1 << 20,
                     batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=1))
    with live_with_grpc(app) as (grpc_address, _):
        yield grpc_address, app


def grpc_call(address: str, method: str, data: bytes):
    """`data` as the serialized request of `method`; (status code name, details, response bytes)."""
    import grpc

    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            return "OK", "", call(data, timeout=30)
        except grpc.RpcError as e:
            return e.code().name, e.details(), b""


def infer_request(model: str, rows: int) -> bytes:
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb

    x = np.random.default_rng(0).standard_normal((rows, 3, 8, 8)).astype("<f4")
    return pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()]).SerializeToString()


def test_grpc_malformed_message_is_invalid_argument(grpc_served, caplog, capfd):
    from tests.test_fuzz import Errors

    address, _ = grpc_served
    caplog.set_level(logging.INFO, logger="edgexfer.access")
    with Errors() as errors:
        for method, data in [("ModelInfer", b"\xff\xff\xff\xff"), ("ModelInfer", b"\x0a\x7ftiny"),
                             ("ModelInfer", b"\x0a\x04tiny\x3a\x05ab"), ("ModelMetadata", b"\x0a\xff\xff"),
                             ("ModelReady", b"\x08")]:
            caplog.clear()
            code, details, _ = grpc_call(address, method, data)
            assert code == "INVALID_ARGUMENT" and details.startswith(f"malformed {method} request"), (code, details)
            time.sleep(0.05)
            lines = [r.getMessage() for r in caplog.records if r.name == "edgexfer.access"]
            assert len(lines) == 1 and f"{method}\" 400" in lines[0], lines
        assert not errors.records, errors.records[:3]
    assert "Traceback" not in capfd.readouterr().err


def test_grpc_requests_share_the_byte_budget(grpc_served):
    """Over the 1 MiB budget: RESOURCE_EXHAUSTED before anything is decoded; an unknown model NOT_FOUND
    before its tensor is; the budget is whole again after each, and a request within it is answered."""
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb

    address, app = grpc_served
    big = infer_request("tiny", 2048)  # 1.5 MiB
    code, details, _ = grpc_call(address, "ModelInfer", big)
    assert code == "RESOURCE_EXHAUSTED" and "retry later" in details, (code, details)
    assert grpc_call(address, "ModelInfer", infer_request("nope", 1000))[0] == "NOT_FOUND"
    code, _, out = grpc_call(address, "ModelInfer", infer_request("tiny", 3))
    assert code == "OK"
    r = pb.ModelInferResponse.FromString(out)
    assert list(r.outputs[0].shape) == [3, 10] and len(r.raw_output_contents[0]) == 3 * 10 * 4
    assert app.budget.used == 0


def test_split_infer_reads_tensors_in_place():
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb
    from edgexfer.runtime.grpc_server import split_infer

    data = infer_request("tiny", 2)
    req, raw = split_infer(data)
    want = pb.ModelInferRequest.FromString(data)
    assert req.model_name == "tiny" and list(req.inputs[0].shape) == [2, 3, 8, 8] and not req.raw_input_contents
    assert len(raw) == 1 and raw[0].obj is data and bytes(raw[0]) == want.raw_input_contents[0]
