"""The runtime's commands — `bench`, `predict`, `serve`, `bundle`, `compare`, `verify` — with the standard library's argparse, so they
work on a board with the runtime install alone (numpy, onnxruntime, Pillow).

`edgexfer bench|predict|serve ...` lands here (the training CLI forwards these three), and so does
`python -m edgexfer.runtime ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from edgexfer.runtime.errors import ImageError, MetadataError, RuntimeInputError

COMMANDS = ("bench", "predict", "serve", "bundle", "compare", "verify")
log = logging.getLogger("edgexfer")


def _port(s: str) -> int:
    """A TCP port, 0-65535 (0: any free port); from --port or $EDGEXFER_PORT."""
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535 (--port or $EDGEXFER_PORT); "
                                         f"got {s!r}")
    return v


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _aspect(s: str) -> float:
    v = float(s)
    if not 1 <= v <= 1e6:
        raise argparse.ArgumentTypeError("must be between 1 and 1000000")
    return v


def _image_limits(p: argparse.ArgumentParser) -> None:
    from edgexfer.runtime.preprocess import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS

    p.add_argument("--max-image-pixels", type=_pos_int, default=MAX_IMAGE_PIXELS,
                   help="largest image accepted, in decoded pixels (width x height, checked before decoding; "
                        f"also the resized image); over it: an error, 413 when serving (default {MAX_IMAGE_PIXELS})")
    p.add_argument("--max-aspect-ratio", type=_aspect, default=MAX_ASPECT_RATIO,
                   help="largest ratio of an image's longer side to its shorter side; over it: an error, 400 when "
                        f"serving (default {MAX_ASPECT_RATIO:g})")


def _limits(a):
    """The image limits of `predict` and `serve`, with Pillow's own decompression-bomb check moved out of
    their way (they check the header's size before decoding)."""
    import warnings

    from PIL import Image

    from edgexfer.runtime.preprocess import ImageLimits

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, a.max_image_pixels)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return ImageLimits(a.max_image_pixels, a.max_aspect_ratio)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgexfer", description="edgexfer runtime commands")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="latency, throughput, cold start and memory of models, side by side",
                       description="Benchmark ONNX files (or every ONNX file of run folders), interleaved, with "
                                   "ratios to the first model; models of different input sizes each get an input of "
                                   "their own size. PyTorch eager (from a run folder's checkpoint, when torch is "
                                   "installed) and OpenVINO (when installed) are measured beside; the output says why "
                                   "when one is not.")
    b.add_argument("models", nargs="+", help="edgexfer ONNX files or run folders")
    b.add_argument("--threads", type=_pos_int, default=2, help="intra-op threads (default 2)")
    b.add_argument("--warmup", type=_pos_int, default=20, help="warm-up calls per model (default 20)")
    b.add_argument("--iters", type=_pos_int, default=200, help="single-stream rounds (default 200)")
    b.add_argument("--duration", type=float, default=0.0, help="single-stream seconds instead of --iters")
    b.add_argument("--batches", type=_ints, default=(1, 8, 32), help="offline throughput batch sizes (default 1,8,32)")
    b.add_argument("--sweep", type=_ints, default=None, nargs="?", const=(),
                   help="thread sweep, e.g. --sweep 1,2,4 (bare --sweep: 1..cores)")
    b.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start measurement")
    b.add_argument("--no-reference", action="store_true", help="skip PyTorch and OpenVINO references")
    b.add_argument("--json", type=Path, help="write the result document (schema edgexfer.bench/1)")
    b.add_argument("--markdown", type=Path, help="write the table as markdown")
    b.add_argument("--plot", type=Path, help="write a PNG plot (needs matplotlib)")

    p = sub.add_parser("predict", help="classify images; one JSON line per image")
    p.add_argument("model", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=_pos_int, default=3)
    p.add_argument("--threads", type=_pos_int, default=None)
    p.add_argument("--provider", action="append", default=None,
                   help="execution provider to prefer, e.g. CUDAExecutionProvider (repeatable; CPU is the fallback)")
    _image_limits(p)

    s = sub.add_parser("serve", help="serve models over HTTP (Open Inference Protocol v2)")
    s.add_argument("models", nargs="+", type=Path, help="run folders or edgexfer ONNX files")
    s.add_argument("--host", default=os.environ.get("EDGEXFER_HOST", "127.0.0.1"))
    s.add_argument("--port", type=_port, default=os.environ.get("EDGEXFER_PORT", "8000"),
                   help="TCP port, 0-65535 (default: $EDGEXFER_PORT, else 8000)")
    s.add_argument("--grpc-port", type=_port, default=None,
                   help="also serve the protocol's gRPC API (inference.GRPCInferenceService) on this port, over the "
                        "same models and batchers (uvicorn server; needs grpcio: pip install 'edgexfer[serve]'; "
                        "default: no gRPC)")
    s.add_argument("--threads", type=_pos_int, default=None)
    s.add_argument("--server", choices=("auto", "uvicorn", "stdlib"), default="auto",
                   help="uvicorn: starlette + uvicorn with dynamic batching and the binary tensor extension "
                        "(pip install 'edgexfer[serve]'); stdlib: the standard library's, no batching; "
                        "auto: uvicorn when installed")
    s.add_argument("--max-batch-size", type=_pos_int, default=32, help="dynamic batching (uvicorn server)")
    s.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="dynamic batching (uvicorn server)")
    s.add_argument("--instances", type=_pos_int, default=1,
                   help="copies of each model computing batches side by side, each with --threads ONNX Runtime "
                        "threads (uvicorn server; Triton's instance count; default 1)")
    s.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a request may wait for its answer before 504 (uvicorn server; default 30)")
    s.add_argument("--token", default=os.environ.get("EDGEXFER_TOKEN") or None,
                   help="require 'Authorization: Bearer TOKEN' on every endpoint but /v2/health/* "
                        "(default: $EDGEXFER_TOKEN; none: no token)")
    s.add_argument("--switch-interval-us", type=float, default=None,
                   help="the server process's GIL switch interval: how long an inference thread waits for "
                        "the event loop after each batch (uvicorn server; default 20)")
    s.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no access-log line per request (logger edgexfer.access)")
    _image_limits(s)
    s.add_argument("--max-inflight-mib", type=_pos_int, default=128,
                   help="request-body MiB the server holds at once, all requests together; past it 503 with "
                        "Retry-After (default 128)")
    u = sub.add_parser("bundle", help="what to copy to a board: model, pinned requirements, runtime, example")
    u.add_argument("source", type=Path, help="run folder (its INT8 file when within the accuracy bound) or ONNX file")
    u.add_argument("out", type=Path)
    u.add_argument("--force", action="store_true", help="replace OUT if it exists")
    u.add_argument("--arch", choices=("host", "arm64"), default="host",
                   help="arm64: carry aarch64 wheels (Python 3.11, manylinux_2_28) so it installs with no network")

    c = sub.add_parser("compare", help="`edgexfer bench --json` results of several machines in one table and plot",
                       description="Merge bench results (schema edgexfer.bench/1) from several machines, keyed by "
                                   "the machine info each carries.")
    c.add_argument("results", nargs="+", type=Path, help="JSON files written by `edgexfer bench --json`")
    c.add_argument("--markdown", type=Path, help="write the table as markdown")
    c.add_argument("--json", type=Path, help="write the merged document (schema edgexfer.compare/1)")
    c.add_argument("--plot", type=Path, help="write a PNG plot (needs matplotlib)")

    v = sub.add_parser("verify", help="run a model under emulated arm64 and compare it with this host",
                       description="Run the runtime install (aarch64 wheels) in an arm64 Debian root filesystem "
                                   "under qemu user-mode emulation (needs root; cached in ~/.cache/edgexfer/arm64) "
                                   "on a sample of held-out images: top-1 agreement with this host, max abs "
                                   "difference of outputs, arm64-measured accuracy. Emulated timing is not latency.")
    v.add_argument("target", type=Path, help="run folder (its test split; writes RUN_DIR/verify_arm64.json) or ONNX file")
    v.add_argument("--arch", choices=("arm64",), required=True)
    v.add_argument("--samples", type=_pos_int, default=200, help="images to run (default 200; emulation is ~250x slower)")
    v.add_argument("--images", type=Path, help="for an ONNX file: an ImageFolder tree (labelled) or a folder of images")
    v.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    v.add_argument("--threads", type=_pos_int, default=1, help="intra-op threads on both sides (default 1)")
    v.add_argument("--min-agreement", type=float, default=0.995, help="exit 1 below this top-1 agreement (default 0.995)")
    v.add_argument("--json", type=Path, help="where to write the result (default RUN_DIR/verify_arm64.json)")
    return ap


def bundle_cmd(a) -> None:
    from edgexfer.runtime.bundle import bundle

    r = bundle(a.source, a.out, force=a.force, arch=a.arch)
    print(f"{r['out']}: {r['model']} ({r['why']}); requirements {', '.join(r['requirements'])}")
    if r.get("warning"):
        print(f"WARNING: {r['warning']}.", file=sys.stderr)
    if r["wheels"]:
        print(f"{len(r['wheels'])} {r['arch']} wheels in {r['out']}/wheels: installs with no network")


def bench_cmd(a, references) -> None:
    from edgexfer.runtime.bench import BenchConfig, plot, run_benchmark, to_markdown

    sweep = () if a.sweep is None else (a.sweep or tuple(sorted({1, 2, 4, os.cpu_count() or 1} & set(range(1, (os.cpu_count() or 1) + 1)))))
    cfg = BenchConfig(threads=a.threads, warmup=a.warmup, iters=a.iters, duration=a.duration, batches=a.batches,
                      sweep=sweep, cold_start=not a.no_cold_start, openvino=not a.no_reference,
                      references=not a.no_reference)
    res = run_benchmark(a.models, cfg, references=references,
                        log=lambda s: print(f"==> {s}", file=sys.stderr))
    _emit(a, res, to_markdown(res), plot)


def _emit(a, doc: dict, md: str, plot) -> None:
    """Print the table; write --json, --markdown and --plot where asked (atomically)."""
    from edgexfer.runtime import atomic

    print(md)
    if a.json:
        atomic.write_json(a.json, doc)
    if a.markdown:
        atomic.write_text(a.markdown, md)
    if a.plot and not plot(doc, a.plot):
        print("note: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)


def compare_cmd(a) -> None:
    from edgexfer.runtime.compare import compare, plot, to_markdown

    doc = compare(a.results)
    _emit(a, doc, to_markdown(doc), plot)


def verify_cmd(a, held_out) -> None:
    import numpy as np

    from edgexfer.runtime import atomic
    from edgexfer.runtime.model import EdgeModel
    from edgexfer.runtime.verify import sample, scan_images, to_markdown, verify_arm64

    out = a.json
    if a.target.is_dir():
        models = sorted((p for p in a.target.glob("model*.onnx") if not p.name.endswith(".e2e.onnx")),
                        key=lambda p: (p.name != "model.onnx", p.name))
        if not models:
            raise FileNotFoundError(f"no model*.onnx in {a.target}")
        if a.images:
            images, labels, source = scan_images(a.images, EdgeModel(models[0]).labels)
        elif held_out is None:
            raise RuntimeInputError("reading a run folder's test split needs the edgexfer package's data module; "
                                    "pass --images FOLDER")
        else:
            images, labels, classes, source = held_out(a.target)
            names = list(EdgeModel(models[0]).labels)
            if classes != names:  # map the data set's class order onto the model's
                labels = np.asarray([names.index(classes[k]) for k in labels])
        out = out or a.target / "verify_arm64.json"
    elif a.target.is_file():
        models = [a.target]
        if a.images:
            images, labels, source = scan_images(a.images, EdgeModel(a.target).labels)
        else:
            raise RuntimeInputError("verifying a bare ONNX file needs --images FOLDER (ImageFolder or plain images)")
    else:
        raise FileNotFoundError(f"run folder or model not found: {a.target}")
    idx = sample(len(images), a.samples, a.seed)
    images = [images[i] for i in idx]
    labels = None if labels is None else np.asarray(labels)[idx]
    res = verify_arm64(models, images, labels, source=f"{source}, {len(idx)} sampled with seed {a.seed}",
                       threads=a.threads, min_agreement=a.min_agreement, log=lambda s: print(f"==> {s}", file=sys.stderr))
    print(to_markdown(res))
    if out:
        atomic.write_json(out, res)
        print(f"written: {out}", file=sys.stderr)
    if not res["passed"]:
        print(f"error: top-1 agreement below {a.min_agreement} for "
              f"{', '.join(n for n, r in res['models'].items() if not r['passed'])}", file=sys.stderr)
        sys.exit(1)


def predict_cmd(a) -> None:
    from edgexfer.runtime.model import EdgeModel

    limits = _limits(a)
    m = EdgeModel(a.model, threads=a.threads, providers=a.provider, max_image_pixels=limits.max_pixels,
                  max_aspect_ratio=limits.max_aspect)
    for img in a.images:
        print(json.dumps({"image": str(img), "predictions": m.predict(img, top_k=a.top_k)}))


def serve_cmd(a) -> None:
    from edgexfer.runtime.protocol import MAX_BODY
    from edgexfer.runtime.server import resolve_models, serve

    kind = a.server
    if kind == "auto":
        import importlib.util

        needs = ("starlette", "uvicorn", "prometheus_client")
        kind = "uvicorn" if all(importlib.util.find_spec(m) for m in needs) else "stdlib"
    if a.timeout <= 0 or a.max_queue_delay_ms < 0:
        raise RuntimeInputError("--timeout must be > 0 and --max-queue-delay-ms >= 0")
    if a.switch_interval_us is not None and not 1 <= a.switch_interval_us <= 1e6:
        raise RuntimeInputError(f"--switch-interval-us must be between 1 and 1000000, got {a.switch_interval_us:g}")
    models = resolve_models(a.models)
    limits, inflight = _limits(a), a.max_inflight_mib * 1024 * 1024
    if inflight < MAX_BODY:
        raise RuntimeInputError(f"--max-inflight-mib must hold one largest body ({MAX_BODY >> 20} MiB)")
    if a.grpc_port is not None:
        import importlib.util

        if kind != "uvicorn":
            raise RuntimeInputError("--grpc-port runs beside the batching server: --server uvicorn "
                                    "(pip install 'edgexfer[serve]')")
        if not (importlib.util.find_spec("grpc") and importlib.util.find_spec("google.protobuf")):
            raise RuntimeInputError("--grpc-port needs grpcio and protobuf: pip install 'edgexfer[serve]'")
    if kind == "uvicorn":
        from edgexfer.runtime.oip import BatchConfig, serve as serve_oip

        import socket

        for port in (a.port, a.grpc_port):  # uvicorn would log a bind error and exit 3, after loading the models
            if not port:
                continue
            with socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((a.host, port))
                except OSError as e:
                    raise RuntimeInputError(f"cannot listen on {a.host}:{port}: {e.strerror or e}") from None
        if a.grpc_port and a.grpc_port == a.port:
            raise RuntimeInputError(f"--grpc-port {a.grpc_port} is the REST --port too; give another")
        serve_oip(models, host=a.host, port=a.port, threads=a.threads, token=a.token, access_log=a.access_log,
                  batch=BatchConfig(max_batch_size=a.max_batch_size, max_queue_delay_ms=a.max_queue_delay_ms,
                                    timeout_s=a.timeout, instances=a.instances),
                  switch_interval_us=a.switch_interval_us, image_limits=limits, max_bytes_in_flight=inflight,
                  grpc_port=a.grpc_port)
    else:
        import errno

        try:
            serve(models, host=a.host, port=a.port, threads=a.threads, token=a.token, access_log=a.access_log,
                  image_limits=limits, max_bytes_in_flight=inflight)
        except OSError as e:  # binding: one line, not a traceback
            if isinstance(e, FileNotFoundError) or e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise
            raise RuntimeInputError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None, references=(), held_out=None) -> None:
    """Run a runtime command; user mistakes print one line and exit 1. `held_out(run_dir)` gives a run
    folder's test split (images, labels, classes, description) to `verify`."""
    a = parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
        log.setLevel(logging.INFO)
    try:
        if a.command == "bench":
            bench_cmd(a, references)
        elif a.command == "predict":
            predict_cmd(a)
        elif a.command == "bundle":
            bundle_cmd(a)
        elif a.command == "compare":
            compare_cmd(a)
        elif a.command == "verify":
            verify_cmd(a, held_out)
        else:
            serve_cmd(a)
    except (FileNotFoundError, MetadataError, ImageError, RuntimeInputError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
