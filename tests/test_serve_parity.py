"""Both REST servers are adapters over one data plane (runtime/dataplane.py): the same requests, valid and
invalid, get the same status, content type and body bytes from the standard-library server and the batching
uvicorn one (the gRPC front end is tested in test_serve_grpc.py)."""
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from edgexfer.runtime.oip import BatchConfig, create_app  # noqa: E402
from edgexfer.runtime.server import make_server, resolve_models  # noqa: E402
from tests._live import live  # noqa: E402

TOKEN = "parity-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _multipart(field: str, data: bytes) -> tuple[bytes, str]:
    b = "----parity-boundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def _requests(image: bytes) -> list[tuple[str, str, bytes | None, dict]]:
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    tensor = {"name": "input", "shape": [2, 3, 64, 64], "datatype": "FP32", "data": x.ravel().tolist()}
    infer = json.dumps({"id": "r1", "inputs": [tensor]}).encode()
    head = json.dumps({"inputs": [{**{k: v for k, v in tensor.items() if k != "data"},
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    mp, mp_type = _multipart("image", image)
    j = {**AUTH, "Content-Type": "application/json"}
    return [
        ("GET", "/v2/health/live", None, {}), ("GET", "/v2/health/ready", None, {}),
        ("GET", "/v2", None, AUTH), ("GET", "/v2/", None, AUTH),
        ("GET", "/v2", None, {}),                                                  # 401, no token
        ("GET", "/v2/models/tiny", None, {"Authorization": "Bearer wrong"}),       # 401, wrong token
        ("GET", "/v2/models/tiny", None, {"Authorization": f"Basic {TOKEN}"}),     # 401, wrong scheme
        ("GET", "/v2/models/tiny", None, AUTH), ("GET", "/v2/models/tiny/versions/1", None, AUTH),
        ("GET", "/v2/models/tiny/versions/7", None, AUTH),                         # 404 version
        ("GET", "/v2/models/tiny/ready", None, AUTH), ("GET", "/v2/models/tiny/versions/1/ready", None, AUTH),
        ("GET", "/v2/models/nope", None, AUTH), ("GET", "/v2/models/nope/ready", None, AUTH),
        ("GET", "/v2/openapi.json", None, AUTH), ("GET", "/nope", None, AUTH), ("GET", "/v2/nope", None, AUTH),
        ("GET", "/v2/models/tiny/infer", None, AUTH),                              # 405
        ("POST", "/v2/health/live", b"{}", AUTH),                                  # 405
        ("POST", "/v2/models/tiny/infer", infer, j),
        ("POST", "/v2/models/tiny/versions/1/infer", infer, j),
        ("POST", "/v2/models/tiny/versions/2/infer", infer, j),                    # 404 version
        ("POST", "/v2/models/tiny/infer", head + x.tobytes(),
         {**AUTH, "Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}),
        ("POST", "/v2/models/tiny/infer", b"{not json", j),
        ("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [{**tensor, "shape": [2, 3, 32, 32]}]}).encode(), j),
        ("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [{**tensor, "datatype": "INT8"}]}).encode(), j),
        ("POST", "/v2/models/tiny/infer", json.dumps({"inputs": [{**tensor, "data": [1.0, 2.0]}]}).encode(), j),
        ("POST", "/v2/models/tiny/infer", json.dumps({"inputs": []}).encode(), j),
        ("POST", "/v2/models/tiny/infer", infer, {"Authorization": "Bearer wrong"}),  # 401
        ("POST", "/v2/models/nope/infer", infer, j),                                 # 404
        ("POST", "/v2/models/tiny/classify", image, AUTH),
        ("POST", "/v2/models/tiny/classify?top_k=2", image, AUTH),
        ("POST", "/v2/models/tiny/versions/1/classify?top_k=1", image, AUTH),
        ("POST", "/v2/models/tiny/classify?top_k=0", image, AUTH),
        ("POST", "/v2/models/tiny/classify?top_k=two", image, AUTH),
        ("POST", "/v2/models/tiny/classify?top_k=3", mp, {**AUTH, "Content-Type": mp_type}),
        ("POST", "/v2/models/tiny/classify", _multipart("other", b"not an image")[0],
         {**AUTH, "Content-Type": mp_type}),
        ("POST", "/v2/models/tiny/classify", b"--x--\r\n", {**AUTH, "Content-Type": "multipart/form-data; boundary=x"}),
        ("POST", "/v2/models/tiny/classify", b"not an image", AUTH),
        ("POST", "/v2/models/tiny/classify", b"", AUTH),
    ]


def _call(base: str, method: str, path: str, data, headers) -> tuple[int, str, bytes]:
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def test_both_servers_answer_alike(tiny_run, image_folder):
    models = resolve_models([tiny_run])
    image = sorted(image_folder.rglob("*.png"))[3].read_bytes()
    requests = _requests(image)
    httpd = make_server(models, port=0, threads=1, token=TOKEN, access_log=False)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        stdlib = [_call(base, *r) for r in requests]
    finally:
        httpd.shutdown()
        httpd.server_close()
    app = create_app(models, threads=1, token=TOKEN, access_log=False,
                     batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=1))
    with live(app) as url:
        batching = [_call(f"http://{url}", *r) for r in requests]
    statuses = [a[0] for a in stdlib]
    assert {200, 400, 401, 404, 405} <= set(statuses), statuses  # the set exercises every kind of answer
    for r, a, b in zip(requests, stdlib, batching):
        assert a == b, (r[0], r[1], a[:2], b[:2], a[2][:300], b[2][:300])
