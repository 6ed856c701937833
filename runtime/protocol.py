"""The Open Inference Protocol (KServe v2 REST) request and response bodies, shared by both servers:
JSON tensors and the binary tensor extension (an `Inference-Header-Content-Length` header, the JSON
header, then raw little-endian bytes). numpy only; no HTTP library."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
import math
import os
import threading

import numpy as np

from edgexfer.runtime.model import EdgeModel, shrink_arenas

HEADER_LEN = "Inference-Header-Content-Length"
MAX_BODY = 16 * 1024 * 1024
MAX_BODIES_IN_FLIGHT = 128 * 1024 * 1024  # request-body bytes held at once, server-wide, before 503
TRIM_AFTER = 64 * 1024 * 1024  # body bytes released, then none held: the freed heap goes back to the OS
TRIM_DELAY_S = 0.25            # ... once no body was taken or given for this long
MAX_CACHED_HEADER = 4096  # a binary request's JSON header longer than this is checked but not kept
DTYPES = {"FP32": np.float32}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


_libc = None
TRIM_THRESHOLD = 4 * 1024 * 1024   # a server's malloc (`tune_malloc`): a heap's free top past this goes back to the OS
MMAP_THRESHOLD = 32 * 1024 * 1024  # ... and allocations this large get pages of their own (none of a request's)


def _glibc():
    """glibc through ctypes, or False (another libc, or EDGEXFER_MALLOC_TRIM=0)."""
    global _libc
    if _libc is None and os.environ.get("EDGEXFER_MALLOC_TRIM", "1") == "0":
        _libc = False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes, _libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            _libc.mallopt.argtypes, _libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    return _libc


def tune_malloc() -> bool:
    """For a server, once: glibc's trim threshold fixed at TRIM_THRESHOLD (`mallopt`). Left to itself glibc
    raises it to twice the largest body freed so far (up to 64 MB), and a thread's own heap (gRPC's and the
    worker threads' each have one) is shrunk only on a free past it, never by `malloc_trim`: after a burst of
    16 MB requests each such heap kept 8-16 MB. Fixing it fixes the mmap threshold too, at MMAP_THRESHOLD,
    so that bodies keep coming from the heaps (an mmap per 16 MB body costs page faults, and under a burst
    gRPC then held more of them at once). False without glibc or with EDGEXFER_MALLOC_TRIM=0."""
    libc = _glibc()
    # M_TRIM_THRESHOLD (-1), M_MMAP_THRESHOLD (-3)
    return bool(libc) and bool(libc.mallopt(-1, TRIM_THRESHOLD)) and bool(libc.mallopt(-3, MMAP_THRESHOLD))


def malloc_trim() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim(0)`); False without glibc. Freed
    request bodies of several MB otherwise stay in the process: glibc raises its mmap threshold after the
    first large free, so later ones come from arenas that are rarely given back. EDGEXFER_MALLOC_TRIM=0
    turns it off, and `tune_malloc` with it (for A/B measurements: benchmarks/bench_hostile.py)."""
    libc = _glibc()
    return bool(libc) and bool(libc.malloc_trim(0))


def release_memory() -> None:
    """After a burst of large requests: collect reference cycles (an exception raised while handling one
    keeps its frames, and through them its body, until the cyclic collector runs, which counts objects, not
    bytes), give back ONNX Runtime's arenas grown by large inputs (`model.shrink_arenas`), then `malloc_trim`."""
    gc.collect()
    shrink_arenas()
    malloc_trim()


class BodyBudget:
    """The request-body bytes a server holds at once (read, or promised by a Content-Length), shared by
    all its requests: past `limit`, a request gets 503 and Retry-After before its body is held. Plain
    integers, for one thread (the batching server's event loop, its gRPC front end too); `LockedBodyBudget`
    for several. Once TRIM_AFTER bytes were given back and none are held, the freed memory goes back to the
    OS (`release_memory`, once quiet: the callers still hold the last bodies when they give them back)."""

    def __init__(self, limit: int = MAX_BODIES_IN_FLIGHT):
        self.limit, self.used, self.released = int(limit), 0, 0
        self._trim_wanted, self._trim = False, None

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise HTTPError(503, f"the server holds {self.limit} bytes of request bodies; retry later",
                            {"Retry-After": "1"})
        self.used += n

    def give(self, n: int, freed: int | None = None) -> None:
        """`n` bytes back; `freed` of them were ever held in memory (a body refused part-way: its bytes
        read), counted towards the next trim (default: all `n`)."""
        if self._give(n, freed):
            self.idle()

    def _give(self, n: int, freed: int | None = None) -> bool:
        """Count `n` bytes back; True when the heap should be trimmed now."""
        self.used -= n
        self.released += n if freed is None else freed
        if self.released >= TRIM_AFTER:
            self.released, self._trim_wanted = 0, True
        return self._trim_wanted and not self.used

    def idle(self) -> None:
        """None held after many bytes released: trim once things stay quiet for TRIM_DELAY_S (a burst's
        every gap would otherwise trim before its last bodies are freed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._trim_wanted = False
            release_memory()
            return
        if self._trim is not None:
            self._trim.cancel()
        self._trim = loop.call_later(TRIM_DELAY_S, self._trim_now, loop)

    def _trim_now(self, loop) -> None:
        self._trim, self._trim_wanted = None, False
        loop.run_in_executor(None, release_memory)


class LockedBodyBudget(BodyBudget):
    """`BodyBudget` for a thread per connection (the standard-library server)."""

    def __init__(self, limit: int = MAX_BODIES_IN_FLIGHT):
        super().__init__(limit)
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            super().take(n)

    def give(self, n: int, freed: int | None = None) -> None:
        with self._lock:
            trim = self._give(n, freed)
        if trim:
            release_memory()  # outside the lock; the request thread's body is freed by now


def log_safe(s: str) -> str:
    """A client-given string (a decoded path) for a log line: control characters and quotes escaped,
    so that `%0A` cannot start a forged line."""
    if s.isprintable() and '"' not in s:
        return s
    return json.dumps(s)[1:-1]


def _obj(v, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise HTTPError(400, f"{what} must be a JSON object")
    return v


class InferHeader:
    """A checked v2 infer request header: the request JSON, the input's shape, the byte size of its
    binary data (None: the values are in the JSON) and whether outputs go back as binary."""

    __slots__ = ("req", "shape", "size", "binary", "heads")

    def __init__(self, req: dict, shape: list[int], size: int | None, binary: bool):
        self.req, self.shape, self.size, self.binary = req, shape, size, binary
        self.heads: dict[int, tuple[bytes, dict]] = {}  # rows -> binary response head (`infer_response`)


class HeaderCache(dict):
    """Checked binary-extension headers by their bytes, for one model. Clients send the same header with
    every request of one shape (tritonclient does), so it is parsed and checked once. Bounded; only
    headers without values in them are kept."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.size = size

    def put(self, key: bytes, h: InferHeader) -> None:
        if len(self) >= self.size:
            del self[next(iter(self))]
        self[key] = h


def parse_header(head: bytes, model: EdgeModel) -> InferHeader:
    try:
        req = json.loads(head or b"{}")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise HTTPError(400, f"malformed JSON: {str(e)[:200]}") from None
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPError(400, "expected {'inputs': [one tensor]}")
    if not isinstance(req.get("id", ""), str):
        raise HTTPError(400, "id must be a string")
    wanted = req.get("outputs") or []
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise HTTPError(400, "outputs must be a list of objects")
    t = inputs[0]
    if t.get("name") not in (None, model.input_name):
        raise HTTPError(400, f"unknown input {t.get('name')!r}; the model's input is {model.input_name!r}")
    if t.get("datatype") not in DTYPES:
        raise HTTPError(400, f"datatype must be FP32, got {t.get('datatype')!r}")
    try:
        shape = [int(s) for s in t["shape"]]
        size = _obj(t.get("parameters"), "parameters").get("binary_data_size")
        size = None if size is None else int(size)
        if size is not None and (size < 0 or any(d < 0 for d in shape) or size != 4 * math.prod(shape)):
            raise ValueError(f"binary_data_size {size} does not hold shape {shape} of FP32")
        if size is None and "data" not in t:
            raise KeyError("data")
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise HTTPError(400, f"bad tensor: {e}") from None
    if len(shape) != 4 or tuple(shape[1:]) != model.input_shape or shape[0] < 1:
        raise HTTPError(400, f"expected shape [N, {', '.join(map(str, model.input_shape))}], got {str(shape)[:200]}")
    if 4 * math.prod(shape) > MAX_BODY:  # Python integers: no overflow
        raise HTTPError(400, f"shape {shape} holds more than the {MAX_BODY} bytes a request may carry")
    known = set(model.output_names)
    for o in wanted:
        if o.get("name") not in known:
            raise HTTPError(400, f"unknown output {o.get('name')!r}; the model's outputs are {sorted(known)}")
    binary = bool(_obj(req.get("parameters"), "parameters").get("binary_data_output")) or any(
        _obj(o.get("parameters"), "parameters").get("binary_data") for o in wanted)
    return InferHeader(req, shape, size, binary)


def checked_header(head: bytes, model: EdgeModel, cache: HeaderCache | None = None) -> InferHeader:
    """`parse_header` through `cache` (which keeps short binary-extension headers)."""
    h = cache.get(head) if cache is not None else None
    if h is None:
        h = parse_header(head, model)
        if cache is not None and h.size is not None and len(head) <= MAX_CACHED_HEADER:
            cache.put(head, h)
    return h


def parse_infer(body: bytes, header_len: str | None, model: EdgeModel, cache: HeaderCache | None = None
                ) -> tuple[np.ndarray, InferHeader]:
    """(input array, its checked header) from a v2 infer body; `cache` keeps checked binary headers."""
    try:
        n = int(header_len) if header_len is not None else len(body)
    except ValueError:
        raise HTTPError(400, f"malformed JSON: {HEADER_LEN} {header_len!r} is not a number") from None
    if not 0 <= n <= len(body):
        raise HTTPError(400, f"malformed JSON: {HEADER_LEN} {n} is outside the body's {len(body)} bytes")
    h = checked_header(body[:n], model, cache)
    if h.size is not None:
        if h.size > len(body) - n:
            raise HTTPError(400, f"bad tensor: binary_data_size {h.size} is outside the {len(body) - n} bytes sent")
        x = np.frombuffer(body, dtype="<f4", count=h.size // 4, offset=n).reshape(h.shape)
    else:
        try:
            x = np.asarray(h.req["inputs"][0].pop("data"), dtype=np.float32).reshape(h.shape)  # the list freed
        except (TypeError, ValueError, OverflowError, RecursionError) as e:
            raise HTTPError(400, f"bad tensor: {str(e)[:200]}") from None
    return np.ascontiguousarray(x, dtype=np.float32), h


def infer_response(name: str, h: InferHeader, model: EdgeModel, outs: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    """The response body and headers; a binary response's JSON head is made once per header and row count."""
    req, binary = h.req, h.binary
    arrays = [np.ascontiguousarray(outs[t.name], dtype="<f4") for t in model.meta.tasks]
    wanted = {o.get("name") for o in (req.get("outputs") or [])}
    chosen = [(t, a) for t, a in zip(model.meta.tasks, arrays) if not wanted or t.output in wanted]
    if binary:
        rows = len(arrays[0])
        cached = h.heads.get(rows)
        if cached is None:
            tensors = [{"name": t.output, "datatype": "FP32", "shape": list(a.shape),
                        "parameters": {"binary_data_size": a.nbytes}} for t, a in chosen]
            head = json.dumps({"model_name": name, "model_version": "1", "id": req.get("id", ""),
                               "outputs": tensors}).encode()
            cached = (head, {"content-type": "application/octet-stream", HEADER_LEN: str(len(head))})
            if len(h.heads) < 64:
                h.heads[rows] = cached
        head, headers = cached
        return b"".join([head, *(a.tobytes() for _, a in chosen)]), headers
    tensors = [{"name": t.output, "datatype": "FP32", "shape": list(a.shape), "data": _json_values(a)}
               for t, a in chosen]
    head = json.dumps({"model_name": name, "model_version": "1", "id": req.get("id", ""), "outputs": tensors},
                      allow_nan=False).encode()
    return head, {"content-type": "application/json"}


def _json_values(a: np.ndarray) -> list:
    """An output's values for JSON, which has no NaN or infinity: those become null."""
    values = a.ravel().tolist()
    if np.isfinite(a).all():
        return values
    return [v if math.isfinite(v) else None for v in values]


def model_metadata(name: str, m: EdgeModel) -> dict:
    return {
        "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": m.input_name, "datatype": "FP32", "shape": [-1, *m.input_shape]}],
        "outputs": [{"name": t.output, "datatype": "FP32", "shape": [-1, len(t.labels)]} for t in m.meta.tasks],
        "parameters": {"edgexfer": m.meta.to_dict()},
    }
