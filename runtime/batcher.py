"""The dynamic batcher of the batching servers (REST on uvicorn, `oip.py`, and gRPC, `grpc_server.py`):
requests for one model are collected into batches up to `max_batch_size` rows or `max_queue_delay_ms`
(Triton's meaning of both) and computed off the event loop, each request getting exactly its own rows back.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edgexfer.runtime.dataplane import QueueFull
from edgexfer.runtime.model import EdgeModel

__all__ = ["BatchConfig", "DynamicBatcher", "QueueFull"]


@dataclass
class BatchConfig:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256           # pending requests per model before 503
    timeout_s: float = 30.0        # per request, from acceptance to its rows (504 past it)
    instances: int = 1             # copies of each model running batches side by side (Triton's instance count)


class DynamicBatcher:
    """Collects requests for one model into batches (size or delay bound) and computes them off the
    event loop, on `len(models)` instances side by side. Each instance is a thread with its own ONNX
    Runtime session that takes the next batch from the shared queue itself as soon as it is free, so a
    busy event loop never delays a batch, and the loop answers one batch and reads the next requests
    while another batch computes.

    A batch starts when `max_batch_size` rows are waiting, or `max_queue_delay_ms` after its oldest
    request arrived (Triton's meaning of both). A request larger than `max_batch_size` runs alone."""

    def __init__(self, model: EdgeModel | list[EdgeModel], cfg: BatchConfig, observe=None):
        self.models = model if isinstance(model, list) else [model]
        self.model, self.cfg = self.models[0], cfg
        self.cond = threading.Condition(threading.Lock())  # guards pending, pending_rows, closed
        self.pending: deque[tuple[np.ndarray, asyncio.Future, float]] = deque()  # (rows, answer, arrival)
        self.pending_rows = 0
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.deadlines: deque[tuple[float, asyncio.Future]] = deque()  # in arrival order, so in deadline order
        self.sweep_s = min(0.05, cfg.timeout_s / 4)  # a late request gets its 504 within this much
        self._sweeper: asyncio.TimerHandle | None = None
        self.waiting = 0  # submitted requests not yet answered
        self.recent_batches: deque[int] = deque(maxlen=1024)  # rows per batch, newest last (tests, debugging)
        self.observe = observe or (lambda rows: None)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.threads = [threading.Thread(target=self._instance, args=(m,), name=f"edgexfer-infer-{i}", daemon=True)
                        for i, m in enumerate(self.models)]
        for t in self.threads:
            t.start()
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    def depth(self) -> int:
        return len(self.pending)

    async def stop(self) -> None:
        while self.waiting:  # answer what was accepted (each waits at most timeout_s)
            await asyncio.sleep(0.01)
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in self.threads:
            await asyncio.get_running_loop().run_in_executor(None, t.join)

    def _sweep(self) -> None:
        """Answer 504 to the requests past their deadline (one timer per model, not one per request)."""
        d, now = self.deadlines, self.loop.time()
        while d and (d[0][1].done() or d[0][0] <= now):
            _, f = d.popleft()
            if not f.done():
                f.set_exception(asyncio.TimeoutError())
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.pending) >= self.cfg.max_queue:
            raise QueueFull
        fut = self.loop.create_future()
        with self.cond:
            was = self.pending_rows
            self.pending.append((x, fut, time.monotonic()))
            self.pending_rows += len(x)
            if was == 0 or (was < self.cfg.max_batch_size <= self.pending_rows):
                self.cond.notify_all()  # an idle instance starts a batch; a gathering one stops waiting
        self.deadlines.append((self.loop.time() + self.cfg.timeout_s, fut))
        self.waiting += 1
        try:
            return await fut
        finally:
            self.waiting -= 1

    def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]] | None:
        """Blocks until a batch is due, then takes it: the oldest waiting requests, up to max_batch_size
        rows (at least one request), dropping those already answered (timed out). None: stopped."""
        cfg, delay = self.cfg, self.cfg.max_queue_delay_ms / 1e3
        with self.cond:
            while True:
                while not self.pending:
                    if self.closed:
                        return None
                    self.cond.wait()
                left = delay - (time.monotonic() - self.pending[0][2])
                if self.pending_rows >= cfg.max_batch_size or left <= 0:
                    break
                self.cond.wait(left)
            items, rows = [], 0
            while self.pending:
                n = len(self.pending[0][0])
                if items and rows + n > cfg.max_batch_size:
                    break
                x, f, _ = self.pending.popleft()
                self.pending_rows -= n
                if not f.done():
                    items.append((x, f))
                    rows += n
            if self.pending:
                self.cond.notify()  # what is left over is another instance's
            return items

    @staticmethod
    def _gather(items) -> np.ndarray:
        """The batch's rows in one array. One bytes join holds the GIL throughout: np.concatenate lets go
        of it for every row of 500+ values, and while the event loop runs the thread then waits a switch
        interval to get it back, each time (a sizeable share of a small model's batch)."""
        xs = [x for x, _ in items]
        if len(xs) == 1:
            return xs[0]
        if all(x.flags.c_contiguous and x.dtype == xs[0].dtype and x.shape[1:] == xs[0].shape[1:] for x in xs):
            return np.frombuffer(b"".join(xs), xs[0].dtype).reshape(-1, *xs[0].shape[1:])
        return np.concatenate(xs)

    def _instance(self, model: EdgeModel) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            if not items:
                continue
            xb = self._gather(items)
            try:
                outs, err = model.run(xb), None
            except Exception as e:  # one bad batch must not stop the instance
                outs, err = None, e
            self.loop.call_soon_threadsafe(self._answer, items, len(xb), outs, err)
            del items, xb, outs, err  # not held while this thread waits for the next batch (16 MB of a request)

    def _answer(self, items, rows: int, outs, err) -> None:
        """On the event loop: each request its own rows (the batch's bookkeeping too, off the instance thread)."""
        self.recent_batches.append(rows)
        self.observe(rows)
        start = 0
        for x, f in items:
            n = len(x)
            if not f.done():
                if err is not None:
                    f.set_exception(err)
                else:
                    f.set_result({k: v[start:start + n] for k, v in outs.items()})
            start += n
