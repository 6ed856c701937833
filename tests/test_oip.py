"""The Open Inference Protocol server (uvicorn): tritonclient, in binary and JSON mode, gets
the same answers as EdgeModel; concurrent requests are batched and each gets its own rows."""
import socket
import time

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")

from edgexfer.runtime import EdgeModel  # noqa: E402
from edgexfer.runtime.oip import BatchConfig, create_app  # noqa: E402
from edgexfer.runtime.server import resolve_models  # noqa: E402
from tests._live import infer_concurrently, live  # noqa: E402


@pytest.fixture(scope="module")
def oip(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1, batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=20))
    with live(app) as addr:
        yield addr, app


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_matches_edgemodel(oip, tiny_run, image_folder, binary):
    url, _ = oip
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "input" and meta["outputs"][0]["name"] == "logits"
    m = EdgeModel(tiny_run / "model.int8.onnx", e2e=False)  # the Python path, as the server batches
    imgs = sorted(image_folder.rglob("*.png"))[::10][:6]
    x = m.preprocess(imgs)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    res = client.infer("tiny", [inp], outputs=[out])
    got = res.as_numpy("logits")
    np.testing.assert_allclose(got, m.run(x)["label"], atol=1e-5)
    assert list(got.argmax(1)) == [m.labels.index(p[0]["label"]) for p in m.predict(imgs, top_k=1)]


def test_concurrent_requests_are_batched_and_kept_apart(oip, tiny_run):
    url, app = oip
    m = EdgeModel(tiny_run / "model.int8.onnx")
    xs = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(24)]
    outs = infer_concurrently(url, "tiny", xs, workers=8)
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(o, m.run(x)["label"], atol=1e-5)
    sizes = app.state.batchers["tiny"].recent_batches
    assert max(sizes) > 1 and max(sizes) <= 8


def test_errors(oip):
    import json
    import urllib.error
    import urllib.request

    url, _ = oip

    def post(path, data):
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://{url}{path}", data=data), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post("/v2/models/nope/infer", b"{}") == 404
    assert post("/v2/models/tiny/infer", b"{bad") == 400
    bad = {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}
    assert post("/v2/models/tiny/infer", json.dumps(bad).encode()) == 400
    assert post("/v2/models/tiny/classify", b"not an image") == 400
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as r:
        assert b"edgexfer_requests_total" in r.read()


def test_serve_command_starts_and_stops_on_sigterm(tiny_run):
    import signal
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "edgexfer.runtime", "serve", str(tiny_run), "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ok = time.time() + 60, False
        while time.time() < deadline and not ok:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    ok = r.status == 200
            except OSError:
                time.sleep(0.2)
        assert ok, "server did not become ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2", timeout=5) as r:
            assert b"binary_tensor_data" in r.read()  # the uvicorn server, not the stdlib one
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert p.returncode in (0, -signal.SIGTERM), out[-2000:]
    assert "Application shutdown complete" in out


def test_classify_image(oip, tiny_run, image_folder):
    import json
    import urllib.request

    url, _ = oip
    img = next(image_folder.rglob("*.png"))
    with urllib.request.urlopen(urllib.request.Request(f"http://{url}/v2/models/tiny/classify",
                                                       data=img.read_bytes()), timeout=10) as r:
        out = json.loads(r.read())
    assert out["predictions"][0] == EdgeModel(tiny_run / "model.int8.onnx", e2e=False).predict(img)[0]


def test_serve_rejects_a_bad_switch_interval_in_one_line(tiny_run):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "serve", str(tiny_run), "--switch-interval-us", "0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "--switch-interval-us must be between 1 and 1000000" in p.stderr
