"""Latency and throughput of ONNX models (and any other callable) measured side by side.

Runs are interleaved — one timed call of each candidate in turn — so drift of a shared, noisy
machine hits every candidate alike; ratios between candidates are what to trust.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


def summarize(times_s: list[float]) -> dict:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "std": float(ms.std()),
        "min": float(ms.min()),
        "max": float(ms.max()),
        "n": int(ms.size),
    }


@dataclass
class Candidate:
    name: str
    fn: Callable[[np.ndarray], object]  # called with one input batch


def interleaved(candidates: list[Candidate], x: np.ndarray, *, warmup: int = 10, iters: int = 100,
                min_seconds: float = 0.0) -> dict[str, dict]:
    """Batch latency of each candidate on input `x`, interleaved, after warm-up.

    Runs `iters` rounds, or more until `min_seconds` have passed.
    """
    for c in candidates:
        for _ in range(warmup):
            c.fn(x)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    start = time.perf_counter()
    rounds = 0
    while rounds < iters or time.perf_counter() - start < min_seconds:
        for c in candidates:
            t0 = time.perf_counter()
            c.fn(x)
            times[c.name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: summarize(t) for name, t in times.items()}


def onnx_candidate(name: str, path, threads: int, spinning: bool = False) -> Candidate:
    """An ONNX Runtime session on the CPU. Spinning is off by default: interleaved with other
    candidates, ONNX Runtime's busy-waiting threads would steal the cores the next one runs on."""
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads, spinning=spinning), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    return Candidate(name, lambda x: sess.run(None, {inp: x}))


def latency_and_throughput(candidates: list[Candidate], input_shape: tuple[int, ...], *, batch: int = 32,
                           warmup: int = 10, iters: int = 100, throughput_iters: int = 10, seed: int = 0) -> dict:
    """Batch-1 latency percentiles and batch-`batch` throughput (images/s) of each candidate."""
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((1, *input_shape)).astype(np.float32)
    xb = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    lat = interleaved(candidates, x1, warmup=warmup, iters=iters)
    thr = interleaved(candidates, xb, warmup=2, iters=throughput_iters)
    return {
        c.name: {
            "latency_ms": lat[c.name],
            "throughput": {"batch": batch, "images_per_s": batch / (thr[c.name]["p50"] / 1e3)},
        }
        for c in candidates
    }
