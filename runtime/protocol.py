"""The Open Inference Protocol (KServe v2 REST) request and response bodies, shared by both servers:
JSON tensors and the binary tensor extension (an `Inference-Header-Content-Length` header, the JSON
header, then raw little-endian bytes). numpy only; no HTTP library."""
from __future__ import annotations

import json

import numpy as np

from edgexfer.runtime.model import EdgeModel

HEADER_LEN = "Inference-Header-Content-Length"
MAX_BODY = 16 * 1024 * 1024
DTYPES = {"FP32": np.float32}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def parse_infer(body: bytes, header_len: str | None, model: EdgeModel) -> tuple[np.ndarray, dict, bool]:
    """(input array, request JSON, whether outputs go back as binary) from a v2 infer body."""
    try:
        n = int(header_len) if header_len is not None else len(body)
        req = json.loads(body[:n] or b"{}")
    except (ValueError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    raw = memoryview(body)[n:]
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPError(400, "expected {'inputs': [one tensor]}")
    t = inputs[0]
    if t.get("name") not in (None, model.input_name):
        raise HTTPError(400, f"unknown input {t.get('name')!r}; the model's input is {model.input_name!r}")
    dtype = DTYPES.get(t.get("datatype"))
    if dtype is None:
        raise HTTPError(400, f"datatype must be FP32, got {t.get('datatype')!r}")
    try:
        shape = [int(s) for s in t["shape"]]
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if int(size) > len(raw):
                raise ValueError(f"binary_data_size {size} exceeds the {len(raw)} bytes sent")
            x = np.frombuffer(raw[:int(size)], dtype="<f4").reshape(shape)
        else:
            x = np.asarray(t["data"], dtype=dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise HTTPError(400, f"bad tensor: {e}") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != model.input_shape:
        raise HTTPError(400, f"expected shape [N, {', '.join(map(str, model.input_shape))}], got {list(x.shape)}")
    wanted = req.get("outputs") or []
    binary = bool((req.get("parameters") or {}).get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in wanted if isinstance(o, dict))
    return np.ascontiguousarray(x, dtype=np.float32), req, binary


def infer_response(name: str, req: dict, model: EdgeModel, outs: dict[str, np.ndarray], binary: bool
                   ) -> tuple[bytes, dict]:
    wanted = {o.get("name") for o in (req.get("outputs") or []) if isinstance(o, dict)}
    tensors, blobs = [], []
    for task in model.meta.tasks:
        if wanted and task.output not in wanted:
            continue
        a = np.ascontiguousarray(outs[task.name], dtype="<f4")
        entry = {"name": task.output, "datatype": "FP32", "shape": list(a.shape)}
        if binary:
            entry["parameters"] = {"binary_data_size": a.nbytes}
            blobs.append(a.tobytes())
        else:
            entry["data"] = a.ravel().tolist()
        tensors.append(entry)
    head = json.dumps({"model_name": name, "model_version": "1", "id": req.get("id", ""), "outputs": tensors}).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LEN: str(len(head))}


def model_metadata(name: str, m: EdgeModel) -> dict:
    return {
        "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": m.input_name, "datatype": "FP32", "shape": [-1, *m.input_shape]}],
        "outputs": [{"name": t.output, "datatype": "FP32", "shape": [-1, len(t.labels)]} for t in m.meta.tasks],
        "parameters": {"edgexfer": m.meta.to_dict()},
    }
