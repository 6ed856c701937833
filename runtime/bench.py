"""Benchmark models where they run: latency, throughput, cold start, memory — several models side by side.

Needs only the runtime install (numpy, onnxruntime); OpenVINO and PyTorch are measured beside ONNX
Runtime when installed. Runs are interleaved — one timed call of each model in turn — so drift of a
shared, noisy machine hits every model alike; the ratios to the first model are what to trust.

    edgexfer bench runs/demo                          # every ONNX file of a run folder (+ references)
    edgexfer bench a.onnx b.onnx --duration 20 --sweep --json out.json --markdown out.md --plot out.png
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgexfer.runtime.errors import RuntimeInputError

SCHEMA = "edgexfer.bench/1"


def summarize(times_s: Sequence[float]) -> dict:
    """Latency statistics in milliseconds (MLPerf's single-stream scenario reports p90)."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    pct = {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 95, 99)}
    return {**pct, "mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms.min()),
            "max": float(ms.max()), "n": int(ms.size)}


@dataclass
class Candidate:
    name: str
    fn: Callable[[np.ndarray], object]  # called with one input batch
    backend: str = "onnxruntime"
    file: str | None = None


def interleaved(candidates: list[Candidate], x: np.ndarray, *, warmup: int = 10, iters: int = 100,
                duration: float = 0.0) -> dict[str, dict]:
    """Latency of each candidate on input `x`, interleaved, after `warmup` calls each.

    Runs `iters` rounds, or, with `duration` > 0, rounds until that many seconds have passed.
    """
    for c in candidates:
        for _ in range(warmup):
            c.fn(x)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    start = time.perf_counter()
    rounds = 0
    while (time.perf_counter() - start < duration) if duration > 0 else rounds < iters:
        for c in candidates:
            t0 = time.perf_counter()
            c.fn(x)
            times[c.name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: summarize(t) for name, t in times.items()}


# -- candidates ------------------------------------------------------------------------------------

def onnx_candidate(name: str, path, threads: int, spinning: bool = False) -> Candidate:
    """An ONNX Runtime session on the CPU. Spinning is off by default: interleaved with other
    candidates, ONNX Runtime's busy-waiting threads would steal the cores the next one runs on."""
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads, spinning=spinning),
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    return Candidate(name, lambda x: sess.run(None, {inp: x}), "onnxruntime", str(path))


def openvino_candidate(name: str, path, threads: int) -> Candidate | None:
    """OpenVINO on the same ONNX file, when the `openvino` package is installed (else None)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": int(threads),
                                                     "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    return Candidate(name, lambda x: req.infer({0: x}), f"openvino {ov.__version__.split('-')[0]}", str(path))


# Reference backends that need more than the runtime (PyTorch eager from a run's checkpoint) are
# handed in by the caller as factories: (run_dir, threads) -> Candidate | None. The runtime itself
# never imports torch.
ReferenceFactory = Callable[[Path, int], "Candidate | None"]


# -- cold start and memory, in a fresh process -------------------------------------------------------

_COLD = r"""
import json, resource, sys, time
t_main = time.time()
import numpy as np
from edgexfer.runtime import EdgeModel
t_import = time.time()
m = EdgeModel(sys.argv[1], threads=int(sys.argv[2]))
t_ready = time.time()
x = np.zeros((1, *m.input_shape), np.float32)
m.run(x)
t_first = time.time()
for _ in range(20):
    m.run(x)
try:  # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork+exec
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
print(json.dumps({"t_main": t_main, "t_import": t_import, "t_ready": t_ready, "t_first": t_first, "rss_kib": rss}))
"""


def cold_start(path, threads: int) -> dict:
    """Process start -> session ready -> first result, and peak RSS, in a fresh Python process."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _COLD, str(path), str(threads)], capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {
        "interpreter_s": r["t_main"] - t0,
        "import_s": r["t_import"] - r["t_main"],
        "session_ready_s": r["t_ready"] - t0,
        "first_result_s": r["t_first"] - t0,
        "peak_rss_mb": r["rss_kib"] / 1024.0,
    }


# -- the whole benchmark -------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    threads: int = 2
    warmup: int = 20
    iters: int = 200
    duration: float = 0.0                      # seconds of single-stream rounds; overrides iters when > 0
    batches: tuple[int, ...] = (1, 8, 32)      # offline throughput
    offline_iters: int = 10
    sweep: tuple[int, ...] = ()                # thread counts for the sweep (empty: none)
    cold_start: bool = True
    openvino: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)


def model_files(targets: Sequence[str | os.PathLike]) -> tuple[list[Path], Path | None]:
    """ONNX files named directly or found in run folders (FP32 first), and the run folder if one."""
    files, run_dir = [], None
    for t in map(Path, targets):
        if t.is_dir():
            run_dir = t
            found = sorted(t.glob("*.onnx"), key=lambda p: (p.name != "model.onnx", p.name))
            if not found:
                raise FileNotFoundError(f"no .onnx file in {t}")
            files += found
        elif t.is_file():
            files.append(t)
        else:
            raise FileNotFoundError(f"model not found: {t}")
    return files, run_dir


def run_benchmark(targets: Sequence[str | os.PathLike], cfg: BenchConfig = BenchConfig(),
                  references: Sequence[ReferenceFactory] = (), log: Callable[[str], None] = lambda s: None,
                  run_dir: Path | None = None) -> dict:
    """Benchmark every model in `targets` (files or run folders) and return the result document.

    `references` are measured for the run folder among `targets` (or `run_dir`)."""
    from edgexfer.runtime.machine import machine_info
    from edgexfer.runtime.model import EdgeModel

    files, found_dir = model_files(targets)
    run_dir = run_dir or found_dir
    metas = {f: EdgeModel(f) for f in files}
    shapes = {m.input_shape for m in metas.values()}
    if len(shapes) != 1:
        raise RuntimeInputError(f"models take different input shapes {sorted(shapes)}; benchmark them separately")
    shape = shapes.pop()
    names = _unique_names(files)
    cands = [onnx_candidate(names[f], f, cfg.threads) for f in files]
    if cfg.openvino:
        ov = openvino_candidate(f"openvino:{names[files[0]]}", files[0], cfg.threads)
        if ov:
            cands.append(ov)
    if run_dir is not None:
        for factory in references:
            c = factory(run_dir, cfg.threads)
            if c:
                cands.append(c)
    rng = np.random.default_rng(cfg.seed)
    x1 = rng.standard_normal((1, *shape)).astype(np.float32)

    log(f"single-stream: {', '.join(c.name for c in cands)} interleaved, "
        + (f"{cfg.duration:g} s" if cfg.duration > 0 else f"{cfg.iters} rounds") + f", {cfg.threads} threads")
    lat = interleaved(cands, x1, warmup=cfg.warmup, iters=cfg.iters, duration=cfg.duration)
    log(f"offline throughput at batch {', '.join(map(str, cfg.batches))}")
    thr: dict[str, dict] = {c.name: {} for c in cands}
    for b in cfg.batches:
        xb = rng.standard_normal((b, *shape)).astype(np.float32)
        r = interleaved(cands, xb, warmup=2, iters=cfg.offline_iters)
        for c in cands:
            thr[c.name][str(b)] = b / (r[c.name]["p50"] / 1e3)

    base = lat[cands[0].name]["p50"]
    results = {}
    for c in cands:
        f = Path(c.file) if c.file else None
        entry = {"backend": c.backend, "file": c.file, "size_bytes": f.stat().st_size if f and f.suffix == ".onnx" else None,
                 "threads": cfg.threads, "latency_ms": lat[c.name], "throughput_img_s": thr[c.name],
                 "p50_ratio_to_first": lat[c.name]["p50"] / base}
        if f in metas:
            q = metas[f].meta.quantization
            entry["quantization"] = q and {k: q.get(k) for k in ("format", "activation_type", "weight_type",
                                                                  "per_channel", "reduce_range")}
            entry["accuracy"] = metas[f].meta.metrics.get("accuracy")
        results[c.name] = entry
    if cfg.cold_start:
        log("cold start (fresh process per model)")
        for f in files:
            results[names[f]]["cold_start"] = cold_start(f, cfg.threads)
    if cfg.sweep:
        log(f"thread sweep {', '.join(map(str, cfg.sweep))}")
        for t in cfg.sweep:
            cs = [onnx_candidate(names[f], f, t) for f in files]
            r = interleaved(cs, x1, warmup=5, iters=max(20, cfg.iters // 4))
            for f in files:
                results[names[f]].setdefault("thread_sweep_p50_ms", {})[str(t)] = r[names[f]]["p50"]
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input_shape": [1, *shape], "config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
            "machine": machine_info(), "models": results}


def _unique_names(files: list[Path]) -> dict[Path, str]:
    names = {f: f.name for f in files}
    if len(set(names.values())) < len(files):
        names = {f: str(f) for f in files}
    return names


# -- output ----------------------------------------------------------------------------------------------

def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']} ({m['arch']}, {m['cores']} cores; flags {', '.join(m['flags']) or 'none'}); "
             f"onnxruntime {m['onnxruntime']}. Input {res['input_shape']}, {res['config']['threads']} threads, "
             "interleaved.", "",
             "| model | backend | size MB | p50 ms | p90 ms | p99 ms | max ms | × first (p50) | "
             + " | ".join(f"img/s @{b}" for b in res["config"]["batches"]) + " | ready s | first result s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(res["config"]["batches"]) + "---|---|---|"]
    for name, r in res["models"].items():
        lat, cs = r["latency_ms"], r.get("cold_start", {})
        size = f"{r['size_bytes'] / 1e6:.2f}" if r.get("size_bytes") else ""
        thr = " | ".join(f"{r['throughput_img_s'][str(b)]:.0f}" for b in res["config"]["batches"])
        lines.append(f"| {name} | {r['backend']} | {size} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
                     f"{lat['max']:.2f} | {r['p50_ratio_to_first']:.2f} | {thr} | "
                     f"{_opt(cs.get('session_ready_s'), 2)} | {_opt(cs.get('first_result_s'), 2)} | "
                     f"{_opt(cs.get('peak_rss_mb'), 0)} |")
    sweeps = {n: r["thread_sweep_p50_ms"] for n, r in res["models"].items() if "thread_sweep_p50_ms" in r}
    if sweeps:
        ts = list(next(iter(sweeps.values())))
        lines += ["", "Thread sweep, p50 ms:", "", "| model | " + " | ".join(f"{t} threads" for t in ts) + " |",
                  "|---|" + "---|" * len(ts)]
        lines += [f"| {n} | " + " | ".join(f"{s[t]:.2f}" for t in ts) + " |" for n, s in sweeps.items()]
    return "\n".join(lines) + "\n"


def _opt(v, nd: int) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def plot(res: dict, path) -> bool:
    """Latency percentiles and throughput as a PNG (needs matplotlib; returns False without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from edgexfer.runtime import atomic

    names = list(res["models"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, q in enumerate(("p50", "p90", "p99")):
        a.bar(np.arange(len(names)) + (k - 1) * 0.27, [res["models"][n]["latency_ms"][q] for n in names], 0.27, label=q)
    a.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    a.set_ylabel("batch-1 latency, ms")
    a.legend()
    for n in names:
        t = res["models"][n]["throughput_img_s"]
        b.plot([int(k) for k in t], list(t.values()), marker="o", label=n)
    b.set_xscale("log", base=2)
    b.set_xlabel("batch")
    b.set_ylabel("images/s")
    b.legend(fontsize=7)
    fig.suptitle(f"{res['machine']['cpu']}, {res['config']['threads']} threads", fontsize=9)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
