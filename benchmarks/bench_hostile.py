"""Issue 26's bounds under hostile clients, on 127.0.0.1, bounded in time (about 3 minutes at the defaults):

    .venv/bin/python benchmarks/bench_hostile.py [--seconds 20] [--slow-seconds 60]
                                                 # -> benchmarks/results/hostile.json

(a) multipart floods, each REST server (`--server stdlib`, `--server uvicorn`): two client processes loop
    the worst bodies (10,000 tiny parts in 0.55 MB, 100,000 in 5.4 MB, and a Content-Type of 20,000 RFC 2231
    continuations) while one client posts a valid multipart /classify after another. Bound: its p50 within
    3x its p50 unloaded, no valid request failing.
(b) 48 concurrent 16 MB ModelInfer calls over gRPC (and 48 to an unknown model), against the same 48 over
    REST, each burst on a fresh uvicorn server (`--grpc-port`, default `--max-inflight-mib` 128). Peak RSS
    (the kernel's VmHWM) and RSS 3 s after the burst. Bounds: gRPC peak within 1.5x the REST peak, RSS after
    within 20% of idle (before the burst, after a few warm-up calls). Once more with EDGEXFER_MALLOC_TRIM=0,
    to show what handing freed memory back to the OS does.
(c) the standard-library server while 300 sockets each send one header byte every 5 s for `--slow-seconds`
    (reopened at the next tick when the server closes them): a valid request on a new connection every
    0.5 s. Bound: every one answered 200 within 1 s.

The model is bench_serve.py's three-layer CNN on 32x32 (random weights, made here): no weights to download.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "hostile.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_serve import small_model, wait_ready  # noqa: E402  (one server start, one model)
B = "bench0boundary"
HEADER = "Inference-Header-Content-Length"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, kind: str, grpc: bool = False, env: dict | None = None) -> tuple[subprocess.Popen, int, int]:
    """`edgexfer serve MODEL --server KIND` (with --grpc-port) on free ports; (process, REST port, gRPC port)."""
    port, gport = free_port(), free_port() if grpc else 0
    log = tempfile.TemporaryFile()
    p = subprocess.Popen([sys.executable, "-m", "edgexfer.runtime", "serve", str(model), "--server", kind,
                          "--port", str(port), "--threads", "1", "--no-access-log",
                          *(["--grpc-port", str(gport)] if grpc else [])],
                         stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
    return wait_ready(p, port, log, settle_s=1.0 if grpc else 0.0), port, gport  # gRPC opens after REST


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


# -- (a) multipart floods --------------------------------------------------------------------------

def upload(data: bytes) -> bytes:
    """What `curl -F image=@x.png` sends."""
    return (f"--{B}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{B}--\r\n".encode()


def hostile_bodies() -> list[tuple[str, bytes, str]]:
    one = f"--{B}\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n".encode()
    ctype = f"multipart/form-data; boundary={B}"
    rfc2231 = "multipart/form-data; " + "; ".join(f"boundary*{i}=x" for i in range(20000))
    return [("10,000 parts", one * 10_000 + f"--{B}--\r\n".encode(), ctype),
            ("100,000 parts", one * 100_000 + f"--{B}--\r\n".encode(), ctype),
            ("RFC 2231 Content-Type", upload(b"x" * 100), rfc2231)]


def _hostile(port: int, stop_at: float, q) -> None:
    """Loop the hostile bodies until `stop_at`; put (statuses seen, requests sent)."""
    statuses: dict[str, int] = {}
    bodies, n = hostile_bodies(), 0
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.time() < stop_at:
        _, body, ctype = bodies[n % len(bodies)]
        n += 1
        try:
            c.request("POST", "/v2/models/tinycnn/classify", body, {"Content-Type": ctype})
            r = c.getresponse()
            r.read()
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            if r.getheader("connection", "").lower() == "close":
                c.close()
        except (OSError, http.client.HTTPException) as e:
            statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
            c.close()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    q.put((statuses, n))


def probe(port: int, body: bytes, seconds: float) -> tuple[list[float], int]:
    """Valid multipart /classify calls one after another on a keep-alive connection: (latencies, failures)."""
    lat, failed = [], 0
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": f"multipart/form-data; boundary={B}"}
    end = time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v2/models/tinycnn/classify?top_k=3", body, headers)
            r = c.getresponse()
            data = r.read()
            if r.status == 200 and len(json.loads(data)["predictions"]) == 3:
                lat.append(time.perf_counter() - t0)
            else:
                failed += 1
        except (OSError, http.client.HTTPException, ValueError):
            failed += 1
            c.close()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.close()
    return lat, failed


def floods(model: Path, kind: str, seconds: float) -> dict:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(b, "PNG")
    body = upload(b.getvalue())
    p, port, _ = start(model, kind)
    try:
        probe(port, body, 1.0)  # warm-up
        quiet, quiet_failed = probe(port, body, seconds / 2)
        q = mp.Queue()
        stop_at = time.time() + seconds + 1
        cpu0 = cpu_s(p.pid)
        clients = [mp.Process(target=_hostile, args=(port, stop_at, q)) for _ in range(2)]
        for c in clients:
            c.start()
        time.sleep(0.5)
        loaded, loaded_failed = probe(port, body, seconds)
        results = [q.get(timeout=120) for _ in clients]
        for c in clients:
            c.join()
        cpu = cpu_s(p.pid) - cpu0
    finally:
        stop(p)
    statuses: dict[str, int] = {}
    for st, _ in results:
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
    hostile_n = sum(n for _, n in results)
    p50_quiet, p50_loaded = statistics.median(quiet), statistics.median(loaded)
    return {"valid_p50_ms_unloaded": 1e3 * p50_quiet, "valid_p50_ms_loaded": 1e3 * p50_loaded,
            "valid_p99_ms_loaded": 1e3 * float(np.percentile(loaded, 99)),
            "loaded_over_unloaded": p50_loaded / p50_quiet, "valid_requests": len(quiet) + len(loaded),
            "valid_failed": quiet_failed + loaded_failed, "hostile_requests": hostile_n,
            "hostile_statuses": statuses, "server_cpu_s_under_load": cpu,
            "bound_p50_within_3x_met": p50_loaded <= 3 * p50_quiet and quiet_failed + loaded_failed == 0}


# -- (b) 48 x 16 MB --------------------------------------------------------------------------------

def big_input() -> np.ndarray:
    rows = (16 * 1024 * 1024 - 4096) // (3 * 32 * 32 * 4)  # 16 MB, under MAX_BODY with its header
    return np.random.default_rng(1).standard_normal((rows, 3, 32, 32)).astype("<f4")


def at_once(n: int, call) -> dict[str, int]:
    """`call(go)` in `n` threads, each connecting, then waiting on the barrier `go` so that every request is in
    flight together, then returning its status; how many got each status."""
    codes: dict[str, int] = {}
    lock, go = threading.Lock(), threading.Barrier(n)

    def one():
        code = call(go)
        with lock:
            codes[code] = codes.get(code, 0) + 1

    ts = [threading.Thread(target=one) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return codes


def burst_grpc(port: int, model: str, x: np.ndarray, n: int = 48) -> dict[str, int]:
    import grpc

    from edgexfer.runtime import grpc_predict_v2_pb2 as pb
    from edgexfer.runtime import grpc_predict_v2_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()])
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1)]

    def one(go) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            grpc.channel_ready_future(ch).result(timeout=30)
            go.wait()
            try:
                stub.ModelInfer(req, timeout=120)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

    return at_once(n, one)


def burst_rest(port: int, x: np.ndarray, n: int = 48) -> dict[str, int]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    body = head + x.tobytes()

    def one(go) -> str:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.connect()
        go.wait()
        try:
            c.request("POST", "/v2/models/tinycnn/infer", body, {HEADER: str(len(head)),
                                                                 "Content-Type": "application/octet-stream"})
            r = c.getresponse()
            r.read()
            return str(r.status)
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__
        finally:
            c.close()

    return at_once(n, one)


def memory(model: Path, how: str, trim: bool = True) -> dict:
    """One burst on a fresh uvicorn server with gRPC: `how` is rest, grpc or grpc-unknown."""
    x = big_input()
    p, port, gport = start(model, "uvicorn", grpc=True, env=None if trim else {"EDGEXFER_MALLOC_TRIM": "0"})
    try:
        small = x[:2].copy()
        for _ in range(3):  # warm-up: both front ends answer once
            burst_rest(port, small, 1)
            burst_grpc(gport, "tinycnn", small, 1)
        time.sleep(1.0)
        idle = status_kb(p.pid, "VmRSS")
        t0 = time.perf_counter()
        codes = (burst_rest(port, x) if how == "rest" else
                 burst_grpc(gport, "tinycnn" if how == "grpc" else "nope", x))
        took = time.perf_counter() - t0
        time.sleep(3.0)
        after, peak = status_kb(p.pid, "VmRSS"), status_kb(p.pid, "VmHWM")
    finally:
        stop(p)
    return {"calls": 48, "mb_each": round(x.nbytes / 1e6, 2), "codes": codes, "seconds": took,
            "rss_idle_mib": idle / 1024, "rss_peak_mib": peak / 1024, "rss_after_mib": after / 1024,
            "after_over_idle": after / idle, "malloc_trim": trim}


# -- (c) slowloris ---------------------------------------------------------------------------------

def _slow(port: int, sockets: int, stop_at: float, q) -> None:
    """`sockets` connections each sending one header byte every 5 s; those the server closed are reopened
    at the next tick. Puts (bytes sent, reopened)."""
    def opened():
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        return s

    conns, sent, reopened = [], 0, 0
    for _ in range(sockets):
        try:
            conns.append(opened())
        except OSError:
            conns.append(None)
    while time.time() < stop_at:
        for i, s in enumerate(conns):
            try:
                if s is None:
                    raise OSError
                try:
                    if s.recv(4096) == b"":  # closed by the server
                        raise OSError
                except BlockingIOError:
                    pass
                s.send(b"a")
                sent += 1
            except OSError:
                if s is not None:
                    s.close()
                try:
                    conns[i] = opened()
                    reopened += 1
                except OSError:
                    conns[i] = None
        time.sleep(max(0.0, min(5.0, stop_at - time.time())))
    for s in conns:
        if s is not None:
            s.close()
    q.put((sent, reopened))


def slowloris(model: Path, seconds: float) -> dict:
    p, port, _ = start(model, "stdlib")
    try:
        q = mp.Queue()
        attacker = mp.Process(target=_slow, args=(port, 300, time.time() + seconds, q))
        attacker.start()
        time.sleep(2.0)  # every socket open
        lat, codes = [], {}
        end = time.time() + seconds - 3
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("GET", "/v2/health/ready")
                r = c.getresponse()
                r.read()
                c.close()
                code = str(r.status)
            except (OSError, http.client.HTTPException) as e:
                code = type(e).__name__
            lat.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1
            time.sleep(0.5)
        sent, reopened = q.get(timeout=seconds + 60)
        attacker.join()
    finally:
        stop(p)
    return {"slow_sockets": 300, "seconds": seconds, "probes": len(lat), "probe_codes": codes,
            "probe_max_s": max(lat), "probe_p50_ms": 1e3 * statistics.median(lat), "attacker_bytes_sent": sent,
            "attacker_reopened": reopened,
            "bound_all_200_within_1s_met": codes == {"200": len(lat)} and max(lat) < 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20, help="(a): loaded seconds per server")
    ap.add_argument("--slow-seconds", type=float, default=60, help="(c): how long the 300 slow sockets stay")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    from render_results import provenance

    cmd = "python benchmarks/bench_hostile.py" + ("" if a.seconds == 20 else f" --seconds {a.seconds:g}") + \
          ("" if a.slow_seconds == 60 else f" --slow-seconds {a.slow_seconds:g}")
    res = {"command": cmd, **provenance(), "loadavg_1m_start": os.getloadavg()[0],
           "model": "bench_serve.py's three-layer CNN on 32x32 (random weights), ONNX Runtime 1 thread"}
    with tempfile.TemporaryDirectory() as tmp:
        model = small_model(Path(tmp))
        res["multipart_floods"] = {k: floods(model, k, a.seconds) for k in ("stdlib", "uvicorn")}
        print(json.dumps(res["multipart_floods"], indent=2), flush=True)
        mem = {"rest": memory(model, "rest"), "grpc": memory(model, "grpc"),
               "grpc_unknown_model": memory(model, "grpc-unknown"),
               "grpc_without_malloc_trim": memory(model, "grpc", trim=False)}
        peak = max(mem["grpc"]["rss_peak_mib"], mem["grpc_unknown_model"]["rss_peak_mib"])
        mem["grpc_peak_over_rest_peak"] = peak / mem["rest"]["rss_peak_mib"]
        mem["bound_grpc_peak_within_1_5x_rest_met"] = mem["grpc_peak_over_rest_peak"] <= 1.5
        mem["bound_after_within_20pct_of_idle_met"] = all(
            mem[k]["after_over_idle"] <= 1.2 for k in ("rest", "grpc", "grpc_unknown_model"))
        res["grpc_memory"] = mem
        print(json.dumps(mem, indent=2), flush=True)
        res["slowloris_stdlib"] = slowloris(model, a.slow_seconds)
        print(json.dumps(res["slowloris_stdlib"], indent=2), flush=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
