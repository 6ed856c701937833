"""Issue 13: fuzzing, bounded in time (hypothesis, a fixed number of examples, no deadline, derandomized).

- the HTTP surface of both servers (the standard-library one and the batching one): methods, paths,
  query strings, headers (framing included: Content-Length exact, missing, short, long or garbage;
  chunked or another transfer coding), shapes, datatypes and bodies (JSON and binary infer requests,
  images, multipart uploads, random bytes). No 5xx, every well-framed request answered, no traceback
  or error logged, and the server still answers correctly afterwards.
- the metadata a model file carries (JSON mutated field by field): the model is refused with one
  `MetadataError` line, or it loads and then predicts, decodes and describes itself as valid JSON.
"""
import io
import json
import logging
import socket
import string
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgexfer.runtime import EdgeModel, MetadataError
from edgexfer.runtime.protocol import infer_response, model_metadata, parse_infer
from edgexfer.runtime.server import resolve_models
from tests._onnx_model import good_meta, onnx_bytes
from tests.test_serve_framing import parse, read_all, serving

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

# -- the HTTP surface ------------------------------------------------------------------------------

PATHS = ["/v2/models/tiny/infer", "/v2/models/tiny/classify", "/v2/models/tiny", "/v2/models/tiny/ready",
         "/v2/models/tiny/versions/1/infer", "/v2/models/nope/infer", "/v2/models/nope/classify", "/v2",
         "/v2/health/live", "/v2/health/ready", "/metrics", "/v2/openapi.json", "/", "/v2/models/tiny/infer/"]

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), c, max_size=4)),
                          max_leaves=12)
dims = st.one_of(st.sampled_from([1, 2, 3, 64, 0, -1, 2**31, 2**54, 2**63, 2**64]), st.integers(-2**70, 2**70),
                 json_scalar)
shape = st.one_of(st.just([1, 3, 64, 64]), st.just([2, 3, 64, 64]), st.lists(dims, max_size=6),
                  st.lists(dims, min_size=4, max_size=4).map(lambda s: [s[0], 3, 64, 64]), json_value)
datatype = st.one_of(st.sampled_from(["FP32", "FP16", "INT8", "BYTES", "fp32", "UINT8"]), json_scalar)


@st.composite
def infer_request(draw):
    """(body, extra headers): a v2 infer request, JSON or binary, more or less right."""
    shp = draw(shape)
    tensor = {"name": draw(st.one_of(st.just("input"), st.text(max_size=6), json_scalar)), "shape": shp,
              "datatype": draw(datatype)}
    binary = draw(st.booleans())
    n = 1
    if isinstance(shp, list) and all(isinstance(d, int) and 0 <= d <= 64 for d in shp):
        n = int(np.prod(shp, dtype=np.int64)) if shp else 0
    n = min(n, 3 * 64 * 64 * 2)
    if binary:
        size = draw(st.one_of(st.sampled_from([4 * n, 0]), st.integers(-2**70, 2**70), json_scalar))
        tensor["parameters"] = draw(st.one_of(st.just({"binary_data_size": size}), json_value))
    else:
        tensor["data"] = draw(st.one_of(st.just([0.5] * n), st.lists(json_scalar, max_size=8), json_value))
    req = {"inputs": draw(st.one_of(st.just([tensor]), st.just([tensor, tensor]), json_value))}
    if draw(st.booleans()):
        req["outputs"] = draw(st.one_of(st.just([{"name": "logits", "parameters": {"binary_data": True}}]),
                                        json_value))
    if draw(st.booleans()):
        req["id"] = draw(json_scalar)
    head = json.dumps(req).encode()
    if not binary:
        return head, {}
    data = np.random.default_rng(0).standard_normal(n).astype("<f4").tobytes()
    data = draw(st.one_of(st.just(data), st.binary(max_size=64)))
    hlen = draw(st.one_of(st.just(str(len(head))), st.integers(-5, len(head) + len(data) + 5).map(str),
                          st.text(string.printable.strip(), max_size=6)))
    return head + data, {"Inference-Header-Content-Length": hlen}


def png_bytes(w: int, h: int, mode: str) -> bytes:
    b = io.BytesIO()
    Image.new(mode, (w, h)).save(b, "PNG")
    return b.getvalue()


image_body = st.one_of(
    st.builds(png_bytes, st.integers(1, 200), st.integers(1, 200), st.sampled_from(["RGB", "L", "1", "I;16", "RGBA"])),
    st.sampled_from([png_bytes(20000, 20000, "1"), png_bytes(1, 4000, "L"), png_bytes(64, 64, "RGB")[:60]]),
    st.binary(max_size=300))


@st.composite
def request(draw):
    target = draw(st.sampled_from(["infer"] * 4 + ["classify"] * 4 + ["any"] * 2))
    if target == "any":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
        path = draw(st.one_of(st.sampled_from(PATHS),
                              st.text(max_size=20).map(lambda s: "/v2/models/" + quote(s, safe="/%?=&"))))
        kind = draw(st.sampled_from(["infer", "image", "multipart", "bytes", "none"]))
    else:
        method = draw(st.sampled_from(["POST"] * 5 + ["GET"]))
        path = draw(st.sampled_from([f"/v2/models/tiny/{target}"] * 4 + [f"/v2/models/tiny/versions/1/{target}"]))
        kind = draw(st.sampled_from(["infer"] if target == "infer" else ["image", "image", "multipart"]))
    if draw(st.booleans()):
        path += "?top_k=" + quote(draw(st.one_of(st.integers(-3, 10).map(str), st.text(max_size=4))))
    headers = {}
    if kind == "infer":
        body, headers = draw(infer_request())
    elif kind == "image":
        body = draw(image_body)
    elif kind == "multipart":
        boundary = draw(st.sampled_from(["b0undary", "x", ""]))
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{draw(st.sampled_from(['image', 'file']))}\"; "
                "filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + draw(image_body)
        body += draw(st.sampled_from([f"\r\n--{boundary}--\r\n".encode(), b""]))
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif kind == "bytes":
        body = draw(st.binary(max_size=2000))
    else:
        body = b""
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "application/octet-stream",
                                                        "multipart/form-data", "image/png", "text/plain; x=\"y"]))
    if draw(st.integers(0, 9)) == 0:
        headers["Authorization"] = draw(st.sampled_from(["Bearer x", "Basic abc", "Bearer", ""]))
    framing = draw(st.sampled_from(["exact"] * 10 + ["chunked", "missing", "short", "long", "garbage", "te-other",
                                                    "both"]))
    return method, path, headers, body, framing


def encode(method: str, path: str, headers: dict, body: bytes, framing: str) -> tuple[bytes, bool]:
    """The request's bytes, and whether it is well framed (then it must be answered)."""
    h = {"Host": "127.0.0.1", "Connection": "close", **headers}
    well = framing in ("exact", "chunked", "missing")
    if framing == "exact" and body:
        h["Content-Length"] = str(len(body))
    elif framing == "chunked":
        h["Transfer-Encoding"] = "chunked"
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:]) if c) + b"0\r\n\r\n"
    elif framing == "missing":
        body = b""
    elif framing == "short":
        h["Content-Length"] = str(max(0, len(body) - 3))
    elif framing == "long":
        h["Content-Length"] = str(len(body) + 10)
    elif framing == "garbage":
        h["Content-Length"] = "-1" if len(body) % 2 else "abc"
    elif framing == "te-other":
        h["Transfer-Encoding"] = "gzip"
    elif framing == "both":
        h["Transfer-Encoding"], h["Content-Length"] = "chunked", str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1", "replace") + body, well


class Errors(logging.Handler):
    """Every record at ERROR or above, or carrying a traceback, on the loggers both servers use."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self):
        for name in ("", "uvicorn", "edgexfer"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("", "uvicorn", "edgexfer"):
            logging.getLogger(name).removeHandler(self)


@pytest.mark.parametrize("kind", ["stdlib", "uvicorn"])
def test_http_fuzz(kind, tiny_run, image_folder, capfd):
    statuses = []
    with serving(kind, resolve_models([tiny_run]), access_log=False) as s, Errors() as errors:
        @given(req=request())
        @SETTINGS
        def one(req):
            data, well = encode(*req)
            with s.connect(timeout=20) as c:
                try:
                    c.sendall(data)
                    if not well:
                        c.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    assert not well, req
                resp = read_all(c)
            if not resp:
                assert not well, f"no answer to a well-framed request {req!r:.300}"
                return
            st_, h, body = parse(resp)
            statuses.append(st_)
            assert st_ < 500, (st_, body[:300], f"{req!r:.300}")

        one()
        assert s.request("GET", "/v2/health/ready")[0] == 200
        img = next(image_folder.rglob("*.png")).read_bytes()
        st_, _, body = s.request("POST", "/v2/models/tiny/classify?top_k=2", img)
        assert st_ == 200 and len(json.loads(body)["predictions"]) == 2
        assert not errors.records, errors.records[:5]
    assert "Traceback" not in capfd.readouterr().err
    assert len(statuses) >= 50 and {200, 400, 404} <= set(statuses), sorted(set(statuses))


# -- metadata --------------------------------------------------------------------------------------

FIELDS = [("schema",), ("tasks",), ("tasks", 0), ("tasks", 0, "name"), ("tasks", 0, "output"),
          ("tasks", 0, "labels"), ("tasks", 0, "labels", 0), ("input",), ("input", "name"), ("input", "height"),
          ("input", "width"), ("input", "channels"), ("input", "layout"), ("input", "dtype"), ("preprocessing",),
          ("preprocessing", "resize"), ("preprocessing", "crop"), ("preprocessing", "interpolation"),
          ("preprocessing", "color"), ("preprocessing", "scale"), ("preprocessing", "mean"),
          ("preprocessing", "std"), ("preprocessing", "std", 1), ("provenance",), ("metrics",), ("quantization",),
          ("labels",), ("extra",)]
near = st.one_of(st.sampled_from([0, 1, 3, 8, 10, -1, 4096, 8000, 2**63, 0.0, 1e-300, 1e300, float("nan"),
                                  float("inf"), "", "L", "RGB", "bicubic", "NCHW", "float16", [], {}, None, True,
                                  ["a", "b", "c"], [0.0, 0.0, 0.0], [1.0] * 10, [f"c{i}" for i in range(10)]]),
                 json_value)


@st.composite
def metadata(draw):
    d = good_meta()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELDS))
        parent = d
        try:
            for k in path[:-1]:
                parent = parent[k]
            if draw(st.integers(0, 4)) == 0:
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(near)
        except (KeyError, IndexError, TypeError):
            pass
    if draw(st.integers(0, 19)) == 0:
        d = draw(json_value)
    return d


def test_metadata_fuzz():
    outcomes = []
    x = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)

    @given(meta=metadata())
    @SETTINGS
    def one(meta):
        try:
            m = EdgeModel(onnx_bytes(json.dumps(meta)))
        except MetadataError as e:
            assert str(e) and "\n" not in str(e), e
            outcomes.append("refused")
            return
        outcomes.append("loaded")
        pred = m.predict(x, top_k=3)  # a model that loads can be served
        json.dumps(pred, allow_nan=False)
        json.dumps(model_metadata("m", m), allow_nan=False)
        body = json.dumps({"inputs": [{"name": m.input_name, "shape": [1, *m.input_shape], "datatype": "FP32",
                                       "data": [0.1] * int(np.prod(m.input_shape))}]}).encode()
        t, h = parse_infer(body, None, m)
        data, _ = infer_response("m", h, m, m.run(t))
        assert len(json.loads(data)["outputs"][0]["data"]) == len(m.labels)

    one()
    assert outcomes.count("refused") >= 20 and outcomes.count("loaded") >= 5, outcomes


# -- multipart structure (issue 26) ----------------------------------------------------------------

MP_BOUNDARY = "fuzzB0und"
part_header = st.one_of(
    st.sampled_from(['Content-Disposition: form-data; name="image"; filename="x.png"',
                     'Content-Disposition: form-data; name="image"', 'Content-Disposition: form-data; name=file',
                     'Content-Disposition: form-data; name="other"; filename="a;b \\"c\\".png"',
                     "Content-Disposition: form-data; filename*=UTF-8''x.png", "Content-Disposition: attachment",
                     'Content-Disposition: form-data; name="image"; name="x"', "Content-Disposition: form-data; ;;=",
                     'Content-Disposition: form-data; name="unclosed', "Content-Type: image/png",
                     f"Content-Type: multipart/mixed; boundary={MP_BOUNDARY}", "Content-Type: multipart/mixed",
                     "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: binary", " folded", "no colon",
                     "X-Long: " + "a" * 9000, ":empty name"]),
    st.text(st.characters(codec="latin-1"), max_size=30))
part_content = st.one_of(st.binary(max_size=40), st.sampled_from([
    f"\r\n--{MP_BOUNDARY}".encode(), f"--{MP_BOUNDARY}--".encode(), b"\r\n\r\n", png_bytes(3, 2, "RGB")]))
content_type = st.one_of(
    st.just(f"multipart/form-data; boundary={MP_BOUNDARY}"),
    st.sampled_from([f"multipart/form-data; boundary={MP_BOUNDARY}", f'multipart/form-data; boundary="{MP_BOUNDARY}"',
                     f"MULTIPART/FORM-DATA;boundary={MP_BOUNDARY}; charset=utf-8", "multipart/form-data",
                     "multipart/form-data; boundary=", f"multipart/form-data; boundary*0={MP_BOUNDARY}",
                     f"multipart/form-data; boundary={MP_BOUNDARY}; boundary=x", "multipart/form-data; boundary=" + "b" * 80,
                     "multipart/form-data; " + "; ".join(f"boundary*{i}=x" for i in range(3000)),
                     f"multipart/form-data; boundary={MP_BOUNDARY}" + "; a=b" * 20]),
    st.text(max_size=60).map(lambda t: "multipart/form-data; " + t))


@st.composite
def multipart_body(draw):
    """(body, Content-Type, the image part's content when the body is well formed, else None)."""
    ctype = draw(content_type) if draw(st.integers(0, 2)) == 0 else f"multipart/form-data; boundary={MP_BOUNDARY}"
    good = ['Content-Disposition: form-data; name="image"; filename="x.png"', "Content-Type: image/png"]
    parts = draw(st.lists(st.tuples(st.one_of(st.just(good), st.lists(part_header, max_size=4)),
                                    st.one_of(st.binary(max_size=40), part_content)), max_size=20))
    dash = f"--{MP_BOUNDARY}".encode()
    sep = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"  \r\n", b"x\r\n", b""]))
    body = draw(st.sampled_from([b"", b"preamble\r\n"]))
    for headers, content in parts:
        body += dash + sep + b"".join(h.encode("latin-1", "replace") + b"\r\n" for h in headers) + b"\r\n"
        body += content + b"\r\n"
    body += draw(st.sampled_from([dash + b"--\r\n", dash + b"--", b"", dash]))
    if draw(st.integers(0, 3)) == 0:  # a few bytes changed
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(0, len(body) - 1)))
            body = body[:i] + draw(st.binary(max_size=3)) + body[i + draw(st.integers(0, 3)):]
    return body, ctype


def test_multipart_fuzz():
    """The upload parser on mutated structure: bytes or a one-line 400, never another exception; bounded."""
    from edgexfer.runtime.multipart import multipart_file
    from edgexfer.runtime.protocol import HTTPError

    outcomes = []

    @given(case=multipart_body())
    @SETTINGS
    def one(case):
        body, ctype = case
        try:
            got = multipart_file(body, ctype)
        except HTTPError as e:
            assert e.status == 400 and str(e) and "\n" not in str(e), e
            outcomes.append("400")
            return
        assert isinstance(got, bytes) and len(got) <= len(body)
        outcomes.append("file")

    one()
    assert outcomes.count("400") >= 20 and outcomes.count("file") >= 3, outcomes


def test_multipart_well_formed_roundtrip():
    """A well-formed body of up to 16 parts: the part named image comes back exactly, whatever it holds."""
    from edgexfer.runtime.multipart import MAX_PARTS, multipart_file

    @given(before=st.integers(0, MAX_PARTS - 1), data=st.binary(max_size=200), quoted=st.booleans())
    @SETTINGS
    def one(before, data, quoted):
        if f"\r\n--{MP_BOUNDARY}".encode() in b"\r\n" + data + b"\r\n":
            return
        other = f'--{MP_BOUNDARY}\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'.encode()
        body = other * before + (f'--{MP_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
                                 f'filename="x.png"\r\nContent-Type: image/png\r\n\r\n').encode() + data
        body += f"\r\n--{MP_BOUNDARY}--\r\n".encode()
        b = f'"{MP_BOUNDARY}"' if quoted else MP_BOUNDARY
        assert multipart_file(body, f"multipart/form-data; boundary={b}") == data

    one()


# -- gRPC messages (issue 26) ----------------------------------------------------------------------

from tests.test_serve_hostile_uploads import grpc_served, models  # noqa: E402,F401 (fixtures)

GRPC_METHODS = ["ModelInfer"] * 6 + ["ModelMetadata", "ModelReady", "ServerMetadata", "ServerLive"]


@st.composite
def grpc_message(draw):
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb

    rows = draw(st.integers(0, 3))
    x = np.zeros((rows, 3, 8, 8), "<f4")
    t = pb.ModelInferRequest.InferInputTensor(name=draw(st.sampled_from(["input", "x", ""])),
                                              datatype=draw(st.sampled_from(["FP32", "FP32", "INT8", ""])),
                                              shape=draw(st.one_of(st.just(list(x.shape)),
                                                                   st.lists(st.integers(-2, 2**40), max_size=5))))
    req = pb.ModelInferRequest(model_name=draw(st.sampled_from(["tiny", "tiny", "nope", ""])),
                               model_version=draw(st.sampled_from(["", "1", "9"])), id=draw(st.text(max_size=4)))
    req.inputs.append(t)
    if draw(st.booleans()):
        req.raw_input_contents.append(x.tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    if draw(st.booleans()):
        req.outputs.add(name=draw(st.sampled_from(["logits", "nope"])))
    data = req.SerializeToString()
    how = draw(st.sampled_from(["keep", "keep", "truncate", "flip", "insert", "random"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how in ("flip", "insert") and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + draw(st.binary(min_size=1, max_size=6)) + data[i + (how == "flip"):]
    elif how == "random":
        data = draw(st.binary(max_size=64))
    return draw(st.sampled_from(GRPC_METHODS)), data


def test_grpc_fuzz(grpc_served, capfd):
    """Mutated and random messages to every method: OK or a protocol status (never UNKNOWN or INTERNAL), no
    error logged, the byte budget whole again, and a valid request answered afterwards."""
    import grpc

    from tests.test_serve_hostile_uploads import grpc_call, infer_request

    address, app = grpc_served
    seen = []
    allowed = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
    with grpc.insecure_channel(address) as ch, Errors() as errors:
        @given(msg=grpc_message())
        @SETTINGS
        def one(msg):
            method, data = msg
            try:
                ch.unary_unary(f"/inference.GRPCInferenceService/{method}")(data, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            seen.append(code)
            assert code in allowed, (code, method, data[:80])

        one()
        assert grpc_call(address, "ModelInfer", infer_request("tiny", 2))[0] == "OK"
        assert not errors.records, errors.records[:5]
    assert app.budget.used == 0
    assert "Traceback" not in capfd.readouterr().err
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(seen), sorted(set(seen))
