"""The OIP gRPC front end (runtime/grpc_server.py) beside REST in one server, over the same data plane and
batchers: tritonclient.grpc against EdgeModel (raw tensor contents), typed contents through the generated
stub, the protocol's error statuses for bad requests, and the REST answer's message for the same mistake."""
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgexfer.runtime import EdgeModel  # noqa: E402
from edgexfer.runtime.oip import BatchConfig, create_app  # noqa: E402
from edgexfer.runtime.server import resolve_models  # noqa: E402
from tests._live import live_with_grpc  # noqa: E402

TOKEN = "grpc-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tiny_run):
    app = create_app(resolve_models([tiny_run]), threads=1, token=TOKEN, access_log=False,
                     batch=BatchConfig(max_batch_size=8, max_queue_delay_ms=1))
    with live_with_grpc(app) as (grpc_address, rest_url):
        yield grpc_address, rest_url, app


def _x(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_tritonclient_grpc_matches_edgemodel(served, tiny_run):
    url, _, app = served
    c = grpcclient.InferenceServerClient(url)
    assert c.is_server_live() and c.is_server_ready()  # open, as /v2/health/* is
    assert c.is_model_ready("tiny", headers=AUTH) and c.is_model_ready("tiny", "1", headers=AUTH)
    assert c.get_server_metadata(headers=AUTH).name == "edgexfer"
    meta = c.get_model_metadata("tiny", headers=AUTH)
    assert list(meta.inputs[0].shape) == [-1, 3, 64, 64] and meta.outputs[0].name == "logits"
    x = _x()
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = c.infer("tiny", [inp], outputs=[grpcclient.InferRequestedOutput("logits")], request_id="r7", headers=AUTH)
    want = EdgeModel(tiny_run / "model.int8.onnx", e2e=False).run(x)["label"]
    np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
    assert res.get_response().id == "r7" and res.get_response().model_name == "tiny"
    assert sum(app.state.batchers["tiny"].recent_batches) >= 2  # through the batcher


def test_typed_contents(served, tiny_run):
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb
    from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc

    url, _, _ = served
    x = _x(1, seed=1)
    req = pb.ModelInferRequest(model_name="tiny", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=x.shape, contents=pb.InferTensorContents(fp32_contents=x.ravel()))])
    with grpc.insecure_channel(url) as ch:
        r = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=tuple(AUTH.items()), timeout=30)
    assert not r.raw_output_contents
    got = np.asarray(r.outputs[0].contents.fp32_contents, np.float32).reshape(r.outputs[0].shape)
    np.testing.assert_allclose(got, EdgeModel(tiny_run / "model.int8.onnx", e2e=False).run(x)["label"], atol=1e-5)


def _status(fn) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        fn()
    return e.value.status(), e.value.message()


def test_errors_map_to_grpc_status(served):
    url, rest, _ = served
    c = grpcclient.InferenceServerClient(url)
    x = _x(1)[:, :, :32, :32].copy()  # wrong shape
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    st, msg = _status(lambda: c.infer("tiny", [inp], headers=AUTH))
    assert st == "StatusCode.INVALID_ARGUMENT" and "expected shape [N, 3, 64, 64]" in msg
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"{rest}/v2/models/tiny/infer", body, {"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"] == msg  # one data plane, one answer
    assert _status(lambda: c.infer("nope", [inp], headers=AUTH))[0] == "StatusCode.NOT_FOUND"
    assert _status(lambda: c.get_model_metadata("tiny", "9", headers=AUTH))[0] == "StatusCode.NOT_FOUND"
    assert _status(lambda: c.get_model_metadata("tiny"))[0] == "StatusCode.UNAUTHENTICATED"
    assert _status(lambda: c.is_model_ready("tiny", headers={"authorization": "Bearer no"}))[0] == \
        "StatusCode.UNAUTHENTICATED"
    bad = grpcclient.InferInput("input", [1, 3, 64, 64], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.int32))
    st, msg = _status(lambda: c.infer("tiny", [bad], headers=AUTH))
    assert st == "StatusCode.INVALID_ARGUMENT" and "datatype" in msg
