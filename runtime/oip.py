"""Open Inference Protocol (KServe v2 REST) over `EdgeModel`, on starlette + uvicorn, with dynamic batching.

    edgexfer serve runs/demo --server uvicorn        # needs: pip install "edgexfer[serve]"

Speaks JSON tensors and the binary tensor extension (tritonclient's default: an
`Inference-Header-Content-Length` header, the JSON header, then raw little-endian bytes), so
tritonclient and KServe tooling work unchanged. Requests for one model are batched up to
`max_batch_size` or `max_queue_delay_ms` (Triton's meaning of both); inference runs off the event loop
in one worker thread per model; each request gets exactly its own rows back. A full queue answers 503
with Retry-After, a body over the limit 413, a malformed request 400, an unknown model 404.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgexfer.runtime.errors import ImageError, RuntimeInputError
from edgexfer.runtime.model import EdgeModel
from edgexfer.runtime.protocol import HEADER_LEN, MAX_BODY, HTTPError, infer_response, parse_infer

log = logging.getLogger(__name__)



class QueueFull(Exception):
    pass


@dataclass
class BatchConfig:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256           # pending requests per model before 503
    timeout_s: float = 30.0        # per request


class DynamicBatcher:
    """Collects requests for one model into batches (size or delay bound), runs them off the loop."""

    def __init__(self, model: EdgeModel, cfg: BatchConfig):
        self.model, self.cfg = model, cfg
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgexfer-infer")
        self.task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.cfg.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            while self.queue is not None and not self.queue.empty():  # answer what was accepted
                await asyncio.sleep(0.01)
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((x, fut))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await asyncio.wait_for(fut, self.cfg.timeout_s)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            rows = len(items[0][0])
            deadline = loop.time() + self.cfg.max_queue_delay_ms / 1e3
            while rows < self.cfg.max_batch_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                items.append(nxt)
                rows += len(nxt[0])
            live = [(x, f) for x, f in items if not f.done()]
            if not live:
                continue
            xb = np.concatenate([x for x, _ in live])
            self.batch_sizes.append(len(xb))
            try:
                outs = await loop.run_in_executor(self.pool, self.model.run, xb)
            except Exception as e:  # one bad batch must not stop the loop
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            start = 0
            for x, f in live:
                n = len(x)
                if not f.done():
                    f.set_result({k: v[start:start + n] for k, v in outs.items()})
                start += n


def create_app(models: dict[str, Path], *, threads: int | None = None, batch: BatchConfig = BatchConfig()):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from edgexfer.runtime.server import ModelServer

    ms = ModelServer(models, threads)
    batchers = {n: DynamicBatcher(m, batch) for n, m in ms.models.items()}
    stats = {"requests": 0, "errors": 0}

    async def body_of(request: Request) -> bytes:
        n = int(request.headers.get("content-length") or 0)
        if n > MAX_BODY:
            raise HTTPError(413, f"body of {n} bytes exceeds {MAX_BODY}")
        data = await request.body()
        if len(data) > MAX_BODY:
            raise HTTPError(413, f"body exceeds {MAX_BODY} bytes")
        return data

    def guard(handler):
        async def wrapped(request: Request):
            stats["requests"] += 1
            try:
                return await handler(request)
            except HTTPError as e:
                stats["errors"] += 1
                return JSONResponse({"error": str(e)}, e.status, headers=e.headers)
            except QueueFull:
                stats["errors"] += 1
                return JSONResponse({"error": "queue full"}, 503, headers={"Retry-After": "1"})
            except asyncio.TimeoutError:
                stats["errors"] += 1
                return JSONResponse({"error": "inference timed out"}, 504)
            except Exception as e:  # never let one request take the server down
                stats["errors"] += 1
                log.exception("internal error")
                return JSONResponse({"error": f"internal error: {type(e).__name__}"}, 500)
        return wrapped

    def model_of(request: Request) -> tuple[str, EdgeModel]:
        name = request.path_params["model"]
        return name, ms.model(name)  # 404 for an unknown name

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": True})

    async def server_meta(request):
        from edgexfer import __version__
        return JSONResponse({"name": "edgexfer", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_meta(request):
        name, _ = model_of(request)
        return JSONResponse(ms.metadata(name))

    async def model_ready(request):
        name, _ = model_of(request)
        return JSONResponse({"name": name, "ready": True})

    async def infer(request):
        name, model = model_of(request)
        x, req, binary = parse_infer(await body_of(request), request.headers.get(HEADER_LEN), model)
        outs = await batchers[name].submit(x)
        data, headers = infer_response(name, req, model, outs, binary)
        return Response(data, 200, headers=headers)

    async def classify(request):
        name, model = model_of(request)
        data = await body_of(request)
        try:
            x = model.preprocess(data)
        except (ImageError, RuntimeInputError) as e:
            raise HTTPError(400, str(e)) from None
        outs = await batchers[name].submit(x)
        return JSONResponse({"model": name, "predictions": model.decode(outs, top_k=5)[0]})

    async def metrics(request):
        lines = ["# TYPE edgexfer_requests_total counter", f"edgexfer_requests_total {stats['requests']}",
                 "# TYPE edgexfer_errors_total counter", f"edgexfer_errors_total {stats['errors']}"]
        for n, b in batchers.items():
            lines += [f'edgexfer_queue_depth{{model="{n}"}} {b.queue.qsize() if b.queue else 0}',
                      f'edgexfer_batches_total{{model="{n}"}} {len(b.batch_sizes)}',
                      f'edgexfer_batched_rows_total{{model="{n}"}} {sum(b.batch_sizes)}']
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for b in batchers.values():
            b.start()
        yield
        for b in batchers.values():  # graceful shutdown: answer every accepted request first
            await b.stop()

    g = guard
    routes = [
        Route("/v2/health/live", g(live)), Route("/v2/health/ready", g(ready)), Route("/v2", g(server_meta)),
        Route("/v2/models/{model}", g(model_meta)), Route("/v2/models/{model}/ready", g(model_ready)),
        Route("/v2/models/{model}/infer", g(infer), methods=["POST"]),
        Route("/v2/models/{model}/classify", g(classify), methods=["POST"]),
        Route("/metrics", g(metrics)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batchers = batchers
    return app


def serve(models: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          batch: BatchConfig = BatchConfig()) -> None:
    import uvicorn

    uvicorn.run(create_app(models, threads=threads, batch=batch), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=30)
