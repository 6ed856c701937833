"""A served app on 127.0.0.1 for a test: uvicorn in a thread, on a free port, stopped afterwards."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app):
    """Yields "127.0.0.1:PORT" while uvicorn serves `app` (its lifespan included)."""
    import uvicorn

    port = free_port()
    from edgexfer.runtime.oip import http_protocol

    # the protocol `edgexfer serve` runs (uvicorn's, with responses written in one piece)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http_protocol()))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=30)


@contextlib.contextmanager
def live_with_grpc(app):
    """Yields (gRPC "127.0.0.1:PORT", REST "http://127.0.0.1:PORT") while one uvicorn server serves `app` over REST
    and the Open Inference Protocol's gRPC API on a free port (as `edgexfer serve --grpc-port` does)."""
    import uvicorn

    from edgexfer.runtime.oip import http_protocol, uvicorn_server

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", http=http_protocol())
    server = uvicorn_server(config, grpc_port=0)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while getattr(server, "grpc", None) is None and time.time() < deadline:
        time.sleep(0.05)
    assert server.grpc is not None, "the gRPC server did not start"
    try:
        yield f"127.0.0.1:{server.grpc_port}", f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        t.join(timeout=30)


def infer_concurrently(url: str, model: str, xs, workers: int) -> list:
    """Each array of `xs` sent as its own tritonclient request (binary), `workers` at a time -> logits."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.http as httpclient

    def one(x):
        client = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp]).as_numpy("logits")

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, xs))
