"""The Open Inference Protocol (KServe v2 REST) request and response bodies, shared by both servers:
JSON tensors and the binary tensor extension (an `Inference-Header-Content-Length` header, the JSON
header, then raw little-endian bytes). numpy only; no HTTP library."""
from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np

from edgexfer.runtime.model import EdgeModel

HEADER_LEN = "Inference-Header-Content-Length"
MAX_BODY = 16 * 1024 * 1024
DTYPES = {"FP32": np.float32}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _obj(v, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise HTTPError(400, f"{what} must be a JSON object")
    return v


def parse_infer(body: bytes, header_len: str | None, model: EdgeModel) -> tuple[np.ndarray, dict, bool]:
    """(input array, request JSON, whether outputs go back as binary) from a v2 infer body."""
    try:
        n = int(header_len) if header_len is not None else len(body)
        if not 0 <= n <= len(body):
            raise ValueError(f"{HEADER_LEN} {n} is outside the body's {len(body)} bytes")
        req = json.loads(body[:n] or b"{}")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise HTTPError(400, f"malformed JSON: {str(e)[:200]}") from None
    raw = memoryview(body)[n:]
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPError(400, "expected {'inputs': [one tensor]}")
    if not isinstance(req.get("id", ""), str):
        raise HTTPError(400, "id must be a string")
    wanted = req.get("outputs") or []
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise HTTPError(400, "outputs must be a list of objects")
    t = inputs[0]
    if t.get("name") not in (None, model.input_name):
        raise HTTPError(400, f"unknown input {t.get('name')!r}; the model's input is {model.input_name!r}")
    dtype = DTYPES.get(t.get("datatype"))
    if dtype is None:
        raise HTTPError(400, f"datatype must be FP32, got {t.get('datatype')!r}")
    try:
        shape = [int(s) for s in t["shape"]]
        size = _obj(t.get("parameters"), "parameters").get("binary_data_size")
        if size is not None:
            if not 0 <= int(size) <= len(raw):
                raise ValueError(f"binary_data_size {size} is outside the {len(raw)} bytes sent")
            x = np.frombuffer(raw[:int(size)], dtype="<f4").reshape(shape)
        else:
            x = np.asarray(t["data"], dtype=dtype).reshape(shape)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise HTTPError(400, f"bad tensor: {e}") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != model.input_shape or x.shape[0] < 1:
        raise HTTPError(400, f"expected shape [N, {', '.join(map(str, model.input_shape))}], got {list(x.shape)}")
    known = set(model.output_names)
    for o in wanted:
        if o.get("name") not in known:
            raise HTTPError(400, f"unknown output {o.get('name')!r}; the model's outputs are {sorted(known)}")
    binary = bool(_obj(req.get("parameters"), "parameters").get("binary_data_output")) or any(
        _obj(o.get("parameters"), "parameters").get("binary_data") for o in wanted)
    return np.ascontiguousarray(x, dtype=np.float32), req, binary


def infer_response(name: str, req: dict, model: EdgeModel, outs: dict[str, np.ndarray], binary: bool
                   ) -> tuple[bytes, dict]:
    wanted = {o.get("name") for o in (req.get("outputs") or [])}
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


def multipart_file(body: bytes, content_type: str, field: str = "image") -> bytes:
    """The file of a multipart/form-data body (`curl -F image=@cat.jpg`): the part named `field`, else
    the first part with a filename. The standard library's MIME parser; for the server without
    starlette."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = [p for p in msg.iter_parts()] if msg.is_multipart() else []
    named = [p for p in parts if p.get_param("name", header="content-disposition") == field]
    files = named or [p for p in parts if p.get_filename()]
    if not files:
        raise HTTPError(400, f"multipart upload without a file; send it as -F {field}=@cat.jpg")
    return files[0].get_payload(decode=True) or b""
