"""The HTTP server over the runtime: v2 health/metadata/infer in JSON, the image endpoint, errors."""
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgexfer.runtime import EdgeModel
from edgexfer.runtime.server import make_server, resolve_models


@pytest.fixture(scope="module")
def server(tiny_run):
    httpd = make_server(resolve_models([tiny_run]), port=0, threads=1)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def call(url, data=None, method=None):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_loopback_by_default(tiny_run):
    httpd = make_server(resolve_models([tiny_run]), port=0)
    try:
        assert httpd.server_address[0] == "127.0.0.1"
    finally:
        httpd.server_close()


def test_health_and_metadata(server):
    assert call(f"{server}/v2/health/live")[0] == 200
    assert call(f"{server}/v2/health/ready")[0] == 200
    assert call(f"{server}/v2")[1]["name"] == "edgexfer"
    st, meta = call(f"{server}/v2/models/tiny")
    assert st == 200 and meta["inputs"][0]["shape"] == [-1, 3, 64, 64]
    assert meta["outputs"][0]["name"] == "logits"
    assert call(f"{server}/v2/models/tiny/ready")[1]["ready"] is True


def test_infer_json_matches_runtime(server, tiny_run):
    m = EdgeModel(tiny_run / "model.int8.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    body = {"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}
    st, out = call(f"{server}/v2/models/tiny/infer", json.dumps(body).encode())
    assert st == 200 and out["id"] == "r1"
    got = np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    np.testing.assert_allclose(got, m.run(x)["label"], atol=1e-5)


def test_classify_image_bytes(server, image_folder, tiny_run):
    img = next(image_folder.rglob("*.png"))
    st, out = call(f"{server}/v2/models/tiny/classify", img.read_bytes())
    assert st == 200
    assert out["predictions"][0] == EdgeModel(tiny_run / "model.int8.onnx", e2e=False).predict(img)[0]


@pytest.mark.parametrize("path, data, status", [
    ("/v2/models/nope", None, 404),
    ("/v2/models/nope/infer", b"{}", 404),
    ("/v2/models/tiny/infer", b"{not json", 400),
    ("/v2/models/tiny/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                                      "data": [0.0] * 192}]}).encode(), 400),
    ("/v2/models/tiny/infer", json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "INT8",
                                                      "data": [0]}]}).encode(), 400),
    ("/v2/models/tiny/classify", b"not an image", 400),
])
def test_bad_requests(server, path, data, status):
    st, out = call(server + path, data)
    assert st == status and out["error"]
    assert call(f"{server}/v2/health/ready")[0] == 200  # still up


def test_tritonclient_binary_against_stdlib_server(server, tiny_run):
    """The standard-library server shares the protocol code: tritonclient's binary mode works there too."""
    httpclient = pytest.importorskip("tritonclient.http")
    m = EdgeModel(tiny_run / "model.int8.onnx")
    x = np.random.default_rng(5).standard_normal((3, 3, 64, 64)).astype(np.float32)
    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = client.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
    np.testing.assert_allclose(res.as_numpy("logits"), m.run(x)["label"], atol=1e-5)


def test_multipart_upload(server, image_folder, tiny_run):
    img = sorted(image_folder.rglob("*.png"))[3]
    b = "----edgexfer"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + img.read_bytes() + f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(f"{server}/v2/models/tiny/classify", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    assert out["predictions"][0] == EdgeModel(tiny_run / "model.int8.onnx", e2e=False).predict(img)[0]


def test_bearer_token(tiny_run):
    httpd = make_server(resolve_models([tiny_run]), port=0, threads=1, token="abc")
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert call(f"{url}/v2/health/ready")[0] == 200  # probes stay open
        for headers in ({}, {"Authorization": "Bearer nope"}):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/tiny", headers=headers), timeout=10)
                raise AssertionError("no 401")
            except urllib.error.HTTPError as e:
                assert e.code == 401 and e.headers["WWW-Authenticate"].startswith("Bearer")
        req = urllib.request.Request(f"{url}/v2/models/tiny", headers={"Authorization": "Bearer abc"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()
