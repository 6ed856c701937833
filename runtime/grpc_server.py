"""The Open Inference Protocol's gRPC front end (`inference.GRPCInferenceService`, runtime/grpc_predict_v2.proto),
over the same data plane and dynamic batchers as the REST server it runs beside:

    edgexfer serve runs/demo --grpc-port 8001        # needs: pip install "edgexfer[serve]"

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with the input's values
as raw bytes (`raw_input_contents`, the outputs then come back as `raw_output_contents`) or typed
(`contents.fp32_contents`). Everything a request means is decided by `dataplane.DataPlane` (the REST
answers' validation, the bearer token from the `authorization` metadata, the access log); its HTTP
statuses map onto gRPC codes (`CODES`: 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, ...).
Needs grpcio and protobuf (the [serve] extra); imported only when a gRPC port is asked for.
"""
from __future__ import annotations

import json
import logging
import math
import time

import grpc
import numpy as np

from edgexfer.runtime import grpc_predict_v2_pb2 as pb
from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc
from edgexfer.runtime.batcher import DynamicBatcher
from edgexfer.runtime.dataplane import DataPlane
from edgexfer.runtime.protocol import MAX_BODY, HeaderCache, HTTPError

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.INVALID_ARGUMENT,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED, 500: grpc.StatusCode.INTERNAL}
OPEN = frozenset({"ServerLive", "ServerReady"})  # the health probes, answered without the token


def _param(p) -> object:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dp: DataPlane, batchers: dict[str, DynamicBatcher]):
        self.dp, self.batchers = dp, batchers
        self.caches = {n: HeaderCache() for n in dp.models}

    async def _call(self, method: str, request, context, answer):
        """Authorise, answer, map a failure onto its gRPC status, log one access line."""
        t0, status, model = time.perf_counter(), 200, getattr(request, "model_name", "") or getattr(request, "name", "")
        try:
            if method not in OPEN:
                auth = dict(context.invocation_metadata() or ()).get("authorization")
                self.dp.authorize(SERVICE + method, auth)
            return await answer()
        except Exception as e:
            status, message, _ = self.dp.failure(e)
            await context.abort(CODES.get(status, grpc.StatusCode.UNKNOWN), message)
        finally:
            self.dp.log_access(context.peer() or "-", "GRPC", SERVICE + method, status, time.perf_counter() - t0, model)

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

    async def ModelInfer(self, request, context):
        async def answer():
            name = request.model_name
            self.dp.model(name, request.model_version)
            x, h, raw = self.tensor(request)
            outs = await self.batchers[name].submit(x)
            return self.response(request, h, outs, raw)
        return await self._call("ModelInfer", request, context, answer)

    def tensor(self, request) -> tuple[np.ndarray, object, bool]:
        """The request's one input as an array, checked by the data plane exactly as a REST infer header
        (name, datatype, shape, requested outputs) is; (array, checked header, whether it came raw)."""
        if len(request.inputs) != 1:
            raise HTTPError(400, "expected {'inputs': [one tensor]}")
        t, raw = request.inputs[0], len(request.raw_input_contents) > 0
        if raw and len(request.raw_input_contents) != 1:
            raise HTTPError(400, "raw_input_contents must hold one entry per input")
        if raw and t.HasField("contents"):
            raise HTTPError(400, "an input has both contents and raw_input_contents")
        values = t.contents.fp32_contents
        if not raw and t.datatype == "FP32" and not values and math.prod(t.shape) > 0:
            other = [f.name for f, _ in t.contents.ListFields()]
            raise HTTPError(400, f"bad tensor: FP32 values belong in contents.fp32_contents or raw_input_contents"
                                 f"{', not ' + ', '.join(other) if other else ''}")
        data = request.raw_input_contents[0] if raw else None
        size = len(data) if raw else 4 * len(values)
        if size > MAX_BODY:
            raise HTTPError(400, f"input of {size} bytes exceeds {MAX_BODY}")
        head = {"id": request.id, "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                                              "parameters": {"binary_data_size": size}}]}
        if request.outputs:
            head["outputs"] = [{"name": o.name} for o in request.outputs]
        body = json.dumps(head).encode()
        if raw:
            x, h = self.dp.infer_input(request.model_name, body + data, str(len(body)),
                                       self.caches[request.model_name])
        else:
            _, h = self.dp.infer_input(request.model_name, body + b"\0" * size, str(len(body)),
                                       self.caches[request.model_name])
            x = np.asarray(values, dtype=np.float32).reshape(h.shape)
        return x, h, raw

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


def make_server(dp: DataPlane, batchers: dict[str, DynamicBatcher], host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on the running event loop (the one the batchers answer on); (server, bound port).
    Not started."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_BODY + 64 * 1024),
                                      ("grpc.max_send_message_length", MAX_BODY + 64 * 1024),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(dp, batchers), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address} (gRPC)")
    return server, bound
