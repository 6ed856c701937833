"""The Open Inference Protocol's gRPC front end (`inference.GRPCInferenceService`, runtime/grpc_predict_v2.proto),
over the same data plane and dynamic batchers as the REST server it runs beside:

    edgexfer serve runs/demo --grpc-port 8001        # needs: pip install "edgexfer[serve]"

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with the input's values
as raw bytes (`raw_input_contents`, the outputs then come back as `raw_output_contents`) or typed
(`contents.fp32_contents`). Everything a request means is decided by `dataplane.DataPlane` (the REST
answers' validation, the bearer token from the `authorization` metadata, the access log); its HTTP
statuses map onto gRPC codes (`CODES`: 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, ...).
Needs grpcio and protobuf (the [serve] extra); imported only when a gRPC port is asked for.

Bounded like REST: a message is at most MAX_BODY (+64 KiB), and ModelInfer requests share the REST server's
in-flight byte budget (`--max-inflight-mib`): each request's serialized size is taken before anything in
it is decoded, RESOURCE_EXHAUSTED past it. A ModelInfer request arrives as bytes; its tensor bytes
(`raw_input_contents`) are read in place, never copied, and an unknown model is NOT_FOUND before any
tensor is looked at (`split_infer`). A message that does not parse is INVALID_ARGUMENT with one
access-log line, never a traceback.
"""
from __future__ import annotations

import json
import logging
import math
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from edgexfer.runtime import grpc_predict_v2_pb2 as pb
from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc
from edgexfer.runtime.batcher import DynamicBatcher
from edgexfer.runtime.dataplane import DataPlane
from edgexfer.runtime.protocol import MAX_BODIES_IN_FLIGHT, MAX_BODY, BodyBudget, HeaderCache, HTTPError

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.INVALID_ARGUMENT,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED, 500: grpc.StatusCode.INTERNAL}
OPEN = frozenset({"ServerLive", "ServerReady"})  # the health probes, answered without the token
MAX_FIELDS = 256  # top-level fields of a ModelInferRequest (a few: name, version, id, inputs, outputs, ...)
MESSAGES = {"ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (None, pb.ModelInferResponse)}  # None: the servicer gets the bytes (`split_infer`)


class GRPCError(Exception):
    """A refusal with its own gRPC code (and the HTTP status its access-log line shows)."""

    def __init__(self, code: grpc.StatusCode, message: str, status: int):
        super().__init__(message)
        self.code, self.status = code, status


class Malformed:
    """What a request deserializer returns for bytes that do not parse: the servicer answers it
    INVALID_ARGUMENT (an exception in a deserializer is grpcio's UNKNOWN, with a traceback, and no log line)."""

    def __init__(self, error: Exception):
        self.error = error


def _deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(e)
    return parse


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(b))):
        value |= (b[i] & 0x7F) << shift
        if b[i] < 0x80:
            return value, i + 1
        shift += 7
    raise DecodeError("truncated or overlong varint")


def split_infer(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview]]:
    """A serialized ModelInferRequest -> (the message without its `raw_input_contents`, those as views of
    `data`): one pass over the top-level fields (at most MAX_FIELDS), tensor bytes never copied. DecodeError
    when malformed."""
    view, keep, raw = memoryview(data), [], []
    pos, n = 0, len(data)
    while pos < n:
        if len(keep) + len(raw) == MAX_FIELDS:
            raise DecodeError(f"more than {MAX_FIELDS} top-level fields")
        start = pos
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if field == 7 and pos + size <= n:
                raw.append(view[pos:pos + size])
                pos += size
                continue
            pos += size
        else:
            raise DecodeError(f"wire type {wire} of field {field}")
        if field == 0 or pos > n:
            raise DecodeError("truncated message" if pos > n else "field number 0")
        keep.append(view[start:pos])
    return pb.ModelInferRequest.FromString(b"".join(keep)), raw


def _param(p) -> object:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dp: DataPlane, batchers: dict[str, DynamicBatcher], budget: BodyBudget | None = None):
        self.dp, self.batchers = dp, batchers
        self.budget = budget if budget is not None else BodyBudget(MAX_BODIES_IN_FLIGHT)
        self.caches = {n: HeaderCache() for n in dp.models}

    async def _call(self, method: str, request, context, answer):
        """Authorise, answer, map a failure onto its gRPC status, log one access line."""
        t0, status, code = time.perf_counter(), 200, None
        try:
            if method not in OPEN:
                auth = dict(context.invocation_metadata() or ()).get("authorization")
                self.dp.authorize(SERVICE + method, auth)
            if isinstance(request, Malformed):
                raise HTTPError(400, f"malformed {method} request: {str(request.error)[:200]}")
            return await answer()
        except GRPCError as e:
            status, code, message = e.status, e.code, str(e)
        except Exception as e:
            status, message, _ = self.dp.failure(e)
            code = CODES.get(status, grpc.StatusCode.UNKNOWN)
        finally:
            model = getattr(request, "model_name", "") or getattr(request, "name", "")
            self.dp.log_access(context.peer() or "-", "GRPC", SERVICE + method, status, time.perf_counter() - t0, model)
        # aborted outside the except clause: raised inside it, the abort would tie this frame to the exception
        # in a cycle that keeps a request's bytes until the cyclic collector runs
        await context.abort(code, message)

    async def ServerLive(self, request, context):
        async def answer():
            return pb.ServerLiveResponse(live=True)
        return await self._call("ServerLive", request, context, answer)

    async def ServerReady(self, request, context):
        async def answer():
            return pb.ServerReadyResponse(ready=True)
        return await self._call("ServerReady", request, context, answer)

    async def ModelReady(self, request, context):
        async def answer():
            return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version)["ready"])
        return await self._call("ModelReady", request, context, answer)

    async def ServerMetadata(self, request, context):
        async def answer():
            return pb.ServerMetadataResponse(**self.dp.server_metadata())
        return await self._call("ServerMetadata", request, context, answer)

    async def ModelMetadata(self, request, context):
        async def answer():
            meta = self.dp.metadata(request.name, request.version)
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])
        return await self._call("ModelMetadata", request, context, answer)

    async def ModelInfer(self, data: bytes, context):
        """`data`: the serialized request. Its size is taken from the budget first, the model is looked up
        before any tensor is, and the budget is given back once the request is answered."""
        state = {"model_name": ""}  # for the access log, once known

        async def answer():
            try:
                self.budget.take(len(data))
            except HTTPError as e:
                raise GRPCError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), 503) from None
            try:
                try:
                    request, raw = split_infer(data)
                except DecodeError as e:
                    raise HTTPError(400, f"malformed ModelInfer request: {str(e)[:200]}") from None
                name = state["model_name"] = request.model_name
                self.dp.model(name, request.model_version)
                x, h = self.tensor(request, raw)
                outs = await self.batchers[name].submit(x)
                return self.response(request, h, outs, bool(raw))
            finally:
                self.budget.give(len(data))
        try:
            return await self._call("ModelInfer", _Named(state), context, answer)
        finally:  # a refusal's abort exception stays with grpc (its frames, this one's too): not the bytes
            del data

    def tensor(self, request, raw: list[memoryview]) -> tuple[np.ndarray, object]:
        """The request's one input as an array, checked by the data plane exactly as a REST infer header
        (name, datatype, shape, requested outputs) is; (array, checked header). `raw`: the request's
        `raw_input_contents`, views of its bytes."""
        if len(request.inputs) != 1:
            raise HTTPError(400, "expected {'inputs': [one tensor]}")
        t = request.inputs[0]
        if raw and len(raw) != 1:
            raise HTTPError(400, "raw_input_contents must hold one entry per input")
        if raw and t.HasField("contents"):
            raise HTTPError(400, "an input has both contents and raw_input_contents")
        values = t.contents.fp32_contents
        if not raw and t.datatype == "FP32" and not values and math.prod(t.shape) > 0:
            other = [f.name for f, _ in t.contents.ListFields()]
            raise HTTPError(400, f"bad tensor: FP32 values belong in contents.fp32_contents or raw_input_contents"
                                 f"{', not ' + ', '.join(other) if other else ''}")
        size = len(raw[0]) if raw else 4 * len(values)
        if size > MAX_BODY:
            raise HTTPError(400, f"input of {size} bytes exceeds {MAX_BODY}")
        head = {"id": request.id, "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                                              "parameters": {"binary_data_size": size}}]}
        if request.outputs:
            head["outputs"] = [{"name": o.name} for o in request.outputs]
        h = self.dp.infer_header(request.model_name, json.dumps(head).encode(), self.caches[request.model_name])
        if raw:
            x = np.frombuffer(raw[0], dtype="<f4").reshape(h.shape)  # a view of the request's bytes
        else:
            x = np.fromiter(values, dtype=np.float32, count=len(values)).reshape(h.shape)
        return x, h

    def response(self, request, h, outs: dict[str, np.ndarray], raw: bool):
        m = self.dp.models[request.model_name]
        wanted = {o.name for o in request.outputs}
        r = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for task in m.meta.tasks:
            if wanted and task.output not in wanted:
                continue
            a = np.ascontiguousarray(outs[task.name], dtype="<f4")
            o = r.outputs.add(name=task.output, datatype="FP32", shape=a.shape)
            if raw:
                r.raw_output_contents.append(a.tobytes())
            else:
                o.contents.fp32_contents.extend(a.ravel().tolist())
        return r


class _Named:
    """The model a ModelInfer request names, for `_call`'s access-log line (known once it is parsed)."""

    def __init__(self, state: dict):
        self._state = state

    @property
    def model_name(self) -> str:
        return self._state["model_name"]


def handlers(servicer: Servicer) -> dict:
    """The service's method handlers: ModelInfer gets its request as bytes, the others a parsed message or
    `Malformed`."""
    return {name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name), request_deserializer=req and _deserializer(req),
                response_serializer=resp.SerializeToString)
            for name, (req, resp) in MESSAGES.items()}


def make_server(dp: DataPlane, batchers: dict[str, DynamicBatcher], host: str, port: int,
                budget: BodyBudget | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on the running event loop (the one the batchers answer on); (server, bound port).
    Not started. `budget`: the in-flight byte budget it shares with the REST server (else its own)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_BODY + 64 * 1024),
                                      ("grpc.max_send_message_length", MAX_BODY + 64 * 1024),
                                      ("grpc.so_reuseport", 0)])
    methods = handlers(Servicer(dp, batchers, budget))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods),))
    server.add_registered_method_handlers("inference.GRPCInferenceService", methods)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address} (gRPC)")
    return server, bound
