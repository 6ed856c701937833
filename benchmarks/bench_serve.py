"""A bounded load test of `edgexfer serve` on 127.0.0.1: 32 keep-alive clients for 20 s per server, with
and without dynamic batching, against each model's offline throughput at the same threads (the ceiling).

    .venv/bin/python benchmarks/bench_serve.py [RUN_DIR] [--configs 1x1,2x1] [--small RUN_DIR]
                                               # -> benchmarks/results/serve.json
    .venv/bin/python benchmarks/bench_serve.py --grpc [RUN_DIR] [--seconds 10 --rounds 2]
                                               # REST and gRPC, same clients, one server -> serve_grpc.json
    .venv/bin/python benchmarks/bench_serve.py --switch-ab 1000,100,20 [--rounds 2]
                                               # the server's GIL switch interval, A/B -> serve_switch_ab.json

Three models: the run's served file (the demo's INT8 model by default); the small fast one edgexfer
makes (EfficientNet-Lite0 at 32x32, INT8, built here by a 40 s linear-probe run), where the per-call
overhead dominates at batch 1; and a three-layer CNN on 32x32 (random weights), far faster than any HTTP
request, whose figure is the server's request rate.

Each server configuration INSTANCESxTHREADS (model instances computing side by side, ONNX Runtime
threads each) is measured against the ceiling at the same threads in all: the best offline throughput
of ONNX Runtime on the same file over batch sizes 8/16/32/64 and over the ways to spend those threads
(one session with all of them, spinning on or off; the instances side by side), measured right before
and right after each load run, the share taken against the mean of the two (the cores may be shared: a
ceiling minutes away can be 20% off). 1x1 leaves the second core of a 2-core host to HTTP and the
load generator; 2x1 gives both cores to inference, which HTTP and the load generator then share.

Load comes from `wrk` (one thread, epoll; `apt-get install wrk`) posting a prebuilt request in the binary
tensor extension, so the load generator costs the shared cores little; without wrk, from several
processes of http.client keep-alive clients. Every request is checked by status (wrk counts non-2xx
and socket errors as failures); one request per server is checked for its values before the load.
The test stops by itself and touches no other address.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADER = "Inference-Header-Content-Length"

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "{header_len}"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"connect\\": %d, \\"read\\": %d, " ..
    "\\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def small_model(out: Path) -> Path:
    """A three-layer CNN on 32x32 RGB (random weights, fixed seed) with edgexfer metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgexfer.exporters.metadata_io import save_model, set_props
    from edgexfer.runtime.metadata import InputSpec, ModelMeta, Preprocessing, Task

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * (2 / np.prod(shape[1:])) ** 0.5)
                                       .astype(np.float32), name)

    inits = [w("w1", 16, 3, 3, 3), w("w2", 32, 16, 3, 3), w("w3", 64, 32, 3, 3), w("fc", 64, 10),
             numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], "conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2", **conv),
             helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], "conv3", **conv),
             helper.make_node("Relu", ["c3"], ["r3"], "relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["g"], "gap"),
             helper.make_node("Flatten", ["g"], ["f"], "flatten"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], "fc")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    meta = ModelMeta(tasks=[Task("label", "logits", tuple(f"class{i}" for i in range(10)))],
                     input=InputSpec("input", 32, 32), preprocessing=Preprocessing(resize=32, crop=32),
                     provenance={"backbone": "small-cnn-32 (bench_serve.py, random weights)"})
    path = out / "tinycnn.onnx"
    save_model(set_props(model, meta), path)
    return path


def free_running(path: Path, sessions: int, threads: int, batch: int, seconds: float) -> float:
    """Images/s of `sessions` ONNX Runtime sessions (`threads` each, no spinning) computing batches side
    by side, each in its own thread for `seconds`: the offline form of a server with that many instances."""
    import threading

    from edgexfer.runtime.model import EdgeModel

    models = [EdgeModel(path, threads=threads, spinning=False) for _ in range(sessions)]
    x = np.random.default_rng(0).standard_normal((batch, *models[0].input_shape)).astype(np.float32)
    for m in models:
        m.run(x)  # warm up
    done = [0] * sessions
    start = threading.Barrier(sessions + 1)

    def work(i):
        start.wait()
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            models[i].run(x)
            done[i] += 1

    ts = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return sum(done) * batch / (time.perf_counter() - t0)


def offline_ceiling(path: Path, threads: int, instances: int) -> dict:
    """Best offline images/s of ONNX Runtime on this file with the server's ONNX Runtime threads in all
    (`instances` x `threads`), over batch sizes 8/16/32/64 and over the ways to spend those threads: one
    session with all of them (thread spinning on and off), and, when instances > 1, `instances` sessions
    side by side as the server runs them."""
    from edgexfer.runtime.bench import interleaved, onnx_candidate
    from edgexfer.runtime.model import EdgeModel

    shape = EdgeModel(path).input_shape
    total = threads * instances
    cands = [onnx_candidate("spin", path, total, spinning=True), onnx_candidate("nospin", path, total)]
    table = {}
    for batch in (8, 16, 32, 64):
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        res = interleaved(cands, x, warmup=5, duration=2.0)
        table[str(batch)] = {k: batch / (v["p50"] / 1e3) for k, v in res.items()}
        if instances > 1:
            table[str(batch)][f"{instances}x{threads}"] = free_running(path, instances, threads, batch, 2.0)
    best = max((v, b, k) for b, r in table.items() for k, v in r.items())
    return {"img_s": best[0], "batch": int(best[1]), "how": best[2], "spinning": best[2] == "spin",
            "threads_in_all": total, "table": table}


def binary_request(x: np.ndarray) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return head + x.astype("<f4").tobytes(), len(head)


def start_server(model: Path, port: int, max_batch: int, threads: int, delay_ms: float,
                 instances: int = 1, switch_interval_us: float | None = None,
                 grpc_port: int | None = None) -> subprocess.Popen:
    extra = [] if switch_interval_us is None else ["--switch-interval-us", f"{switch_interval_us:g}"]
    extra += [] if grpc_port is None else ["--grpc-port", str(grpc_port)]
    log = tempfile.TemporaryFile()  # the server's log, shown if it does not start
    p = subprocess.Popen([sys.executable, "-m", "edgexfer.runtime", "serve", str(model), "--port", str(port),
                          "--server", "uvicorn", "--threads", str(threads), "--instances", str(instances),
                          "--max-batch-size", str(max_batch),
                          "--max-queue-delay-ms", str(delay_ms), "--no-access-log", *extra],
                         stdout=subprocess.DEVNULL, stderr=log)
    return wait_ready(p, port, log)


def wait_ready(p: subprocess.Popen, port: int, log, settle_s: float = 0.0) -> subprocess.Popen:
    """`p` once its REST port answers /v2/health/ready (then `settle_s` more, e.g. for a gRPC port that opens
    after it); killed, with the tail of its `log` in the error, when it does not within 60 s."""
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            time.sleep(settle_s)
            return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    p.wait()
    log.seek(0)
    raise RuntimeError("server did not start: " + log.read().decode(errors="replace")[-500:])


def check_once(port: int, name: str, x: np.ndarray, want: np.ndarray) -> None:
    body, n = binary_request(x)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", f"/v2/models/{name}/infer", body, {HEADER: str(n)})
    r = c.getresponse()
    data = r.read()
    assert r.status == 200, data[:200]
    k = int(r.headers[HEADER])
    got = np.frombuffer(data[k:], "<f4").reshape(json.loads(data[:k])["outputs"][0]["shape"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    c.close()


def run_wrk(url: str, body: bytes, header_len: int, clients: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "body.bin").write_bytes(body)
        lua = Path(d) / "post.lua"
        lua.write_text(WRK_LUA.format(header_len=header_len, body=Path(d) / "body.bin"))
        out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(lua), url],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
    r = json.loads(re.search(r"WRK_JSON (\{.*\})", out).group(1))
    failed = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {"requests": r["requests"], "failed": failed, "throughput_rps": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3, "max_ms": r["max_us"] / 1e3}


def run_threads(target, n: int) -> None:
    """`n` threads running `target`, started together and joined."""
    import threading

    ts = [threading.Thread(target=target) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def _client_proc(port, path, body, header_len, threads, stop_at, q):
    lat, failed = [], [0]

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                c.request("POST", path, body, {HEADER: str(header_len)})
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    failed[0] += 1
            except OSError:
                failed[0] += 1
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    run_threads(worker, threads)
    q.put((lat, failed[0]))


def run_python(port: int, path: str, body: bytes, header_len: int, clients: int, seconds: float) -> dict:
    return load(_client_proc, (port, path, body, header_len), clients, seconds)


def load(client_proc, args: tuple, clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients for `seconds`, spread over up to 4 processes running
    `client_proc(*args, n_clients, stop_at, queue)`, each putting (latencies in s, failures) on the queue."""
    procs_n = min(4, clients)
    q = mp.Queue()
    t0 = time.perf_counter()
    stop_at = time.time() + seconds
    procs = [mp.Process(target=client_proc, args=(*args, len(range(i, clients, procs_n)), stop_at, q))
             for i in range(procs_n)]
    for p in procs:
        p.start()
    parts = [q.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    ms = np.concatenate([np.asarray(lat) for lat, _ in parts]) * 1e3
    return {"requests": len(ms), "failed": sum(f for _, f in parts), "throughput_rps": len(ms) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def grpc_request(name: str, x: np.ndarray):
    """A ModelInfer request with the tensor's bytes in raw_input_contents (tritonclient's way)."""
    from edgexfer.runtime import grpc_predict_v2_pb2 as pb

    return pb.ModelInferRequest(model_name=name, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.astype("<f4").tobytes()])


def grpc_check_once(port: int, name: str, x: np.ndarray, want: np.ndarray) -> None:
    import grpc

    from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(grpc_request(name, x), timeout=30)
    got = np.frombuffer(r.raw_output_contents[0], "<f4").reshape(r.outputs[0].shape)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _grpc_client_proc(port, name, x, threads, stop_at, q):
    """`threads` gRPC clients, each on a connection of its own (as each REST client has its keep-alive
    connection), calling ModelInfer back to back until `stop_at`."""
    import grpc

    from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc

    req = grpc_request(name, x)
    lat, failed = [], [0]

    def worker():
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            while time.time() < stop_at:
                t0 = time.perf_counter()
                try:
                    stub.ModelInfer(req, timeout=30)
                    lat.append(time.perf_counter() - t0)
                except grpc.RpcError:
                    failed[0] += 1

    run_threads(worker, threads)
    q.put((lat, failed[0]))


def run_grpc(port: int, name: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    """As run_python, over gRPC: the same processes and clients, the same request."""
    return load(_grpc_client_proc, (port, name, x), clients, seconds)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's finished (waited-for) children: the load generator's client processes."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def grpc_vs_rest(name: str, source: Path, path: Path, a) -> dict:
    """One server (`--grpc-port` beside REST, batching, 1 instance x 1 thread) loaded by the same 32 clients
    over REST (binary tensor extension) and over gRPC (raw_input_contents), alternating `a.rounds` times
    (the cores are shared: alternating spreads what else runs over both)."""
    x, want = reference(path)
    body, header_len = binary_request(x)
    port, gport = free_port(), free_port()
    p = start_server(source, port, a.max_batch_size, 1, a.max_queue_delay_ms, 1, a.switch_interval_us, gport)
    runs = {"rest": [], "grpc": []}
    try:
        check_once(port, name, x, want)
        grpc_check_once(gport, name, x, want)
        for _ in range(a.rounds):
            for kind in ("rest", "grpc"):
                load, server0, clients0 = loadavg(), process_cpu_s(p.pid), children_cpu_s()
                r = (run_python(port, f"/v2/models/{name}/infer", body, header_len, a.clients, a.seconds)
                     if kind == "rest" else run_grpc(gport, name, x, a.clients, a.seconds))
                r["loadavg_1m_before"] = load
                # what each request cost the server's process and the load generator's, in CPU time: on shared
                # cores the clients' cost lowers the throughput too, so the server's own is what a remote
                # client would see
                r["server_cpu_s"] = process_cpu_s(p.pid) - server0
                r["clients_cpu_s"] = children_cpu_s() - clients0
                runs[kind].append(r)
                print(f"{name:>9} {kind:>4}: {r['throughput_rps']:7.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms, failed {r['failed']}; load {load:.2f}", file=sys.stderr)
    finally:
        p.terminate()
        p.wait(timeout=60)
    out = {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name), "input": list(x.shape[1:]),
           "server": {"max_batch_size": a.max_batch_size, "max_queue_delay_ms": a.max_queue_delay_ms,
                      "threads": 1, "instances": 1}, "runs": runs}
    for kind, rs in runs.items():
        n_req = sum(r["requests"] for r in rs)
        out[kind] = {"mean_rps": float(np.mean([r["throughput_rps"] for r in rs])),
                     "failed": sum(r["failed"] for r in rs),
                     "server_cpu_ms_per_request": 1e3 * sum(r["server_cpu_s"] for r in rs) / max(1, n_req),
                     "clients_cpu_ms_per_request": 1e3 * sum(r["clients_cpu_s"] for r in rs) / max(1, n_req)}
    out["grpc_over_rest"] = out["grpc"]["mean_rps"] / out["rest"]["mean_rps"]
    out["grpc_over_rest_server_cpu_per_request"] = (out["grpc"]["server_cpu_ms_per_request"]
                                                    / out["rest"]["server_cpu_ms_per_request"])
    out["bound_met"] = out["grpc_over_rest"] >= 1 and out["grpc"]["failed"] == 0 and out["rest"]["failed"] == 0
    return out


def mean_batch(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    vals = {k: float(v) for k, v in re.findall(rf'^(edgexfer_batch_size_(?:sum|count))\{{model="{name}"\}} (\S+)$',
                                                  text, re.M)}
    return vals["edgexfer_batch_size_sum"] / vals["edgexfer_batch_size_count"] if vals.get("edgexfer_batch_size_count") else None


def reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The one image every request carries, and the logits EdgeModel gives for it."""
    from edgexfer.runtime.model import EdgeModel

    m = EdgeModel(path)
    x = np.random.default_rng(1).standard_normal((1, *m.input_shape)).astype(np.float32)
    return x, m.run(x)[m.meta.tasks[0].name]


def load_run(name: str, source: Path, x: np.ndarray, want: np.ndarray, a, use_wrk: bool, *, threads: int,
             instances: int, max_batch: int, switch_interval_us: float | None) -> dict:
    """One server, checked once for its values, then under load for `a.seconds`."""
    body, header_len = binary_request(x)
    port = free_port()
    p = start_server(source, port, max_batch, threads, a.max_queue_delay_ms, instances, switch_interval_us)
    try:
        check_once(port, name, x, want)
        load_before = loadavg()
        r = (run_wrk(f"http://127.0.0.1:{port}/v2/models/{name}/infer", body, header_len, a.clients, a.seconds)
             if use_wrk else run_python(port, f"/v2/models/{name}/infer", body, header_len, a.clients, a.seconds))
        r["mean_batch"] = mean_batch(port, name)
        r["loadavg_1m_before"] = load_before
    finally:
        p.terminate()
        p.wait(timeout=60)
    r["server"] = {"max_batch_size": max_batch, "max_queue_delay_ms": a.max_queue_delay_ms, "threads": threads,
                   "instances": instances, "switch_interval_us": switch_interval_us or "default"}
    return r


def against(r: dict, before: dict, after: dict) -> dict:
    """The share of the ceiling, the ceiling taken as the mean of the one measured right before the load run
    and the one right after (the cores are shared: a ceiling minutes away can be 20% off)."""
    r["ceiling"] = {**before, "img_s": (before["img_s"] + after["img_s"]) / 2,
                    "before_img_s": before["img_s"], "after_img_s": after["img_s"]}
    r["share_of_ceiling"] = r["throughput_rps"] / r["ceiling"]["img_s"]
    return r


def bench_model(name: str, source: Path, path: Path, a, use_wrk: bool) -> dict:
    """`source`: what `edgexfer serve` is given (serving it under `name`); `path`: its ONNX file."""
    x, want = reference(path)
    res = {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name),
           "input": list(x.shape[1:]), "request_bytes": len(binary_request(x)[0])}
    for instances, threads in a.configs:
        cfg = res[f"{instances}x{threads}"] = {}
        ceiling = offline_ceiling(path, threads, instances)
        for label, max_batch in (("batching", a.max_batch_size), ("no_batching", 1)):
            r = load_run(name, source, x, want, a, use_wrk, threads=threads, instances=instances,
                         max_batch=max_batch, switch_interval_us=a.switch_interval_us)
            after = offline_ceiling(path, threads, instances)
            cfg[label] = r = against(r, ceiling, after)
            ceiling = after
            print(f"{name:>9} {instances}x{threads} {label:>11}: {r['throughput_rps']:7.0f} req/s = "
                  f"{r['share_of_ceiling']:.2f} of {r['ceiling']['img_s']:.0f} img/s (before {r['ceiling']['before_img_s']:.0f}, "
                  f"after {r['ceiling']['after_img_s']:.0f}; batch {r['ceiling']['batch']}, {r['ceiling']['how']}); "
                  f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; failed {r['failed']}; "
                  f"mean batch {r['mean_batch'] or 0:.1f}; load {r['loadavg_1m_before']:.2f}", file=sys.stderr)
    return res


def switch_ab(name: str, source: Path, path: Path, a, use_wrk: bool, intervals: list[float]) -> dict:
    """The server's GIL switch interval, A/B: for each configuration, the server with batching at each
    interval in turn, `a.rounds` rounds, a ceiling between every two load runs."""
    x, want = reference(path)
    res = {}
    for instances, threads in a.configs:
        runs: dict[str, list] = {f"{us:g}": [] for us in intervals}
        ceiling = offline_ceiling(path, threads, instances)
        for rnd in range(a.rounds):
            for us in intervals:
                r = load_run(name, source, x, want, a, use_wrk, threads=threads, instances=instances,
                             max_batch=a.max_batch_size, switch_interval_us=us)
                after = offline_ceiling(path, threads, instances)
                runs[f"{us:g}"].append(r := against(r, ceiling, after))
                ceiling = after
                print(f"{name:>9} {instances}x{threads} round {rnd + 1} switch interval {us:g} us: "
                      f"{r['throughput_rps']:7.0f} req/s = {r['share_of_ceiling']:.2f} of {r['ceiling']['img_s']:.0f} "
                      f"img/s; p99 {r['p99_ms']:.1f} ms; failed {r['failed']}", file=sys.stderr)
        res[f"{instances}x{threads}"] = {
            "runs": runs,
            "median_share": {k: float(np.median([r["share_of_ceiling"] for r in v])) for k, v in runs.items()},
            "median_rps": {k: float(np.median([r["throughput_rps"] for r in v])) for k, v in runs.items()}}
    return res


def small_run(out: Path) -> Path:
    """The small fast model edgexfer itself makes: EfficientNet-Lite0 at 32x32 (Fashion-MNIST's own size),
    a linear probe on the default data (about 40 s), exported and quantized -> its run folder."""
    subprocess.run([sys.executable, "-m", "edgexfer", "run", "--image-size", "32", "--strategy", "linear",
                    "--runs", str(out), "--name", "small32", "--bench-iters", "10"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "small32"


def _configs(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in c.split("x")) for c in text.split(",")]
        assert all(len(c) == 2 and min(c) >= 1 for c in out)
        return out
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected INSTANCESxTHREADS[,...], e.g. 1x1,2x1; got {text!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default=str(ROOT / "runs" / "demo"), help="run folder or ONNX file")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--configs", type=_configs, default=_configs("1x1,2x1"),
                    help="server configurations INSTANCESxTHREADS (ONNX Runtime threads per instance), "
                         "each against the offline ceiling at the same threads in all")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    ap.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--small", type=Path, help="the small fast model's run folder (default: made here, ~40 s)")
    ap.add_argument("--no-small", action="store_true", help="only the given run's model")
    ap.add_argument("--switch-interval-us", type=float, help="the server's GIL switch interval (default: the server's)")
    ap.add_argument("--switch-ab", type=lambda t: [float(v) for v in t.split(",")],
                    help="instead of the load test: the small fast model and the 3-layer CNN, with batching, at each "
                         "of these switch intervals (us, comma-separated) in turn, --rounds times -> serve_switch_ab.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grpc", action="store_true",
                    help="instead of the load test: the same clients over REST and over gRPC against one server "
                         "(--grpc-port), alternating --rounds times, for the run's model and the 3-layer CNN "
                         "-> serve_grpc.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    a = ap.parse_args()
    from edgexfer.runtime.machine import machine_info
    from edgexfer.runtime.server import resolve_models

    use_wrk = a.load == "wrk" or (a.load == "auto" and shutil.which("wrk") is not None)
    if a.load == "wrk" and not shutil.which("wrk"):
        sys.exit("error: wrk not found (apt-get install wrk), or use --load python")
    name, path = next(iter(resolve_models([Path(a.run)]).items()))
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0] if use_wrk else None
    res = {"command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
           "load_generator": (f"{wrk_version.strip()}: 1 thread, {a.clients} keep-alive connections"
                              if use_wrk else f"{min(4, a.clients)} processes of http.client keep-alive threads"),
           "clients": a.clients, "seconds": a.seconds, "configs": [f"{i}x{t}" for i, t in a.configs],
           "loadavg_1m_start": loadavg(), "models": {}}
    if a.grpc:
        res["load_generator"] = (f"{min(4, a.clients)} processes of keep-alive clients (http.client threads for "
                                 "REST; grpc sync stubs, one channel each, for gRPC)")
        with tempfile.TemporaryDirectory() as d:
            cnn = small_model(Path(d))
            res["grpc_vs_rest"] = {name: grpc_vs_rest(name, Path(a.run), Path(path), a),
                                   "tinycnn": grpc_vs_rest("tinycnn", cnn, cnn, a)}
        res["loadavg_1m_end"] = loadavg()
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from render_results import provenance

        res.update(provenance())
        out = a.out.with_name("serve_grpc.json") if a.out.name == "serve.json" else a.out
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({m: {k: r[k] for k in ("rest", "grpc", "grpc_over_rest", "bound_met")}
                          for m, r in res["grpc_vs_rest"].items()}, indent=2))
        return 0
    if a.switch_ab:
        with tempfile.TemporaryDirectory() as d:
            small = a.small or small_run(Path(d))
            sname, spath = next(iter(resolve_models([small]).items()))
            cnn = small_model(Path(d))
            res["switch_ab"] = {sname: switch_ab(sname, small, Path(spath), a, use_wrk, a.switch_ab),
                                "tinycnn": switch_ab("tinycnn", cnn, cnn, a, use_wrk, a.switch_ab)}
        res["machine"] = machine_info()
        out = a.out.with_name("serve_switch_ab.json") if a.out.name == "serve.json" else a.out
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({m: {c: v["median_rps"] for c, v in r.items()} for m, r in res["switch_ab"].items()}))
        return 0
    with tempfile.TemporaryDirectory() as d:
        models = {name: (Path(a.run), Path(path))}
        if not a.no_small:
            small = a.small or small_run(Path(d))
            sname, spath = next(iter(resolve_models([small]).items()))
            models[sname] = (small, spath)
            cnn = small_model(Path(d))  # the server's request rate: a model far faster than any request
            models["tinycnn"] = (cnn, cnn)
        for n, (source, p) in models.items():
            res["models"][n] = bench_model(n, source, p, a, use_wrk)
    res["loadavg_1m_end"] = loadavg()
    res["machine"] = machine_info()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
