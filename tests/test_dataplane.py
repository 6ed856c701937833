"""The serving data plane (runtime/dataplane.py), in-process on a tiny ONNX model: what every front end (the
standard-library server, the batching uvicorn one, gRPC) asks of it — routing, authorisation, validation,
answers and error statuses — without a socket. Fast tier."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.dataplane import DataPlane, QueueFull, resolve_models
from edgexfer.runtime.protocol import HTTPError
from tests._onnx_model import good_meta, onnx_bytes


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> DataPlane:
    d = tmp_path_factory.mktemp("plane")
    (d / "a.onnx").write_bytes(onnx_bytes(good_meta(classes=4), classes=4))
    (d / "b.onnx").write_bytes(onnx_bytes(good_meta(classes=3), classes=3))
    return DataPlane({"a": d / "a.onnx", "b": d / "b.onnx"}, threads=1, token="s3cret", access_log=False)


def status(fn, *a) -> int:
    with pytest.raises(HTTPError) as e:
        fn(*a)
    return e.value.status


@pytest.mark.parametrize("method, target, kind, model", [
    ("GET", "/v2/health/live", "live", ""),
    ("GET", "/v2/health/ready/", "ready", ""),  # a trailing slash is ignored
    ("HEAD", "/v2/health/live", "live", ""),  # HEAD is GET
    ("GET", "/v2", "server", ""),
    ("GET", "/v2/openapi.json", "openapi", ""),
    ("GET", "/openapi.json", "openapi", ""),
    ("GET", "/v2/models/a", "metadata", "a"),
    ("GET", "/v2/models/b/versions/1", "metadata", "b"),
    ("GET", "/v2/models/a/ready", "model_ready", "a"),
    ("GET", "/v2/models/a/versions/1/ready", "model_ready", "a"),
    ("POST", "/v2/models/a/infer", "infer", "a"),
    ("POST", "/v2/models/b/versions/1/infer", "infer", "b"),
    ("POST", "/v2/models/b/classify?top_k=2", "classify", "b"),
])
def test_routes(plane, method, target, kind, model):
    call = plane.route(method, target)
    assert (call.kind, call.model) == (kind, model)
    if kind == "classify":
        assert call.query == "top_k=2"


@pytest.mark.parametrize("method, target, code", [
    ("GET", "/v2/models/nope", 404),  # unknown model
    ("POST", "/v2/models/nope/infer", 404),
    ("GET", "/v2/models/a/versions/2", 404),  # unknown version
    ("POST", "/v2/models/a/versions/2/infer", 404),
    ("GET", "/v2/models/a/infer", 405),  # infer is POST
    ("POST", "/v2/models/a/ready", 405),
    ("POST", "/v2/models/a", 404),
    ("POST", "/v2/health/live", 405),  # a GET path
    ("DELETE", "/v2", 405),
    ("GET", "/v2/nothing/here", 404),
    ("GET", "/v2/models/a/infer/extra", 404),
])
def test_route_refusals(plane, method, target, code):
    assert status(plane.route, method, target) == code


def test_simple_answers(plane):
    assert plane.simple(plane.route("GET", "/v2/health/live")) == {"live": True}
    assert plane.simple(plane.route("GET", "/v2/models/b/ready")) == {"name": "b", "ready": True}
    meta = plane.simple(plane.route("GET", "/v2/models/b"))
    assert meta["name"] == "b" and meta["versions"] == ["1"]
    assert plane.simple(plane.route("GET", "/v2"))["name"] == "edgexfer"
    doc, headers = plane.simple(plane.route("GET", "/v2/openapi.json"))
    assert headers["content-type"] == "application/json" and "/v2/models/{model}/classify" in json.loads(doc)["paths"]


def test_authorization(plane):
    plane.authorize("/v2/health/live", None)  # probes are open
    plane.authorize("/v2/health/ready", None)
    plane.authorize("/v2/models/a/infer", "Bearer s3cret")
    plane.authorize("/v2/models/a/infer", b"bearer s3cret")
    with pytest.raises(HTTPError) as e:
        plane.authorize("/v2/models/a/infer", None)
    assert e.value.status == 401 and "invalid_token" not in e.value.headers["WWW-Authenticate"]
    with pytest.raises(HTTPError) as e:
        plane.authorize("/v2", "Bearer wrong")
    assert e.value.status == 401 and "invalid_token" in e.value.headers["WWW-Authenticate"]
    assert status(plane.authorize, "/v2/models/a", "Basic s3cret") == 401
    DataPlane({}, token=None, access_log=False).authorize("/v2/models/a/infer", None)  # no token: all open


@pytest.mark.parametrize("query, k", [("", 5), ("top_k=2", 2), ("top_k=1&top_k=3", 3), ("x=1", 5)])
def test_top_k(query, k):
    assert DataPlane.top_k(query) == k


@pytest.mark.parametrize("query", ["top_k=0", "top_k=-1", "top_k=two"])
def test_top_k_refusals(query):
    assert status(DataPlane.top_k, query) == 400


def png(size=(20, 12), colour=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, "PNG")
    return b.getvalue()


def test_classify_an_image(plane):
    x = plane.image_input("a", png())
    assert x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    outs = plane.models["a"].run(x)
    ans = plane.classify_answer("a", outs, top_k=2)
    assert ans["model"] == "a" and len(ans["predictions"]) == 2
    assert {p["label"] for p in ans["predictions"]} <= {"c0", "c1", "c2", "c3"}
    scores = [p["score"] for p in ans["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert status(plane.image_input, "a", b"not an image") == 400
    assert status(plane.image_input, "nope", png()) == 404


def test_failures_map_to_statuses(plane):
    assert plane.failure(HTTPError(404, "x"))[0] == 404
    code, _, headers = plane.failure(QueueFull())
    assert code == 503 and headers["Retry-After"] == "1"
    assert plane.failure(TimeoutError())[0] == 504
    assert plane.failure(ValueError("boom"))[:2] == (500, "internal error: ValueError")
    body, headers = plane.error_body(404, "gone")
    assert json.loads(body) == {"error": "gone"} and headers["content-type"] == "application/json"


def test_model_names_for_labels(plane):
    assert plane.model_of_path("/v2/models/a/infer") == "a"
    assert plane.model_of_path("/v2/models/b/versions/1/ready?x=1") == "b"
    assert plane.model_of_path("/v2/models/unknown/infer") == ""  # log labels never grow with unknown names
    assert plane.served("nope") == "" and plane.served("a") == "a"


def test_resolve_models_prefers_int8(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in ("model.onnx", "model.int8.onnx"):
        (run / f).write_bytes(onnx_bytes(good_meta()))
    (tmp_path / "solo.onnx").write_bytes(onnx_bytes(good_meta()))
    got = resolve_models([run, tmp_path / "solo.onnx"])
    assert {n: p.name for n, p in got.items()} == {"run": "model.int8.onnx", "solo": "solo.onnx"}
