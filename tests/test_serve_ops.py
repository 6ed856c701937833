"""Operations of the OIP server: bearer token (tritonclient with headers too), multipart image upload,
Prometheus metrics that parse (histograms included), access-log lines, 504 past the per-request
timeout, 503 + Retry-After on a full queue."""
import json
import logging
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from edgexfer.runtime import EdgeModel  # noqa: E402
from edgexfer.runtime.oip import BatchConfig, create_app  # noqa: E402
from edgexfer.runtime.server import resolve_models  # noqa: E402
from tests._live import live  # noqa: E402

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def call(url, data=None, headers=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    b = "----edgexfer-test-boundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


@pytest.fixture(scope="module")
def server(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1, token=TOKEN,
                     batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=5))
    with live(app) as url:
        yield f"http://{url}", url, app


def test_token_required_except_health(server):
    base, _, _ = server
    assert call(f"{base}/v2/health/live")[0] == 200
    assert call(f"{base}/v2/health/ready")[0] == 200
    for path in ("/v2", "/v2/models/tiny", "/metrics", "/v2/openapi.json"):
        st, h, body = call(base + path)
        assert st == 401 and h["WWW-Authenticate"].startswith("Bearer") and json.loads(body)["error"]
    st, h, _ = call(f"{base}/v2/models/tiny/infer", b"{}", {"Authorization": "Bearer wrong"})
    assert st == 401 and 'error="invalid_token"' in h["WWW-Authenticate"]
    assert call(f"{base}/v2/models/tiny", headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert call(f"{base}/v2/models/tiny", headers=AUTH)[0] == 200
    assert call(f"{base}/v2/models/tiny", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_with_token(server, tiny_run, binary):
    _, url, _ = server
    m = EdgeModel(tiny_run / "model.int8.onnx")
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    assert client.is_server_ready()  # open
    with pytest.raises(Exception, match="401|token"):
        client.infer("tiny", [inp], outputs=out)
    assert client.is_model_ready("tiny", headers=dict(AUTH))
    res = client.infer("tiny", [inp], outputs=out, headers=dict(AUTH))  # tritonclient adds to the dict it gets
    np.testing.assert_allclose(res.as_numpy("logits"), m.run(x)["label"], atol=1e-5)


def test_multipart_upload(server, tiny_run, image_folder):
    base, _, _ = server
    img = sorted(image_folder.rglob("*.png"))[7]
    want = EdgeModel(tiny_run / "model.int8.onnx", e2e=False).predict(img, top_k=2)
    body, ctype = multipart("image", img.name, img.read_bytes())
    st, _, out = call(f"{base}/v2/models/tiny/classify?top_k=2", body, {**AUTH, "Content-Type": ctype})
    assert st == 200, out
    got = json.loads(out)["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert abs(got[0]["score"] - want[0]["score"]) < 1e-5
    body, ctype = multipart("other", img.name, b"not an image")
    st, _, out = call(f"{base}/v2/models/tiny/classify", body, {**AUTH, "Content-Type": ctype})
    assert st == 400 and "cannot decode" in json.loads(out)["error"]
    st, _, out = call(f"{base}/v2/models/tiny/classify", b"--x--\r\n", {**AUTH, "Content-Type": "multipart/form-data; boundary=x"})
    assert st == 400 and "without a file" in json.loads(out)["error"]
    assert call(f"{base}/v2/models/tiny/classify?top_k=0", img.read_bytes(), AUTH)[0] == 400


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_form_upload(server, tiny_run, image_folder):
    base, _, _ = server
    img = sorted(image_folder.rglob("*.png"))[40]
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {TOKEN}", "-F", f"image=@{img}",
                          f"{base}/v2/models/tiny/classify"], capture_output=True, text=True, timeout=30, check=True)
    got = json.loads(out.stdout)["predictions"][0]
    assert got["label"] == EdgeModel(tiny_run / "model.int8.onnx", e2e=False).predict(img)[0]["label"]


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"(,|(?=\})))*\})? '
                    r'(-?[0-9.e+-]+|[+-]Inf|NaN)$')


def test_metrics_are_valid_prometheus_text(server):
    base, _, app = server
    x = np.zeros((3, 3, 64, 64), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    before = sum(app.state.batchers["tiny"].recent_batches)
    for _ in range(4):
        assert call(f"{base}/v2/models/tiny/infer", body, AUTH)[0] == 200
    assert call(f"{base}/v2/models/nope", headers=AUTH)[0] == 404
    st, h, text = call(f"{base}/metrics", headers=AUTH)
    assert st == 200 and h["Content-Type"].startswith("text/plain; version=0.0.4")
    text = text.decode()
    for line in text.splitlines():  # strict: every line a comment (HELP/TYPE) or a sample
        assert line.startswith(("# HELP ", "# TYPE ")) or SAMPLE.match(line), line
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["edgexfer_request_duration_seconds"].type == "histogram"
    assert fams["edgexfer_batch_size"].type == "histogram"
    assert fams["edgexfer_queue_depth"].type == "gauge" and fams["edgexfer_requests_in_flight"].type == "gauge"
    s = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in fams.values() for x in f.samples}
    assert s[("edgexfer_requests_total", (("code", "200"), ("model", "tiny")))] >= 4
    assert s[("edgexfer_requests_total", (("code", "404"), ("model", "")))] >= 1  # unknown names: no label
    assert s[("edgexfer_errors_total", (("model", ""),))] >= 1
    assert s[("edgexfer_request_duration_seconds_count", (("model", "tiny"),))] >= 4
    buckets = [x for x in fams["edgexfer_request_duration_seconds"].samples
               if x.name.endswith("_bucket") and x.labels["model"] == "tiny"]
    assert [b.value for b in buckets] == sorted(b.value for b in buckets) and buckets[-1].labels["le"] == "+Inf"
    rows = s[("edgexfer_batch_size_sum", (("model", "tiny"),))]
    assert rows == sum(app.state.batchers["tiny"].recent_batches) and rows - before >= 12
    assert s[("edgexfer_queue_depth", (("model", "tiny"),))] == 0


def test_access_log_one_line_per_request(tiny_run, caplog):
    x = np.zeros((1, 3, 64, 64), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    for quiet in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgexfer.access"):
            with live(create_app(resolve_models([tiny_run]), threads=1, access_log=not quiet)) as url:
                assert call(f"http://{url}/v2/models/tiny/infer", body)[0] == 200
                assert call(f"http://{url}/v2/models/nope/ready")[0] == 404
        lines = [r.getMessage() for r in caplog.records if r.name == "edgexfer.access"]
        if quiet:
            assert lines == []
            continue
        assert len(lines) == 2, lines
        assert re.fullmatch(r'127\.0\.0\.1 "POST /v2/models/tiny/infer" 200 \d+\.\dms model=tiny', lines[0])
        assert re.fullmatch(r'127\.0\.0\.1 "GET /v2/models/nope/ready" 404 \d+\.\dms model=-', lines[1])


def slow(app, seconds):
    m = app.state.batchers["tiny"].model
    run = m.run

    def slow_run(x):
        time.sleep(seconds)
        return run(x)
    m.run = slow_run  # instance attribute: this app's model only


def test_timeout_answers_504_and_server_recovers(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1, access_log=False,
                     batch=BatchConfig(max_batch_size=1, max_queue_delay_ms=0, timeout_s=0.3))
    slow(app, 0.8)
    x = np.zeros((1, 3, 64, 64), np.float32).ravel().tolist()
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": x}]}).encode()
    with live(app) as url:
        t0 = time.time()
        st, _, out = call(f"http://{url}/v2/models/tiny/infer", body)
        assert st == 504 and "0.3 s" in json.loads(out)["error"] and time.time() - t0 < 0.75
        time.sleep(1.0)
        assert call(f"http://{url}/v2/health/ready")[0] == 200


def test_full_queue_answers_503_with_retry_after(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1, access_log=False,
                     batch=BatchConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue=1, timeout_s=30))
    slow(app, 0.5)
    x = np.zeros((1, 3, 64, 64), np.float32).ravel().tolist()
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": x}]}).encode()
    with live(app) as url:
        with ThreadPoolExecutor(6) as pool:
            res = list(pool.map(lambda _: call(f"http://{url}/v2/models/tiny/infer", body), range(6)))
    codes = sorted(r[0] for r in res)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    assert all(r[1]["Retry-After"] == "1" for r in res if r[0] == 503)
