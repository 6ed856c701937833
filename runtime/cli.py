"""The runtime's command tree (click): `bench`, `predict`, `serve`, `bundle`, `compare`, `verify`, working
with the runtime install alone (numpy, onnxruntime, Pillow, click; nothing heavy is imported until a command
runs). `python -m edgexfer.runtime ...` (what a bundle runs) is this tree alone.

The runtime imports nothing from the packages above it. The `edgexfer` command is the full tree that the
training package builds on this one (edgexfer/cli.py: `command_tree` with its commands, and a `Lent` with
what the runtime's commands use from above where it is installed: bench's PyTorch reference, verify's
test split, bundle's end-to-end writer).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import click

from edgexfer.runtime.errors import ImageError, MetadataError, ModelFileError, RuntimeInputError
from edgexfer.runtime.progress import Progress  # noqa: F401  (the one progress helper; edgexfer/cli.py uses it from here)

COMMANDS = ("bench", "predict", "serve", "bundle", "compare", "verify")
# The commands the training package adds to the full tree (edgexfer/cli.py), by name only: this tree alone (a
# bundle, `python -m edgexfer.runtime`) says where they are instead of "No such command".
TRAINING = ("run", "finetune", "export", "quantize", "evaluate", "rank", "curve", "inspect", "backbones")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}
log = logging.getLogger("edgexfer")


def quiet_option(f):
    """--quiet, the same on every command that shows progress: no progress lines and no INFO log lines (warnings,
    errors and the result still print)."""

    def set_quiet(ctx, param, value):
        if value:
            Progress.quiet_all = True
            log.setLevel(logging.WARNING)
        return value

    return click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=set_quiet,
                        help="No progress lines and no informational log lines; warnings, errors and the "
                             "result still print.")(f)


class Port(click.IntRange):
    """A TCP port: click's IntRange(0, 65535) (0: any free port), with one message for every wrong value (not a
    number, out of range, or from `envvar`) that names the range and the environment variable."""
    name = "PORT"

    def __init__(self, envvar: str):
        super().__init__(0, 65535)
        self.envvar = envvar

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            where = f"{param.opts[0]} or ${self.envvar}" if param is not None else f"${self.envvar}"
            self.fail(f"a port is a whole number from 0 to 65535 ({where}); got {value!r}", param, ctx)


class Ints(click.ParamType):
    """Comma-separated positive integers."""
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            vals = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"expected comma-separated integers, got {value!r}", param, ctx)
        if not vals or min(vals) < 1:
            self.fail(f"expected positive integers, got {value!r}", param, ctx)
        return vals


POS = click.IntRange(min=1)
# One --threads default for every command (ONNX Runtime's intra-op threads, and PyTorch's where it runs): 2, the
# count every benchmark in benchmarks/RESULTS.md was measured at; more cores help a large model at batch 1 little.
THREADS = 2


def threads_option(what: str = "ONNX Runtime intra-op threads."):
    """--threads, the same name, type and default in every command; `what` says what the threads do there."""
    return click.option("--threads", type=POS, default=THREADS, show_default=True, help=what)


def json_options(what: str, out_default: str = "none"):
    """--json (print the result document to stdout instead of the table, as every command's --json does) and
    --json-out FILE (write it)."""

    def deco(f):
        f = click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         show_default=out_default, help=f"Write the result document ({what}) to this file.")(f)
        return click.option("--json", "json_", is_flag=True,
                            help=f"Print the result document ({what}) to stdout instead of the table.")(f)
    return deco


def _json_file_given(json_: bool, args) -> None:
    """`--json FILE` of earlier versions: --json is a flag now and FILE would be read as an input."""
    given = [str(a) for a in args if str(a).endswith(".json")]
    if json_ and given and not all(Path(a).is_file() for a in given):
        raise click.UsageError(f"--json prints the result to stdout; to write it to {given[-1]}, use --json-out "
                               f"{given[-1]}")


def image_limit_options(f):
    from edgexfer.runtime.preprocess import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS

    f = click.option("--max-aspect-ratio", type=click.FloatRange(1, 1e6), default=MAX_ASPECT_RATIO,
                     help="Largest ratio of an image's longer side to its shorter side; over it: an error, 400 "
                          "when serving.")(f)
    return click.option("--max-image-pixels", type=POS, default=MAX_IMAGE_PIXELS,
                        help="Largest image accepted, in decoded pixels (width x height, checked before decoding; "
                             "also the resized image); over it: an error, 413 when serving.")(f)


def _limits(max_image_pixels: int, max_aspect_ratio: float):
    """The image limits of `predict` and `serve`, with Pillow's own decompression-bomb check moved out of
    their way (they check the header's size before decoding)."""
    import warnings

    from PIL import Image

    from edgexfer.runtime.preprocess import ImageLimits

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_image_pixels)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return ImageLimits(max_image_pixels, max_aspect_ratio)


@dataclass(frozen=True)
class Lent:
    """What the layer above lends the runtime's commands in the full `edgexfer` tree (edgexfer/cli.py fills it;
    the runtime imports nothing from above). Each is called as its command runs and gives nothing where what it
    lends is not installed; this tree alone (a bundle, `python -m edgexfer.runtime`) is lent nothing."""
    # bench RUN: reference backends, each (run_dir, threads) -> bench.Candidate or None (PyTorch eager)
    bench_references: Callable[[], Sequence[Callable]] = tuple
    # verify RUN: run_dir -> (images, labels, classes, source), the run's test split rebuilt from its config
    held_out: Callable[[], Optional[Callable]] = lambda: None
    # bundle: (model, dest) -> writes the model's end-to-end file at dest (preprocessing in the graph)
    write_e2e: Callable[[], Optional[Callable]] = lambda: None


class Tree(click.Group):
    """A command tree: its commands listed in the order they were added, the training commands' names known to
    this tree alone (it says where they are), and `lent` for the runtime's commands (`command_tree`)."""

    lent = Lent()

    def list_commands(self, ctx):
        return list(self.commands)

    def resolve_command(self, ctx, args):
        """An unknown command name gets click's "Did you mean ...?" over every command, the training ones
        included (click's own suggestion knows only the commands registered up front): `evalute` -> evaluate."""
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            import difflib

            name = str(args[0]) if args else ""
            close = difflib.get_close_matches(name, self.list_commands(ctx))
            if close and e.message.startswith("No such command") and "Did you mean" not in e.format_message():
                raise click.UsageError(f"{e.message} Did you mean {' or '.join(map(repr, close))}?", ctx) from None
            raise

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in TRAINING:  # the runtime alone, as a bundle or the Docker image's emulated job ships it
            raise RuntimeInputError(f"`edgexfer {name}` is a training command; this is the runtime alone (commands: "
                                    f"{', '.join(COMMANDS)}): install the edgexfer package with 'edgexfer[train]'")
        return cmd


def _lent() -> Lent:
    """What the tree the running command belongs to was lent (nothing: the runtime alone)."""
    ctx = click.get_current_context(silent=True)
    return getattr(ctx.find_root().command, "lent", Lent()) if ctx else Lent()


@click.group(cls=Tree, context_settings=CONTEXT)
@click.version_option(__import__("edgexfer").__version__, "--version", prog_name="edgexfer")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def cli(ctx, verbose: bool):
    """Few labelled images in; a compact, fast, self-describing ONNX model for a CPU or a board out.

    Runtime commands (bench, predict, serve, bundle, compare, verify) need the runtime install only; the
    others need the [train] extra (pip install 'edgexfer[train]').
    """
    # Our own progress at INFO; third-party chatter (onnxruntime.quantization logs every scale it
    # touches through the root logger) only at WARNING, or everything with --verbose.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                            stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    Progress.quiet_all = False  # a command's --quiet sets it again (in-process callers run several commands)
    ctx.ensure_object(dict)


@cli.command(short_help="Latency, throughput, cold start and memory of models, side by side.")
@click.argument("models", nargs=-1, required=True, metavar="MODEL|RUN...")
@threads_option()
@click.option("--warmup", type=POS, default=20, help="Warm-up calls per model.")
@click.option("--iters", type=POS, default=200, help="Single-stream rounds.")
@click.option("--duration", type=float, default=0.0, help="Single-stream seconds instead of --iters (0: use --iters).")
@click.option("--batches", type=Ints(), default="1,8,32", help="Offline throughput batch sizes.")
@click.option("--sweep", type=Ints(), default=None, is_flag=False, flag_value=(), show_default="no sweep",
              help="Thread sweep, e.g. --sweep 1,2,4 (bare --sweep: 1, 2, 4 and all cores).")
@click.option("--spinning/--no-spinning", default=True, show_default=True,
              help="ONNX Runtime's worker threads spin between calls (its default, as applications run it); the "
                   "models are then timed in alternating blocks of 20 calls. --no-spinning: call by call.")
@click.option("--formats", type=click.Choice(["onnx", "all"]), default="onnx", show_default=True,
              help="From a run folder, the ONNX files, or all: its OpenVINO IR, ExecuTorch and LiteRT files too "
                   "(`edgexfer export RUN --format openvino,executorch,litert`), each in its own runtime, interleaved "
                   "in one table.")
@click.option("--no-cold-start", is_flag=True, help="Skip the fresh-process cold-start measurement.")
@click.option("--no-reference", is_flag=True, help="Skip the PyTorch and OpenVINO references.")
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end phase: each model's *.e2e.onnx file beside it "
              "(preprocessing in the graph) timed against the model plus Python preprocessing, from a decoded "
              "photo: three more timed candidates per such file, at --iters calls each.")
@json_options("schema edgexfer.bench/1")
@click.option("--markdown", type=click.Path(path_type=Path), default=None, show_default="none",
              help="Write the table as markdown.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, show_default="none",
              help="Write a PNG plot (needs matplotlib).")
@quiet_option
def bench(models, threads, warmup, iters, duration, batches, sweep, spinning, formats, no_cold_start, no_reference,
          no_e2e, json_, json_out, markdown, plot):
    """Benchmark ONNX files (or every ONNX file of run folders), interleaved, with ratios to the first
    model; rows are named RUN/FILE (the folder and the file). Models of different input sizes each get an input
    of their own size. PyTorch eager (from a run folder's checkpoint, when torch is installed) and OpenVINO
    (when installed) are measured beside; the output says why when one is not. Then, for each model with an
    end-to-end file beside it (model.e2e.onnx: preprocessing in the graph), that file against the model plus
    Python preprocessing (--no-e2e skips it). A progress line per step on stderr, with an ETA from the time
    each call took after warm-up."""
    from edgexfer.runtime.bench import BenchConfig, plot as plot_png, run_benchmark, to_markdown

    _json_file_given(json_, models)
    references = () if no_reference else _lent().bench_references()
    cores = os.cpu_count() or 1
    sweep = () if sweep is None else (sweep or tuple(sorted({1, 2, 4, cores} & set(range(1, cores + 1)))))
    cfg = BenchConfig(threads=threads, warmup=warmup, iters=iters, duration=duration, batches=batches, sweep=sweep,
                      cold_start=not no_cold_start, openvino=not no_reference, references=not no_reference,
                      spinning=spinning, e2e=not no_e2e, formats=(formats,))
    with Progress("bench").ticking() as progress:  # the ETA: measured time per call after warm-up (bench.Plan)
        res = run_benchmark(list(models), cfg, references=references, log=progress.log, eta=progress.eta)
    _emit(res, to_markdown(res), plot_png, json_=json_, json_out=json_out, markdown=markdown, plot=plot)


@cli.command(short_help="Classify images; JSON lines or CSV.")
@click.argument("model", metavar="MODEL|RUN", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, metavar="IMAGE|FOLDER...", type=click.Path(path_type=Path))
@click.option("--top-k", type=POS, default=3, help="Classes per image, best first.")
@click.option("--format", "format_", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              help="jsonl: one JSON object per image; csv: a header, then one row per image and class "
                   "(image, task, rank, label, index, score).")
@threads_option()
@click.option("--provider", multiple=True, show_default="CPU",
              help="Execution provider to prefer, e.g. CUDAExecutionProvider (repeatable; CPU is the fallback).")
@image_limit_options
def predict(model, images, top_k, format_, threads, provider, max_image_pixels, max_aspect_ratio):
    """Classify images with an edgexfer ONNX file, or a run folder's chosen file (its INT8 file if present,
    else FP32). A FOLDER means every image file under it, recursively, in sorted order. An image that cannot
    be read is reported on stderr and skipped; the others are still classified, and the exit status is 1 at
    the end when any was skipped."""
    import csv

    from edgexfer.runtime.dataplane import resolve_models
    from edgexfer.runtime.fmt import count
    from edgexfer.runtime.model import EdgeModel
    from edgexfer.runtime.preprocess import IMAGE_SUFFIXES, image_files

    limits = _limits(max_image_pixels, max_aspect_ratio)
    path = next(iter(resolve_models([model]).values()))  # a run folder: its INT8 file if present, else FP32
    files, skipped = [], 0
    for p in images:
        found = image_files(p) if p.is_dir() else [p]
        if not found:
            skipped += 1
            print(f"skipped {p}: no image file in it or its subfolders ({', '.join(sorted(IMAGE_SUFFIXES))})",
                  file=sys.stderr)
        files += found
    m = EdgeModel(path, threads=threads, providers=list(provider) or None, max_image_pixels=limits.max_pixels,
                  max_aspect_ratio=limits.max_aspect)
    writer = None
    if format_ == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["image", "task", "rank", "label", "index", "score"])
    failed = 0
    for img in files:
        try:
            pred = m.predict(img, top_k=top_k)
        except ImageError as e:  # unreadable, undecodable or over the limits: this image only
            if len(files) == 1 and not skipped:  # one image named: its error is the command's
                raise
            skipped, failed = skipped + 1, failed + 1
            print(f"skipped {img}: {_image_reason(e, img)}", file=sys.stderr, flush=True)
            continue
        if writer is None:
            print(json.dumps({"image": str(img), "predictions": pred}), flush=True)
            continue
        per_task = pred if isinstance(pred, dict) else {m.meta.tasks[0].name: pred}
        for task, rows in per_task.items():
            for rank, r in enumerate(rows, 1):
                writer.writerow([str(img), task, rank, r["label"], r["index"], "" if r["score"] is None else r["score"]])
        sys.stdout.flush()
    if skipped:
        raise RuntimeInputError(f"{count(len(files) - failed, 'image')} classified; {skipped} skipped "
                                "(listed above)")


@cli.command(short_help="Serve models over HTTP (Open Inference Protocol v2) and, with --grpc-port, gRPC.")
@click.argument("models", nargs=-1, required=True, metavar="MODEL|RUN...", type=click.Path(path_type=Path))
@click.option("--host", default=lambda: os.environ.get("EDGEXFER_HOST", "127.0.0.1"),
              show_default="$EDGEXFER_HOST, else 127.0.0.1", help="Address to listen on.")
@click.option("--port", type=Port("EDGEXFER_PORT"), default=lambda: os.environ.get("EDGEXFER_PORT", "8000"),
              show_default="$EDGEXFER_PORT, else 8000", help="REST port (0: any free port).")
@click.option("--grpc-port", type=Port("EDGEXFER_GRPC_PORT"), default=lambda: os.environ.get("EDGEXFER_GRPC_PORT") or None,
              show_default="$EDGEXFER_GRPC_PORT, else no gRPC",
              help="Also serve the protocol's gRPC API (inference.GRPCInferenceService) on this port, over the "
                   "same models and batchers (uvicorn server; pip install 'edgexfer[serve]').")
@threads_option("ONNX Runtime intra-op threads per model instance.")
@click.option("--server", type=click.Choice(["auto", "uvicorn", "stdlib"]), default="auto",
              help="uvicorn: uvicorn with dynamic batching and the binary tensor extension "
                   "(pip install 'edgexfer[serve]'); stdlib: the standard library's, no batching; auto: uvicorn "
                   "when installed.")
@click.option("--max-batch-size", type=POS, default=32, help="Dynamic batching: rows per batch (uvicorn server).")
@click.option("--max-queue-delay-ms", type=float, default=2.0,
              help="Dynamic batching: how long a batch waits for more rows (uvicorn server).")
@click.option("--instances", type=POS, default=1,
              help="Copies of each model computing batches side by side, each with --threads threads (uvicorn "
                   "server; Triton's instance count).")
@click.option("--timeout", type=float, default=30.0,
              help="Seconds a request may wait for its answer before 504 (uvicorn server).")
@click.option("--token", default=lambda: os.environ.get("EDGEXFER_TOKEN") or None, show_default="$EDGEXFER_TOKEN, else none",
              help="Require 'Authorization: Bearer TOKEN' on every endpoint but /v2/health/* (and gRPC's "
                   "ServerLive/ServerReady).")
@click.option("--switch-interval-us", type=float, default=None, show_default="20",
              help="The server process's GIL switch interval: how long an inference thread waits for the event "
                   "loop after each batch (uvicorn server).")
@click.option("--no-access-log", "no_access_log", is_flag=True,
              help="No access-log line per request (logger edgexfer.access).")
@image_limit_options
@click.option("--max-inflight-mib", type=POS, default=128,
              help="Request-body MiB the server holds at once, all requests together (REST and gRPC); past it 503 "
                   "with Retry-After (gRPC: RESOURCE_EXHAUSTED).")
@click.option("--header-timeout", type=float, default=10.0,
              help="Seconds a request's line and headers may take to arrive, from the connection's opening or its "
                   "last answer; an idle keep-alive connection closes then (stdlib server).")
def serve(models, host, port, grpc_port, threads, server, max_batch_size, max_queue_delay_ms, instances, timeout,
          token, switch_interval_us, no_access_log, max_image_pixels, max_aspect_ratio, max_inflight_mib,
          header_timeout):
    """Serve run folders or ONNX files over the Open Inference Protocol v2: REST (JSON and binary tensors,
    plus an image endpoint: POST /v2/models/NAME/classify), and gRPC with --grpc-port. Bound to 127.0.0.1
    unless --host says otherwise; drains on SIGTERM."""
    import importlib.util

    from edgexfer.runtime.protocol import MAX_BODY
    from edgexfer.runtime.server import resolve_models

    kind = server
    if kind == "auto":
        kind = "uvicorn" if all(importlib.util.find_spec(m) for m in ("uvicorn", "prometheus_client")) else "stdlib"
    if timeout <= 0 or max_queue_delay_ms < 0 or not header_timeout > 0:
        raise RuntimeInputError("--timeout and --header-timeout must be > 0 and --max-queue-delay-ms >= 0")
    if switch_interval_us is not None and not 1 <= switch_interval_us <= 1e6:
        raise RuntimeInputError(f"--switch-interval-us must be between 1 and 1000000, got {switch_interval_us:g}")
    served = resolve_models(models)
    limits, inflight = _limits(max_image_pixels, max_aspect_ratio), max_inflight_mib * 1024 * 1024
    if inflight < MAX_BODY:
        raise RuntimeInputError(f"--max-inflight-mib must hold one largest body ({MAX_BODY >> 20} MiB)")
    if grpc_port is not None:
        if kind != "uvicorn":
            raise RuntimeInputError("--grpc-port runs beside the batching server: --server uvicorn "
                                    "(pip install 'edgexfer[serve]')")
        if not (importlib.util.find_spec("grpc") and importlib.util.find_spec("google.protobuf")):
            raise RuntimeInputError("--grpc-port needs grpcio and protobuf: pip install 'edgexfer[serve]'")
    if kind == "uvicorn":
        from edgexfer.runtime.oip import BatchConfig, serve as serve_oip

        serve_oip(served, host=host, port=port, threads=threads, token=token, access_log=not no_access_log,
                  batch=BatchConfig(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                                    timeout_s=timeout, instances=instances),
                  switch_interval_us=switch_interval_us, image_limits=limits, max_bytes_in_flight=inflight,
                  grpc_port=grpc_port)
    else:
        from edgexfer.runtime.server import serve as serve_stdlib

        serve_stdlib(served, host=host, port=port, threads=threads, token=token, access_log=not no_access_log,
                     image_limits=limits, max_bytes_in_flight=inflight, head_timeout_s=header_timeout)


@cli.command(short_help="What to copy to a board: model, pinned requirements, runtime, example.")
@click.argument("source", metavar="RUN|MODEL", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier bundle.")
@click.option("--arch", type=click.Choice(["host", "arm64"]), default="host",
              help="The wheels/ it carries, so it installs with no network: host: this interpreter's platform; "
                   "arm64: aarch64 (Python 3.11, manylinux up to glibc 2.36: Debian bookworm).")
@click.option("--no-wheels", is_flag=True, help="Carry no wheels/ (the machine installs the requirements from the "
              "package index); no download here.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino", "executorch", "litert"]), default=None,
              show_default="onnxruntime, or the given file's",
              help="Which of the run's files to ship and the runtime package it needs: onnxruntime (model.onnx, "
                   "model.int8.onnx), openvino (model.xml + .bin, model.int8.xml), executorch (model.pte, "
                   "model.int8.pte) or litert (model.tflite, model.int8.tflite; `edgexfer export RUN --format ...` "
                   "writes them, report.json formats says which may ship).")
@quiet_option
def bundle(source, out, force, arch, no_wheels, runtime):
    """Write OUT: RUN's chosen model (its INT8 file when the accuracy guard passed) or MODEL, pinned
    runtime requirements with their wheels (pip download), the runtime itself and an example program. It
    installs offline: pip install --no-index --find-links wheels -r requirements.txt (OUT/README.md)."""
    from edgexfer.runtime.bundle import bundle as write_bundle

    with Progress("bundle").ticking() as progress:
        r = write_bundle(source, out, force=force, arch=arch, wheels=not no_wheels, log=progress.log,
                         write_e2e=_lent().write_e2e(), runtime=runtime)
    print(f"{r['out']}: {r['model']} ({r['why']}); requirements {', '.join(r['requirements'])}")
    if r.get("warning"):
        print(f"WARNING: {r['warning']}.", file=sys.stderr)
    if r["wheels"]:
        print(f"{len(r['wheels'])} {r['arch']} wheels in {r['out']}/wheels: installs with no network "
              f"(pip install --no-index --find-links wheels -r requirements.txt)")


@cli.command(short_help="`edgexfer bench --json-out` results of several machines in one table and plot.")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--markdown", type=click.Path(path_type=Path), default=None, show_default="none",
              help="Write the table as markdown.")
@json_options("schema edgexfer.compare/1")
@click.option("--plot", type=click.Path(path_type=Path), default=None, show_default="none",
              help="Write a PNG plot (needs matplotlib).")
def compare(results, markdown, json_, json_out, plot):
    """Merge bench results (schema edgexfer.bench/1, from `bench --json-out FILE`) from several machines, keyed by
    the machine info each carries."""
    from edgexfer.runtime.compare import compare as merge, plot as plot_png, to_markdown

    _json_file_given(json_, results)
    doc = merge(list(results))
    _emit(doc, to_markdown(doc), plot_png, json_=json_, json_out=json_out, markdown=markdown, plot=plot)


@cli.command(short_help="Run a model under emulated arm64 and compare it with this host.")
@click.argument("target", metavar="RUN|MODEL", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["arm64"]), required=True, help="The board's architecture.")
@click.option("--samples", type=POS, default=200, help="Images to run (emulation is far slower than the host).")
@click.option("--images", type=click.Path(path_type=Path), default=None, show_default="RUN's test split",
              help="An ImageFolder tree (labelled) or a folder of images; needed for a MODEL file.")
@click.option("--seed", type=int, default=0, help="Sample seed.")
@threads_option("Intra-op threads on both sides.")
@click.option("--min-agreement", type=float, default=0.995, help="Exit 1 below this top-1 agreement.")
@click.option("--formats", default="onnx", show_default=True, metavar="onnx|litert|all",
              callback=lambda ctx, p, v: _formats(v),
              help="From a run folder, its ONNX files, and with litert its LiteRT files too, each run in its own "
                   "runtime on both sides (ai-edge-litert's aarch64 wheel, at this host's version, is installed into "
                   "the emulated board the first time). ExecuTorch and OpenVINO files cannot run there (the one-line "
                   "error says why); all: every file that can, the others listed as not verified.")
@json_options("schema edgexfer.verify/1", out_default="RUN/verify_arm64.json; none for a MODEL")
@quiet_option
def verify(target, arch, samples, images, seed, threads, min_agreement, formats, json_, json_out):
    """Run the runtime install (aarch64 wheels) in an arm64 Debian root filesystem under qemu user-mode
    emulation (needs root; cached in ~/.cache/edgexfer/arm64) on a sample of held-out images: top-1
    agreement with this host, max abs difference of outputs, arm64-measured accuracy. Emulated timing is
    not latency."""
    from edgexfer.runtime import atomic
    from edgexfer.runtime.verify import sample, to_markdown, verify_arm64, verify_inputs

    from edgexfer.runtime.emulate import NOT_ON_BOARD, EmulationUnavailable

    for fmt in (f for f in formats if f in NOT_ON_BOARD):  # asked for by name: refused before anything runs
        raise EmulationUnavailable(f"a {fmt} file cannot be verified under emulated arm64: {NOT_ON_BOARD[fmt]}")
    models, pictures, labels, source, out = verify_inputs(target, images, _lent().held_out(), formats)
    out = json_out or out
    idx = sample(len(pictures), samples, seed)
    pictures = [pictures[i] for i in idx]
    labels = None if labels is None else labels[idx]
    res = verify_arm64(models, pictures, labels, source=f"{source}, {len(idx)} sampled with seed {seed}",
                       threads=threads, min_agreement=min_agreement, leave_out_unverifiable="all" in formats,
                       log=Progress("verify").log)
    print(json.dumps(res, indent=2) if json_ else to_markdown(res))
    if out:
        atomic.write_json(out, res)
        print(f"written: {out}", file=sys.stderr)
    if not res["passed"]:
        print(f"error: top-1 agreement below {min_agreement} for "
              f"{', '.join(n for n, r in res['models'].items() if not r['passed'])}", file=sys.stderr)
        sys.exit(1)


def _formats(value: str) -> tuple[str, ...]:
    """--formats onnx|all|a,b: the formats named, each one the runtime knows."""
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    known = ("onnx", "all", "openvino", "executorch", "litert")
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or repr(value)}: choose from {', '.join(known)}")
    return names


def command_tree(*commands: click.Command, lent: Lent = Lent()) -> Tree:
    """A new command tree: the runtime's commands (this module's `cli`, which stays the runtime alone), then
    `commands`, with `lent` for the runtime's commands. The training package builds the `edgexfer` command
    with it (edgexfer/cli.py)."""
    tree = copy.copy(cli)
    tree.commands = {**cli.commands, **{c.name: c for c in commands}}
    tree.lent = lent
    return tree


def _emit(doc: dict, md: str, write_plot, *, json_: bool, json_out, markdown, plot) -> None:
    """Print the table (with --json: the document instead); write --json-out, --markdown and --plot where asked
    (atomically)."""
    from edgexfer.runtime import atomic

    print(json.dumps(doc, indent=2) if json_ else md)
    if json_out:
        atomic.write_json(json_out, doc)
    if markdown:
        atomic.write_text(markdown, md)
    if plot and not write_plot(doc, plot):
        print("note: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)


def _image_reason(e: ImageError, img: Path) -> str:
    """The error without the path the line already names: "cannot decode image X: cannot identify image file 'X'"
    -> "cannot decode: cannot identify image file"; "image not found: X" -> "image not found"."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = text.replace(f" image {img}:", ":").replace(f" '{img}'", "").replace(f"image {img} ", "image ")
    return text.removesuffix(f": {img}")


def main(argv: Sequence[str] | None = None, *, tree: click.Group | None = None,
         user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run a command of `tree` (default: the runtime's own, `cli`); user mistakes print one line (`error: ...`)
    and exit 1 (usage mistakes 2). `user_errors`: more exception types that are the user's to fix (the training
    package's, for its commands)."""
    user = (FileNotFoundError, MetadataError, ImageError, RuntimeInputError, ModelFileError, *user_errors)
    tree = cli if tree is None else tree
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    try:
        tree.main(args=args, prog_name="edgexfer", standalone_mode=False)
    except click.exceptions.Abort as e:  # Ctrl-C; a command that wrote a run folder says what it keeps
        print(str(e) or "aborted", file=sys.stderr)
        sys.exit(130)
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "edgexfer"
        print(f"error: {e.format_message()} (see {where} --help)", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except user as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk (or quota) wherever it is met: one line naming the path
        from edgexfer.runtime.atomic import disk_full_message, is_disk_full

        if not is_disk_full(e):
            raise
        print(f"error: {disk_full_message(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
