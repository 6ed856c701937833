"""A bounded load test of `edgexfer serve` on 127.0.0.1: concurrent clients for a fixed time, with and
without dynamic batching, against the model's offline throughput at the same threads (the ceiling).

    .venv/bin/python benchmarks/bench_serve.py [RUN_DIR] [--clients 32] [--seconds 20]
                                               # -> benchmarks/results/serve.json

Clients send preprocessed tensors with tritonclient's binary tensor extension (its default). Each
client loops until the time is up; the test stops by itself and touches no other address.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def start_server(run: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "edgexfer.runtime", "serve", str(run), "--port", str(port),
                          "--server", "uvicorn", "--threads", str(threads), "--max-batch-size", str(max_batch),
                          "--max-queue-delay-ms", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("server did not start")


def load(url: str, model: str, shape, clients: int, seconds: float) -> dict:
    import tritonclient.http as httpclient

    lat, errors, stop = [], [0], time.time() + seconds
    lock = threading.Lock()

    def worker(i):
        c = httpclient.InferenceServerClient(url, connection_timeout=30, network_timeout=30)
        x = np.random.default_rng(i).standard_normal((1, *shape)).astype(np.float32)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        while time.time() < stop:
            t0 = time.perf_counter()
            try:
                c.infer(model, [inp])
                with lock:
                    lat.append(time.perf_counter() - t0)
            except Exception:
                with lock:
                    errors[0] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"requests": len(lat), "failed": errors[0], "throughput_rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def offline_ceiling(model_path: Path, threads: int, batch: int = 32) -> float:
    from edgexfer.runtime.bench import interleaved, onnx_candidate
    from edgexfer.runtime.model import EdgeModel

    shape = EdgeModel(model_path).input_shape
    c = onnx_candidate("m", model_path, threads)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    return batch / (interleaved([c], x, warmup=3, iters=20)["m"]["p50"] / 1e3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from edgexfer.runtime.server import resolve_models
    from edgexfer.runtime.model import EdgeModel

    run = Path(a.run)
    name, path = next(iter(resolve_models([run]).items()))
    shape = EdgeModel(path).input_shape
    res = {"command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]), "model": str(path),
           "clients": a.clients, "seconds": a.seconds, "threads": a.threads,
           "offline_ceiling_img_s": offline_ceiling(path, a.threads)}
    for label, max_batch in (("batching", 32), ("no_batching", 1)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = start_server(run, port, max_batch, a.threads)
        try:
            res[label] = load(f"127.0.0.1:{port}", name, shape, a.clients, a.seconds)
        finally:
            p.terminate()
            p.wait(timeout=60)
        res[label]["share_of_ceiling"] = res[label]["throughput_rps"] / res["offline_ceiling_img_s"]
    out = ROOT / "benchmarks" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from edgexfer.runtime.machine import machine_info
    res["machine"] = machine_info()
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
