"""Benchmark models where they run: latency, throughput, cold start, memory — several models side by side.

Needs only the runtime install (numpy, onnxruntime); OpenVINO and PyTorch are measured beside ONNX
Runtime when installed (the output says why when one is not). Runs are interleaved — one timed call of
each model in turn — so drift of a shared, noisy machine hits every model alike; the ratios to the first
model are what to trust. Each model gets an input of its own size, so a 96 px and a 224 px model are one
interleaved run.

    edgexfer bench runs/demo                          # every ONNX file of a run folder (+ references)
    edgexfer bench a.onnx b.onnx --duration 20 --sweep --json-out out.json --markdown out.md --plot out.png
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from edgexfer.runtime.e2e import is_e2e
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
    shape: tuple[int, ...] | None = None  # one image's input (C, H, W); None: the run folder's


def interleaved(candidates: list[Candidate], x: np.ndarray | Mapping[str, np.ndarray], *, warmup: int = 10,
                iters: int = 100, duration: float = 0.0, block: int = 1, pause: float = 0.0,
                on_warm: Callable[[dict[str, float]], None] | None = None,
                rounds: dict[str, list[float]] | None = None) -> dict[str, dict]:
    """Latency of each candidate on input `x` (one array for all, or one per candidate name), interleaved,
    after `warmup` calls each.

    Runs `iters` rounds, or, with `duration` > 0, rounds until that many seconds have passed. With `block`
    > 1 each round gives each candidate `block` calls in a row (about `iters` calls each in all), after a
    `pause` of that many seconds: what sessions with spinning threads need (ONNX Runtime's default), whose
    workers busy-wait after a call and would take the cores from the next candidate timed call by call.
    `on_warm`: called after the warm-up with each candidate's seconds per call (the mean of the warm-up's
    second half), which the benchmark's ETA is made of. `rounds`: filled with each candidate's median call time
    (ms) in each round, the paired samples `faster` compares.
    """
    xs = x if isinstance(x, Mapping) else {c.name: x for c in candidates}
    per_call: dict[str, float] = {}
    for c in candidates:
        for i in range(warmup):
            if i == warmup // 2:
                t_half = time.perf_counter()
            c.fn(xs[c.name])
        if warmup:
            per_call[c.name] = (time.perf_counter() - t_half) / (warmup - warmup // 2)
    if on_warm is not None and per_call:
        on_warm(per_call)
    block = max(1, min(int(block), iters) if duration <= 0 else int(block))
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    start = time.perf_counter()
    calls = 0
    while (time.perf_counter() - start < duration) if duration > 0 else calls < iters:
        for c in candidates:
            xc = xs[c.name]
            if pause > 0:
                time.sleep(pause)
            for _ in range(block):
                t0 = time.perf_counter()
                c.fn(xc)
                times[c.name].append(time.perf_counter() - t0)
            if rounds is not None:
                rounds.setdefault(c.name, []).append(float(np.median(times[c.name][-block:])) * 1e3)
        calls += block
    return {name: summarize(t) for name, t in times.items()}


def faster(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> bool:
    """Whether the model timed as `a` is faster than the one timed as `b` beyond the benchmark's noise: their
    median call times in the same interleaved rounds (`interleaved(rounds=...)`), paired round by round so that
    the host's drift cancels, and a two-sided sign test on which was faster in each round at level `alpha`
    (distribution-free: a busy second of the host slows one round, not the test). Ten rounds need nine wins."""
    from math import comb

    d = [x - y for x, y in zip(a, b) if x != y]
    wins, n = sum(x < 0 for x in d), len(d)
    if n == 0 or wins * 2 <= n:
        return False
    tail = sum(comb(n, k) for k in range(wins, n + 1)) / 2 ** n
    return 2 * tail <= alpha


FORMAT_ORDER = ("onnx", "openvino", "executorch", "litert")  # ties of about equal size go to the first
MIN_ROUNDS = 6  # fewer paired rounds, and even all of them won is no evidence at 5%: p50 decides


def recommend(models: dict[str, dict], rounds: dict[str, list[float]] | None = None) -> dict | None:
    """The file to ship on this machine among the benchmarked `models` the run offers as shippable (their
    `shippable`, from `bundle.file_verdicts`): the fastest at batch 1, where it is faster beyond the noise
    (`faster` on the per-round medians `rounds`, else each entry's `p50_by_round_ms`). Files it is not
    faster than tie with it; a tie goes to the smallest file (a board's flash, RAM and download), and among files
    within 5% of that size, to the format listed first in FORMAT_ORDER (ONNX Runtime: the reference). None
    when no benchmarked file is shippable."""
    ok = {n: r for n, r in models.items() if r.get("shippable")}
    if not ok:
        return None
    rounds = rounds or {n: r.get("p50_by_round_ms") or [] for n, r in ok.items()}
    best = min(ok, key=lambda n: ok[n]["latency_ms"]["p50"])
    few = min(len(rounds.get(n) or []) for n in ok) < MIN_ROUNDS  # too few rounds to test: p50 alone decides

    def ties(n: str) -> bool:
        if few:
            return round(ok[n]["latency_ms"]["p50"], 2) == round(ok[best]["latency_ms"]["p50"], 2)
        return not faster(rounds[best], rounds[n])

    tied = [n for n in ok if n == best or ties(n)]
    smallest = min(ok[n].get("size_bytes") or 0 for n in tied)
    near = [n for n in tied if (ok[n].get("size_bytes") or 0) <= 1.05 * smallest]

    def fmt_rank(n: str) -> int:
        suffix = Path(ok[n].get("file") or n).suffix
        return next((i for i, f in enumerate(FORMAT_ORDER) if FORMAT_SUFFIXES[f] == suffix), len(FORMAT_ORDER))

    pick = min(near, key=lambda n: (fmt_rank(n), ok[n]["latency_ms"]["p50"]))
    p50 = ok[pick]["latency_ms"]["p50"]
    others = [n for n in tied if n != pick]
    if not others:
        runner = sorted((r["latency_ms"]["p50"], n) for n, r in ok.items() if n != pick)
        why = "the fastest shippable file at batch 1 here" + (
            "" if not runner else f", ahead of {runner[0][1]} ({runner[0][0]:.2f} ms) by p50 alone (too few interleaved "
            f"rounds to test the difference)" if few else f", faster than {runner[0][1]} ({runner[0][0]:.2f} ms) in the "
            "paired rounds")
    else:
        tie = ", ".join(f"{n} {ok[n]['latency_ms']['p50']:.2f} ms" for n in others)
        why = (f"tied at batch 1 with {tie} (" + ("the same p50, too few interleaved rounds to test" if few else
               f"the fastest, {best}, is not faster than " + ("these" if len(others) > 1 else "it")
               + " beyond the noise of the interleaved rounds") + "); "
               + ("the smallest" if len(near) == 1 else "of about the smallest size, and its runtime listed first"))
    return {"model": pick, "file": ok[pick].get("file"), "p50_ms": p50, "size_bytes": ok[pick].get("size_bytes"),
            "why": why, "tied_with": others, "decided_by": "p50 (too few rounds)" if few else "sign test over the rounds"}


# -- candidates ------------------------------------------------------------------------------------

def onnx_candidate(name: str, path, threads: int, spinning: bool = False) -> Candidate:
    """An ONNX Runtime session on the CPU. Spinning is off by default: timed call by call between other
    candidates, ONNX Runtime's busy-waiting threads would steal the cores the next one runs on. With
    spinning (ONNX Runtime's default, and `EdgeModel`'s), time it in blocks (`interleaved(block=...)`)."""
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads, spinning=spinning),
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    return Candidate(name, lambda x: sess.run(None, {inp: x}), "onnxruntime", str(path))


OPENVINO_MISSING = 'the openvino package is not installed (pip install "edgexfer[openvino]")'


def openvino_candidate(name: str, path, threads: int) -> Candidate | None:
    """OpenVINO on the same ONNX file, when the `openvino` package is installed (else None: OPENVINO_MISSING), in
    f32 as ONNX Runtime computes it (`openvino_backend.config`: OpenVINO's CPU default may be bfloat16)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    from edgexfer.runtime.openvino_backend import config

    compiled = ov.Core().compile_model(str(path), "CPU", config(threads))
    req = compiled.create_infer_request()
    return Candidate(name, lambda x: req.infer({0: x}), f"openvino {ov.__version__.split('-')[0]}", str(path))


def model_candidate(name: str, path, threads: int, spinning: bool = True) -> Candidate:
    """A model file as its own runtime runs it: OpenVINO IR (.xml) with OpenVINO, an ExecuTorch program (.pte)
    with ExecuTorch (`runtime.backends`), ONNX with ONNX Runtime (`onnx_candidate`)."""
    from edgexfer.runtime import backends

    if not backends.format_of(path):
        return onnx_candidate(name, path, threads, spinning=spinning)
    from edgexfer.runtime.model import EdgeModel

    m = EdgeModel(path, threads=threads, e2e=False)  # its session, described by its metadata
    sess, inp = m.session, m.input_name
    return Candidate(name, lambda x: sess.run(None, {inp: x}), backends.runtime_version(path), str(path))


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
    references: bool = True                    # measure the reference backends handed to run_benchmark
    seed: int = 0
    e2e: bool = True                           # time each file's end-to-end file beside it (e2e_comparison)
    e2e_image: tuple[int, int] = (480, 640)    # height, width of the decoded photo it is timed on
    # ONNX Runtime as applications run it (its default; EdgeModel's): worker threads spin between calls. The
    # models are then timed in alternating blocks of `block` calls, each after a pause (the last model's
    # spinning threads asleep); without spinning, call by call.
    spinning: bool = True
    block: int = 20
    pause: float = 0.02
    extra: dict = field(default_factory=dict)
    formats: tuple = ("onnx",)                  # a run folder's files of these formats ("all": every one there)

    def timing(self) -> dict:
        """interleaved()'s block and pause for this configuration."""
        return {"block": self.block, "pause": self.pause} if self.spinning else {}


FORMAT_SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte", "litert": ".tflite"}  # `--formats`: what a run folder gives


def model_files(targets: Sequence[str | os.PathLike], formats: Sequence[str] = ("onnx",)
                ) -> tuple[list[Path], Path | None]:
    """Model files named directly or found in run folders (the ONNX files; with `formats`, those of each format
    named, or of every one with "all": OpenVINO IR, ExecuTorch; FP32 first within each), and the run folder if one."""
    files, run_dir = [], None
    wanted = list(FORMAT_SUFFIXES) if "all" in formats else list(formats)
    for t in map(Path, targets):
        if t.is_dir():
            run_dir = t
            found = [p for fmt in wanted for p in sorted(
                (p for p in t.glob(f"*{FORMAT_SUFFIXES[fmt]}") if not is_e2e(p) and not p.name.startswith(".")),
                key=lambda p, fmt=fmt: (p.name != "model" + FORMAT_SUFFIXES[fmt], p.name))]
            if not found:
                raise FileNotFoundError(f"no {' or '.join(FORMAT_SUFFIXES[f] for f in wanted)} model file in {t}")
            files += found
        elif t.is_file():
            files.append(t)
        else:
            raise FileNotFoundError(f"model not found: {t}")
    return files, run_dir


class Plan:
    """The seconds a benchmark has left, made of measured times only: each phase's calls times the seconds per
    call its candidates took after warm-up (`interleaved(on_warm=...)`), a fresh process's cold start as the
    first one took, session creation as this process's took. Phases whose calls are not measured yet are
    estimated from the single-stream calls (batch b: b times a batch-1 call; n threads: threads/n times), and
    re-estimated after their own warm-up. Timed interleaved calls take longer than warm-up calls in a row (each
    block starts after a pause, on threads gone to sleep): the time a timed phase took over its estimate scales
    every estimate after it. `eta(seconds)` gets the total at each phase and each refinement."""

    def __init__(self, eta: Callable[[float | None], None]):
        self.left: dict[str, float] = {}
        self._eta = eta
        self.measured = False  # nothing is said before the single-stream warm-up measured the calls
        self.factor = 1.0
        self._timed: dict[str, tuple[float, float]] = {}  # phase -> (its estimate after warm-up, when)

    def set(self, phase: str, seconds: float, timed: bool = False) -> None:
        self.left[phase] = max(0.0, seconds)
        if timed:
            self._timed[phase] = (self.left[phase], time.perf_counter())
        self.say()

    def done(self, phase: str) -> None:
        self.left.pop(phase, None)
        est, t0 = self._timed.pop(phase, (0.0, 0.0))
        if est > 0.05:
            self.factor = min(3.0, max(0.5, (time.perf_counter() - t0) / est))
        self.say()

    def say(self) -> None:
        if self.measured:
            self._eta(self.factor * sum(self.left.values()))


def run_benchmark(targets: Sequence[str | os.PathLike], cfg: BenchConfig = BenchConfig(),
                  references: Sequence[ReferenceFactory] = (), log: Callable[[str], None] = lambda s: None,
                  run_dir: Path | None = None, eta: Callable[[float | None], None] = lambda s: None) -> dict:
    """Benchmark every model in `targets` (files or run folders) and return the result document.

    `references` are measured for the run folder among `targets` (or `run_dir`). `log`: a line as each phase
    starts; `eta`: the seconds left, from measured time per call (`Plan`), from the single-stream warm-up on."""
    from edgexfer.runtime.machine import machine_info
    from edgexfer.runtime.model import EdgeModel

    files, found_dir = model_files(targets, cfg.formats)
    run_dir = run_dir or found_dir
    metas = {f: EdgeModel(f) for f in files}
    names = _unique_names(files)
    t_sessions = time.perf_counter()
    cands = [model_candidate(names[f], f, cfg.threads, spinning=cfg.spinning) for f in files]
    session_s = (time.perf_counter() - t_sessions) / len(files)  # an e2e comparison makes two sessions per file
    for f, c in zip(files, cands):
        c.shape = metas[f].input_shape
    not_measured: dict[str, str] = {}
    if not cfg.openvino:
        not_measured["openvino"] = "not asked for (--no-reference)"
    elif any(c.backend.startswith("openvino") for c in cands):
        not_measured["openvino"] = "an OpenVINO IR file is among the models: OpenVINO is measured on it"
    else:
        ov = openvino_candidate(f"openvino:{names[files[0]]}", files[0], cfg.threads)
        if ov:
            ov.shape = metas[files[0]].input_shape
            cands.append(ov)
        else:
            not_measured["openvino"] = OPENVINO_MISSING
    # a reference rebuilt from a run folder's checkpoint takes that folder's input size
    run_shape = next((metas[f].input_shape for f in files if run_dir is not None
                      and f.resolve().parent == Path(run_dir).resolve()), metas[files[0]].input_shape)
    if run_dir is None:
        not_measured["pytorch_eager"] = "needs a run folder (its checkpoint.pt); only ONNX files were named"
    elif not cfg.references:
        not_measured["pytorch_eager"] = "not asked for (--no-reference)"
    elif not references:
        not_measured["pytorch_eager"] = "needs the training install (pip install 'edgexfer[train]')"
    for factory in references if run_dir is not None and cfg.references else ():
        c = factory(run_dir, cfg.threads)
        if c:
            c.shape = c.shape or run_shape
            cands.append(c)
        else:
            not_measured[getattr(factory, "__name__", "reference").replace("_reference", "_eager")] = \
                _why_no_reference(Path(run_dir))
    rng = np.random.default_rng(cfg.seed)
    shapes = {c.shape for c in cands}

    def inputs(batch: int) -> dict[str, np.ndarray]:
        """One random input per input size (the same for every model of that size), handed to each model."""
        per_shape = {s: rng.standard_normal((batch, *s)).astype(np.float32) for s in sorted(shapes)}
        return {c.name: per_shape[c.shape] for c in cands}

    plan = Plan(eta)
    cold: dict[str, dict] = {}
    if cfg.cold_start:  # first: its time per process is then measured when the first ETA is given
        log("cold start (fresh process per model)")
        for i, f in enumerate(files):
            t = time.perf_counter()
            cold[names[f]] = cold_start(f, cfg.threads)
            plan.set("cold start", (len(files) - i - 1) * (time.perf_counter() - t))
        plan.done("cold start")
    x1 = inputs(1)
    e2e_files = [f for f in files if cfg.e2e and _e2e_current(f)]
    pre_s = _python_preprocessing_s(metas[e2e_files[0]], cfg) if e2e_files else 0.0
    offline = [b for b in cfg.batches if b != 1]

    def calls(n: int, per: dict[str, float], scale: float = 1.0, rounds_of: int | None = None) -> float:
        """Seconds for `n` calls of each candidate at `per` seconds per call (times `scale`), with the pauses."""
        rounds = -(-n // max(1, min(cfg.block, rounds_of or n))) if cfg.spinning else 0
        return n * scale * sum(per.values()) + rounds * len(per) * (cfg.pause if cfg.spinning else 0.0)

    def planned(per: dict[str, float]) -> None:
        """Every phase after the single-stream one, from the single-stream calls `per`."""
        plan.measured = True
        for b in offline:
            plan.left[f"batch {b}"] = calls(2 + cfg.offline_iters, per, b)
        for t in cfg.sweep:
            own = {names[f]: per[names[f]] for f in files}
            plan.left[f"sweep {t}"] = session_s * len(files) + calls(5 + max(20, cfg.iters // 4), own, cfg.threads / t)
        for f in e2e_files:
            t = per[names[f]]
            per3 = {"alone": t, "python": t + pre_s, "e2e": t + pre_s}
            plan.left[f"e2e {names[f]}"] = 2 * session_s + calls(cfg.warmup + cfg.iters, per3)

    def single_warm(per: dict[str, float]) -> None:
        planned(per)
        left = cfg.duration if cfg.duration > 0 else calls(cfg.iters, per)
        plan.set("single-stream", left, timed=cfg.duration <= 0)

    log(f"single-stream: {', '.join(c.name for c in cands)} interleaved, "
        + (f"{cfg.duration:g} s" if cfg.duration > 0 else f"{cfg.iters} calls each") + f", {cfg.threads} threads"
        + (f", ONNX Runtime's spinning threads on (blocks of {cfg.block} calls)" if cfg.spinning else ", no spinning"))
    rounds: dict[str, list[float]] = {}
    lat = interleaved(cands, x1, warmup=cfg.warmup, iters=cfg.iters, duration=cfg.duration, **cfg.timing(),
                      on_warm=single_warm, rounds=rounds)
    plan.done("single-stream")
    # Batch 1 is the single-stream run itself: img/s = 1000 / p50. (It used to be a separate run of
    # offline_iters calls after 2 warm-ups, which on a shared machine could read half of 1000 / p50.)
    thr: dict[str, dict] = {c.name: {} for c in cands}
    if offline:
        log(f"offline throughput at batch {', '.join(map(str, offline))}")
    for b in cfg.batches:
        if b == 1:
            for c in cands:
                thr[c.name]["1"] = 1e3 / lat[c.name]["p50"]
            continue
        r = interleaved(cands, inputs(b), warmup=2, iters=cfg.offline_iters, **cfg.timing(),
                        on_warm=lambda per, b=b: plan.set(f"batch {b}", calls(cfg.offline_iters, per)))
        plan.done(f"batch {b}")
        for c in cands:
            thr[c.name][str(b)] = b / (r[c.name]["p50"] / 1e3)

    base = lat[cands[0].name]["p50"]
    verdicts = _verdicts(run_dir)  # the run's word on each of its files: shippable or not, and why
    results = {}
    for c in cands:
        f = Path(c.file) if c.file else None
        own = c.backend == "onnxruntime" or (f is not None and f.suffix in (".xml", ".pte", ".tflite"))  # not a reference
        size = (f.stat().st_size + (f.with_suffix(".bin").stat().st_size if f.suffix == ".xml" else 0)) if own and f else None
        entry = {"backend": c.backend, "file": c.file, "size_bytes": size,
                 "input_shape": [1, *c.shape],
                 "threads": cfg.threads, "latency_ms": lat[c.name], "throughput_img_s": thr[c.name],
                 "p50_ratio_to_first": lat[c.name]["p50"] / base,
                 "p50_by_round_ms": [round(v, 4) for v in rounds.get(c.name, [])]}
        if f and f.is_file():
            entry["sha256"] = _sha256(f)
        if f in metas:
            entry["model_id"] = model_id(metas[f])
            q = metas[f].meta.quantization
            entry["quantization"] = q and {k: q.get(k) for k in ("format", "activation_type", "weight_type",
                                                                  "per_channel", "reduce_range")}
            entry["accuracy"] = metas[f].meta.metrics.get("accuracy")
        v = verdicts.get(f.name) if own and f is not None and f.parent.resolve() == Path(run_dir or "").resolve() else None
        if v is not None:
            entry.update(shippable=v["shippable"], verdict=v["why"], agreement_with_fp32=v["agreement"],
                         agreement_images=v["agreement_images"])
        results[c.name] = entry
    for name, c in cold.items():
        results[name]["cold_start"] = c

    if cfg.sweep:
        log(f"thread sweep {', '.join(map(str, cfg.sweep))}")
        for t in cfg.sweep:
            cs = [onnx_candidate(names[f], f, t, spinning=cfg.spinning) for f in files]
            n = max(20, cfg.iters // 4)
            r = interleaved(cs, {c.name: x1[c.name] for c in cs}, warmup=5, iters=n, **cfg.timing(),
                            on_warm=lambda per, t=t, n=n: plan.set(f"sweep {t}", calls(n, per)))
            plan.done(f"sweep {t}")
            for f in files:
                results[names[f]].setdefault("thread_sweep_p50_ms", {})[str(t)] = r[names[f]]["p50"]
    e2e = {}
    if cfg.e2e:
        for f in files:
            r = e2e_comparison(f, cfg, log=log,
                               on_warm=lambda per, f=f: plan.set(f"e2e {names[f]}", calls(cfg.iters, per), timed=True))
            plan.done(f"e2e {names[f]}")
            if r:
                e2e[names[f]] = r
    doc = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if any("shippable" in r for r in results.values()):
        doc["recommended"] = recommend(results, rounds)
    if e2e:
        doc["e2e"] = e2e
    if len(shapes) == 1:  # one input size for all; else each model's own is under models.*.input_shape
        doc["input_shape"] = [1, *next(iter(shapes))]
    return {**doc, "config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
            "machine": machine_info(), "models": results, "not_measured": not_measured}


def _verdicts(run_dir: Path | None) -> dict[str, dict]:
    """The run folder's verdict on each of its model files (`bundle.file_verdicts`), {} without a readable
    report.json."""
    from edgexfer.runtime.bundle import file_verdicts

    path = Path(run_dir) / "report.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        rep = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return file_verdicts(rep) if isinstance(rep, dict) else {}


def bench_photo(height: int, width: int, seed: int = 0):
    """A photo-like decoded RGB image (smooth shading, edges and noise) as a PIL image: what an
    application has after decoding a JPEG, so decoding is left out of what is timed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 255, yy / height * 255, (np.sin(xx / 23) * np.cos(yy / 31) + 1) * 127], -1)
    a = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _e2e_current(path) -> bool:
    """Whether an end-to-end file is beside `path` (`e2e_comparison` times it unless it is stale)."""
    from edgexfer.runtime.e2e import e2e_path

    return e2e_path(path).is_file()


def _python_preprocessing_s(model, cfg: BenchConfig) -> float:
    """Seconds the Python preprocessing of the end-to-end phase's photo takes here (the best of 3)."""
    from edgexfer.runtime.preprocess import normalize, resize_crop

    pp, img = model.meta.preprocessing, bench_photo(*cfg.e2e_image, seed=cfg.seed)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        normalize(resize_crop(img, pp), pp)
        best = min(best, time.perf_counter() - t)
    return best


def e2e_comparison(path, cfg: BenchConfig, log: Callable[[str], None] = lambda s: None,
                   on_warm: Callable[[dict[str, float]], None] | None = None) -> dict | None:
    """The end-to-end file beside `path` (preprocessing in the graph) against `path` plus the Python
    preprocessing, from one decoded photo of `cfg.e2e_image` (decoding excluded from both), and `path` on
    its preprocessed tensor (the model alone), interleaved at batch 1. None when no current end-to-end
    file is beside it. The cost of in-graph preprocessing is the end-to-end p50 less the model's; its
    share is that over the model's p50."""
    from edgexfer.runtime.model import EdgeModel
    from edgexfer.runtime.preprocess import normalize, resize_crop

    m = EdgeModel(path, threads=cfg.threads, spinning=cfg.spinning)
    sess = m._e2e()
    if sess is None:
        if not m.e2e_why.startswith("no "):
            log(f"end-to-end file of {Path(path).name} not timed: {m.e2e_why}")
        return None
    from edgexfer.runtime.e2e import INPUT_NAME, e2e_path, image_array

    e2e_file = e2e_path(path)
    plain = m.session
    pp = m.meta.preprocessing
    img = bench_photo(*cfg.e2e_image, seed=cfg.seed)
    arr = image_array(img)
    x = np.ascontiguousarray(normalize(resize_crop(img, pp), pp)[None])
    outs = m.output_names
    name = Path(path).name
    cands = [Candidate(f"{name} model alone", lambda x: plain.run(outs, {m.input_name: x}), file=str(path)),
             Candidate(f"{name} + Python preprocessing",
                       lambda im: plain.run(outs, {m.input_name: normalize(resize_crop(im, pp), pp)[None]}),
                       file=str(path)),
             Candidate(e2e_file.name, lambda a: sess.run(None, {INPUT_NAME: a}), file=str(e2e_file))]
    feeds = {cands[0].name: x, cands[1].name: img, cands[2].name: arr}
    log(f"end-to-end: {e2e_file.name} against {name} + Python preprocessing, from a decoded "
        f"{cfg.e2e_image[1]}x{cfg.e2e_image[0]} photo, interleaved (--no-e2e skips it)")
    lat = interleaved(cands, feeds, warmup=cfg.warmup, iters=cfg.iters, duration=cfg.duration, **cfg.timing(),
                      on_warm=on_warm)
    alone, python, e2e = (lat[c.name] for c in cands)
    return {"file": e2e_file.name, "size_bytes": e2e_file.stat().st_size, "image_hw": list(cfg.e2e_image),
            "input_shape": [1, *m.input_shape],
            "latency_ms": {"model_alone": alone, "plain_plus_python_preprocessing": python, "e2e": e2e},
            "preprocessing_ms": {"in_graph": e2e["p50"] - alone["p50"], "python": python["p50"] - alone["p50"]},
            "in_graph_share_of_model_p50": (e2e["p50"] - alone["p50"]) / alone["p50"],
            "e2e_ratio_to_plain_plus_python": e2e["p50"] / python["p50"]}


def _why_no_reference(run_dir: Path) -> str:
    if not (run_dir / "checkpoint.pt").is_file():
        return f"no checkpoint.pt in {run_dir}"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'edgexfer[train]')"
    return "the reference could not be built from the run folder"


def row_name(f: Path) -> str:
    """A model's row: its run folder's name and its file name, `demo/model.int8.onnx`, so that files of the same
    name from two runs are told apart."""
    return f"{f.resolve().parent.name}/{f.name}"


def _unique_names(files: list[Path]) -> dict[Path, str]:
    """Each file's row name (`row_name`); files whose folders share a name too get their path as given."""
    names = {f: row_name(f) for f in files}
    seen = list(names.values())
    return {f: n if seen.count(n) == 1 else str(f) for f, n in names.items()}


def model_id(model) -> str:
    """What makes two files the same model (`edgexfer compare` matches rows by it): the sha256 of the file's
    edgexfer metadata less its metrics, which names the checkpoint (its sha256), the export and, for a quantized
    file, its recipe and source. A copy of the file has it; so has the file after `evaluate` wrote its metrics."""
    from edgexfer.runtime.e2e import meta_key
    from edgexfer.runtime.metadata import META_KEY

    return "meta:" + meta_key(model.session.get_modelmeta().custom_metadata_map.get(META_KEY, ""))


def _sha256(path: Path) -> str:
    from edgexfer.runtime.atomic import sha256_file

    return sha256_file(path)


# -- output ----------------------------------------------------------------------------------------------

def to_markdown(res: dict) -> str:
    from edgexfer.runtime import fmt

    m, cfg = res["machine"], res["config"]
    batches = cfg["batches"]
    mixed = "input_shape" not in res  # models of several input sizes: each row says its own
    cold = any("cold_start" in r for r in res["models"].values())
    judged = any("shippable" in r for r in res["models"].values())  # a run folder's files, with its verdicts
    rec = res.get("recommended") or {}
    lines = [f"Machine: {m['cpu']} ({m['arch']}, {m['cores']} cores; flags {', '.join(m['flags']) or 'none'}); "
             f"onnxruntime {m['onnxruntime']}. "
             + ("Each model on an input of its own size (input column)" if mixed else f"Input {res['input_shape']}")
             + f", {cfg['threads']} threads, "
             + (f"ONNX Runtime's spinning threads on (its default), models alternating in blocks of {cfg['block']} calls."
                if cfg.get("spinning") else "no spinning, interleaved call by call."), "",
             "| model | backend |" + (" input |" if mixed else "") + " size MB | p50 ms | p90 ms | p99 ms | max ms | "
             "× first (p50) | " + " | ".join(f"img/s @{b}" for b in batches)
             + (" | ready s | first result s | peak RSS MB |" if cold else " |")
             + (" agrees with FP32 | test accuracy | shippable |" if judged else ""),
             "|---|---|" + ("---|" if mixed else "") + "---|---|---|---|---|---|" + "---|" * len(batches)
             + ("---|---|---|" if cold else "") + ("---|---|---|" if judged else "")]
    for name, r in res["models"].items():
        lat, cs = r["latency_ms"], r.get("cold_start", {})
        size = f"{r['size_bytes'] / 1e6:.2f}" if r.get("size_bytes") else ""
        shape = r.get("input_shape")
        thr = " | ".join(fmt.img_s(r["throughput_img_s"][str(b)]) for b in batches)
        lines.append(f"| {name} | {r['backend']} | " + (f"{'×'.join(map(str, shape[1:])) if shape else ''} | " if mixed else "")
                     + f"{size} | {fmt.ms(lat['p50'])} | {fmt.ms(lat['p90'])} | {fmt.ms(lat['p99'])} | "
                     f"{fmt.ms(lat['max'])} | {fmt.ratio(r['p50_ratio_to_first'])} | {thr} |"
                     + (f" {_opt(cs.get('session_ready_s'), 2)} | {_opt(cs.get('first_result_s'), 2)} | "
                        f"{_opt(cs.get('peak_rss_mb'), 0)} |" if cold else "")
                     + (f" {_agreement(r)} | {_opt(r.get('accuracy'), 4)} | "
                        f"{'' if 'shippable' not in r else '**yes (recommended)**' if name == rec.get('model') else 'yes' if r['shippable'] else 'no'} |"
                        if judged else ""))
    lines += [""] + column_notes(res, cold, judged)
    if judged:
        lines += [""] + ([f"Recommended here: {rec['model']} ({fmt.ms(rec['p50_ms'])} ms p50): {rec['why']}."] if rec else
                         ["Recommended here: none of the benchmarked files is offered as shippable."])
        lines += [f"Not shippable: {name}: {r['verdict']}." for name, r in res["models"].items()
                  if r.get("shippable") is False]
    skipped = res.get("not_measured") or {}
    if skipped:
        lines += [""] + [f"Not measured: {_BACKEND_NAMES.get(k, k)} — {why}." for k, why in skipped.items()]
    if res.get("e2e"):
        lines += ["", "End-to-end files (preprocessing in the graph) against the plain file plus the Python preprocessing, "
                  "from one decoded photo (decoding excluded), batch 1, interleaved:", "",
                  "| end-to-end file | photo | model alone p50 ms | plain + Python preprocessing p50 ms | end-to-end p50 ms "
                  "| preprocessing in the graph ms | in Python ms | in-graph share of the model's p50 |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in res["e2e"].items():
            lat, pre = r["latency_ms"], r["preprocessing_ms"]
            e2e_name = f"{n.rsplit('/', 1)[0]}/{r['file']}" if "/" in n else r["file"]
            lines.append(f"| {e2e_name} | {r['image_hw'][1]}×{r['image_hw'][0]} | {fmt.ms(lat['model_alone']['p50'])} | "
                         f"{fmt.ms(lat['plain_plus_python_preprocessing']['p50'])} | {fmt.ms(lat['e2e']['p50'])} | "
                         f"{fmt.ms(pre['in_graph'])} | {fmt.ms(pre['python'])} | {fmt.pct(r['in_graph_share_of_model_p50'])} |")
    sweeps = {n: r["thread_sweep_p50_ms"] for n, r in res["models"].items() if "thread_sweep_p50_ms" in r}
    if sweeps:
        ts = list(next(iter(sweeps.values())))
        lines += ["", "Thread sweep, p50 ms:", "", "| model | " + " | ".join(f"{t} threads" for t in ts) + " |",
                  "|---|" + "---|" * len(ts)]
        lines += [f"| {n} | " + " | ".join(fmt.ms(s[t]) for t in ts) + " |" for n, s in sweeps.items()]
    return "\n".join(lines) + "\n"


_BACKEND_NAMES = {"openvino": "OpenVINO", "pytorch_eager": "PyTorch eager"}


def _agreement(r: dict) -> str:
    a, n = r.get("agreement_with_fp32"), r.get("agreement_images")
    return "" if a is None else f"{100 * a:.1f}%" + (f" of {n}" if n else "")


def column_notes(res: dict, cold: bool, judged: bool = False) -> list[str]:
    """What each column of the table is, in the words of how it was measured."""
    cfg = res["config"]
    if cfg.get("spinning"):
        run = ((f"{cfg['duration']:g} s of rounds" if cfg.get("duration", 0) > 0 else f"{cfg['iters']} calls each, in rounds")
               + f" that give each model {cfg['block']} calls in a row after a {1000 * cfg['pause']:g} ms pause (ONNX Runtime's "
               "threads spin between calls, as in an application; the pause lets the last model's threads sleep)")
    else:
        run = (f"{cfg['duration']:g} s of rounds" if cfg.get("duration", 0) > 0 else f"{cfg['iters']} rounds") + \
            " that call each model once in turn (ONNX Runtime's threads not spinning)"
    big = [b for b in cfg["batches"] if b != 1]
    out = ["- size MB: the model file on disk (an OpenVINO IR: its .xml and .bin; blank for a reference backend).",
           f"- p50 ms, p90 ms, p99 ms, max ms: percentiles of the time of one batch-1 call, over {run}, after "
           f"{cfg['warmup']} warm-up calls each (single stream).",
           "- × first (p50): this row's p50 over the first row's (below 1: faster).",
           *(["- img/s @1: 1000 / p50, from the same single-stream run."] if 1 in cfg["batches"] else []),
           *([f"- img/s @{', @'.join(map(str, big))}: the batch size over the median time of one call on that many "
              f"images, over {cfg.get('offline_iters', 10)} interleaved calls each after 2 warm-up calls (offline; a "
              "shorter run than the latency columns, so noisier)."] if big else [])]
    if cold:
        out += ["- ready s: from starting a fresh Python process to the model loaded and ready (interpreter start, "
                "`import edgexfer.runtime`, session creation); first result s: the same start to the first batch-1 "
                "answer; peak RSS MB: that process's peak resident memory after 21 calls. Measured for the model "
                "files (blank for reference backends)."]
    if judged:
        out += ["- agrees with FP32, shippable: the run folder's record (report.json): each file's top-1 agreement with "
                "the FP32 model on the images it was checked on (the INT8 ONNX file: the accuracy guard's unseen "
                "images; converted files: the conversion check's), and whether the run offers it as shippable; test "
                "accuracy: the file's own metadata (the test split, which only reports).",
                "- Recommended here: the fastest shippable file at batch 1 on this machine; files it is not faster than "
                "in a sign test over the interleaved rounds (paired round by round, 5%) tie with it, and a tie goes to "
                "the smallest file, then to the runtime listed first (ONNX Runtime, OpenVINO, ExecuTorch, LiteRT)."]
    return out


def _opt(v, nd: int) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def plot(res: dict, path) -> bool:
    """Latency percentiles and throughput as a PNG (needs matplotlib; returns False without it)."""
    from edgexfer.runtime.plotting import save_plot

    names = list(res["models"])

    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        for k, q in enumerate(("p50", "p90", "p99")):
            a.bar(np.arange(len(names)) + (k - 1) * 0.27, [res["models"][n]["latency_ms"][q] for n in names], 0.27,
                  label=q)
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
        return fig

    return save_plot(path, draw)
