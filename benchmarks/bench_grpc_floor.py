"""What grpcio itself costs a server per call: the Open Inference Protocol's ModelInfer answered by a servicer
that does nothing (a fixed response, no model, no validation), on grpcio's thread-pool server and on its
asyncio server (the one `edgexfer serve --grpc-port` runs), loaded by the same clients as bench_serve.py's
gRPC run (processes of sync stubs, one channel per client thread). The server process's CPU time per call
(user + system, from /proc) is the floor under any Python gRPC front end; compare it with the whole REST
path's server CPU per request in results/serve_grpc.json.

    .venv/bin/python benchmarks/bench_grpc_floor.py          # -> benchmarks/results/grpc_floor.json
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "grpc_floor.json"
CLIENT_PROCS, THREADS, CALLS = 2, 8, 500   # 16 clients, 500 calls each


def _pb():
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb
    from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc

    return pb, pb_grpc


def _response():
    pb, _ = _pb()
    r = pb.ModelInferResponse(model_name="m", model_version="1")
    r.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    r.raw_output_contents.append(np.zeros(10, np.float32).tobytes())
    return r


def serve(kind: str, port: int) -> None:
    import grpc

    pb, pb_grpc = _pb()
    resp = _response()

    class Sync(pb_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            return resp

    class Aio(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            return resp

    if kind == "thread pool (grpc.server)":
        s = grpc.server(futures.ThreadPoolExecutor(8))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Sync(), s)
        s.add_insecure_port(f"127.0.0.1:{port}")
        s.start()
        s.wait_for_termination()
    else:
        async def main():
            s = grpc.aio.server()
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(Aio(), s)
            s.add_insecure_port(f"127.0.0.1:{port}")
            await s.start()
            await s.wait_for_termination()
        asyncio.run(main())


def client(port: int, calls: int, q) -> None:
    import grpc

    pb, pb_grpc = _pb()
    x = np.zeros((1, 3, 96, 96), np.float32)  # the demo model's input
    req = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()])
    done = [0]

    def work():
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            for _ in range(calls):
                stub.ModelInfer(req, timeout=30)
                done[0] += 1

    from bench_serve import run_threads  # this script's folder is on sys.path when it runs

    run_threads(work, THREADS)
    q.put(done[0])


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(kind: str) -> dict:
    import grpc

    pb, pb_grpc = _pb()
    port = free_port()
    p = mp.Process(target=serve, args=(kind, port))
    p.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        q = mp.Queue()
        c0, t0 = cpu_s(p.pid), time.perf_counter()
        cs = [mp.Process(target=client, args=(port, CALLS, q)) for _ in range(CLIENT_PROCS)]
        for c in cs:
            c.start()
        n = sum(q.get() for _ in cs)
        for c in cs:
            c.join()
        wall, c1 = time.perf_counter() - t0, cpu_s(p.pid)
    finally:
        p.kill()
        p.join()
    return {"calls": n, "calls_per_s": n / wall, "server_cpu_ms_per_call": 1e3 * (c1 - c0) / n}


def main() -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    load = os.getloadavg()[0]
    res = {"command": "python benchmarks/bench_grpc_floor.py", **provenance(), "loadavg_1m_start": load,
           "clients": f"{CLIENT_PROCS} processes x {THREADS} threads, one channel each, {CALLS} calls per thread",
           "servicer": "ModelInfer returns a fixed response: no model, no validation, no batching",
           "servers": {k: measure(k) for k in ("thread pool (grpc.server)", "asyncio (grpc.aio.server)")}}
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["servers"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
