"""The OpenAPI 3.0 document of the Open Inference Protocol server (`oip.py`), built from what it serves:
the model names, whether a bearer token is required, its limits. Served at `/v2/openapi.json` (and
`/openapi.json`); tests/test_serve_openapi.py runs schemathesis against it. Plain dicts, no library.
"""
from __future__ import annotations

from edgexfer.runtime.protocol import HEADER_LEN, MAX_BODY

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # answered without the token (probes)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str, headers: dict | None = None) -> dict:
    return _json(_ref("Error"), description, headers)


SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {"type": "object", "required": ["name", "ready"],
                   "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}}}},
    "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}}}},
    "ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                      "properties": {
                          "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                          "platform": {"type": "string"},
                          "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                          "outputs": {"type": "array", "items": _ref("TensorMetadata")},
                          "parameters": {"type": "object"}}},
    "InferInput": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}, "description": "[N, C, H, W]"},
        "datatype": {"type": "string", "enum": ["FP32"]},
        "data": {"type": "array", "description": "the tensor's values, flat or nested, row-major"},
        "parameters": {"type": "object", "properties": {
            "binary_data_size": {"type": "integer", "minimum": 0,
                                 "description": "binary tensor extension: the bytes after the JSON header"}}}}},
    "InferRequestedOutput": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}},
    "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("InferInput")},
        "outputs": {"type": "array", "items": _ref("InferRequestedOutput")}}},
    "InferOutput": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {"type": "number", "nullable": True},
                 "description": "null where the model gave NaN or an infinity (JSON has neither)"},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}}}},
    "InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": _ref("InferOutput")}}},
    "Prediction": {"type": "object", "required": ["label", "index", "score"], "properties": {
        "label": {"type": "string"}, "index": {"type": "integer"},
        "score": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True}}},
    "ClassifyResponse": {"type": "object", "required": ["model", "predictions"], "properties": {
        "model": {"type": "string"},
        "predictions": {"oneOf": [
            {"type": "array", "items": _ref("Prediction")},
            {"type": "object", "additionalProperties": {"type": "array", "items": _ref("Prediction")},
             "description": "multi-task models: task name -> top-k"}]}}},
}


def openapi_document(models: dict, *, version: str, token: bool, timeout_s: float) -> dict:
    """`models`: name -> EdgeModel. The model path parameter is an enum of the served names; any other
    name answers 404, as documented."""
    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string", "enum": sorted(models)}}
    busy = {
        "413": _error(f"body over {MAX_BODY} bytes; an image over the pixel limit (--max-image-pixels)"),
        "503": _error("the model's queue is full, or the server holds its limit of request bytes "
                      "(--max-inflight-mib)", {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}),
        "504": _error(f"no answer within the per-request timeout ({timeout_s:g} s)"),
    }

    def op(summary: str, responses: dict, **extra) -> dict:
        return {"summary": summary, "responses": responses, **extra}

    def model_op(summary: str, responses: dict, **extra) -> dict:
        extra.setdefault("parameters", [model_param])
        return op(summary, {**responses, "404": _error("unknown model")}, **extra)

    infer_body = {"required": True, "content": {
        "application/json": {"schema": _ref("InferRequest")},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": f"binary tensor extension: the JSON header ({HEADER_LEN} "
                                                    "bytes of it), then the raw little-endian tensor bytes"}}}
    header_len = {"name": HEADER_LEN, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
                  "description": "binary tensor extension: length of the JSON header at the start of the body"}
    image_body = {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}}}}}}
    top_k = {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
             "description": "how many labels (default 5; at most the model's number of labels)"}

    paths = {
        "/v2/health/live": {"get": op("server is live", {"200": _json(_ref("Live"), "live")})},
        "/v2/health/ready": {"get": op("server is ready", {"200": _json(_ref("Ready"), "ready")})},
        "/v2": {"get": op("server metadata", {"200": _json(_ref("ServerMetadata"), "server metadata")})},
        "/v2/models/{model}": {"get": model_op("model metadata", {"200": _json(_ref("ModelMetadata"), "metadata")})},
        "/v2/models/{model}/ready": {"get": model_op("model is ready", {"200": _json(_ref("ModelReady"), "ready")})},
        "/v2/models/{model}/infer": {"post": model_op("inference on preprocessed tensors (batched)", {
            "200": {"description": "the outputs; binary when asked for (binary_data / binary_data_output)",
                    "content": {"application/json": {"schema": _ref("InferResponse")},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "400": _error("malformed JSON, wrong shape, datatype, input or output name"), **busy},
            requestBody=infer_body, parameters=[model_param, header_len])},
        "/v2/models/{model}/classify": {"post": model_op("top-k labels of one image (raw bytes or multipart)", {
            "200": _json(_ref("ClassifyResponse"), "top-k labels"),
            "400": _error("undecodable image, aspect ratio over the limit (--max-aspect-ratio), missing multipart "
                          "file, bad top_k"), **busy},
            requestBody=image_body, parameters=[model_param, top_k])},
        "/metrics": {"get": op("Prometheus text metrics (the batching uvicorn server; `--server stdlib` answers 404)",
                               {"200": {"description": "text exposition format 0.0.4",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                                "404": _error("the standard-library server keeps no metrics")})},
        "/v2/openapi.json": {"get": op("this document", {"200": _json({"type": "object"}, "OpenAPI 3.0 document")})},
        "/openapi.json": {"get": op("this document", {"200": _json({"type": "object"}, "OpenAPI 3.0 document")})},
    }
    doc = {"openapi": "3.0.3",
           "info": {"title": "edgexfer Open Inference Protocol server", "version": version,
                    "description": "KServe v2 REST with the binary tensor extension, plus an image endpoint."},
           "paths": paths, "components": {"schemas": SCHEMAS}}
    if token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        unauthorized = _error("missing or wrong bearer token",
                              {"WWW-Authenticate": {"schema": {"type": "string"}}})
        for path, item in paths.items():
            for operation in item.values():
                if path in OPEN_PATHS:
                    operation["security"] = []
                else:
                    operation["responses"]["401"] = unauthorized
    return doc
