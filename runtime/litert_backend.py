"""LiteRT (TensorFlow Lite) `.tflite` files (written by `edgexfer.exporters.litert`) behind the part of ONNX
Runtime's `InferenceSession` interface that `EdgeModel` uses, as `openvino_backend` does for OpenVINO IR.

The metadata is an associated file: a zip archive appended to the flatbuffer, holding `edgexfer_meta.json`. The
interpreter is `ai_edge_litert`'s (`pip install "edgexfer[litert]"`: no TensorFlow, no torch), imported only when
a `.tflite` file is opened; its XNNPACK delegate runs on the CPU.
"""
from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgexfer.runtime.backends import Session
from edgexfer.runtime.errors import MetadataError

META_FILE = "edgexfer_meta.json"
MISSING = 'opening a LiteRT .tflite file needs the ai-edge-litert package (pip install "edgexfer[litert]")'



def read_meta_props(path: Path) -> dict[str, str]:
    """The edgexfer metadata of a .tflite file ({"edgexfer.meta": JSON}), or {} when it carries none."""
    from edgexfer.runtime.metadata import META_KEY

    try:
        with zipfile.ZipFile(path) as z:
            return {META_KEY: z.read(META_FILE).decode("utf-8", errors="replace")}
    except (zipfile.BadZipFile, KeyError):
        return {}


def _scale_zero(detail: dict):
    """(scale, zero point, dtype) of an integer tensor, None for a float one."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return None
    scale, zero = detail.get("quantization") or (0.0, 0)
    if not scale:
        return None
    return float(scale), int(zero), dtype.type


class LiteRTSession(Session):
    """A .tflite file in LiteRT's interpreter (one per thread: an interpreter is not shared between threads), its
    batch resized to each call's."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise MetadataError(MISSING) from None
        self._path, self._threads, self._make = str(path), threads, Interpreter
        try:
            it = self._interpreter()
        except Exception as e:  # LiteRT raises ValueError/RuntimeError with its own text
            raise MetadataError(f"cannot load {path} as a LiteRT model: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
        self._props = read_meta_props(Path(path))
        self.provider = "LiteRT:XNNPACK"
        # a full-integer file (int8 input and output, as MCUs and NPUs take) is fed and read through its own
        # quantization parameters, so it takes and gives float32 as every other file does
        self._in_q = _scale_zero(it.get_input_details()[0])
        self._out_q = [_scale_zero(d) for d in it.get_output_details()]
        self.integer_io = self._in_q is not None
        float_like = ("float32", "int8", "uint8")
        self._inputs = [SimpleNamespace(name=d["name"], type="tensor(float)" if np.dtype(d["dtype"]).name in float_like
                                        else f"tensor({np.dtype(d['dtype']).name})",
                                        shape=[None, *map(int, d["shape"][1:])]) for d in it.get_input_details()]
        self._outputs = [SimpleNamespace(name=d["name"], type="tensor(float)", shape=[None, *map(int, d["shape"][1:])])
                         for d in it.get_output_details()]

    def _interpreter(self):
        local = getattr(self, "_local", None)
        if local is None:
            local = self._local = threading.local()
        it = getattr(local, "it", None)
        if it is None:
            it = local.it = self._make(model_path=self._path, num_threads=self._threads or None)
            it.allocate_tensors()
            local.input = it.get_input_details()[0]["index"]
            local.outputs = [d["index"] for d in it.get_output_details()]
            local.batch = int(it.get_input_details()[0]["shape"][0])
        return it

    def describe(self, meta) -> None:
        """The outputs by the metadata's names, in the model's order (a converted file names its tensors its own
        way): one (N, labels) output per task."""
        self._outputs = [SimpleNamespace(name=t.output, type=o.type, shape=o.shape)
                         for t, o in zip(meta.tasks, self._outputs)]

    def run(self, output_names, feed: dict) -> list:
        it = self._interpreter()
        (x,) = feed.values()
        inp = self._local.input
        if self._local.batch != len(x):
            it.resize_tensor_input(inp, [len(x), *x.shape[1:]])
            it.allocate_tensors()
            self._local.batch = len(x)
        if self._in_q is not None:
            scale, zero, dtype = self._in_q
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        it.set_tensor(inp, np.ascontiguousarray(x))
        it.invoke()
        outs = {}
        for o, index, q in zip(self._outputs, self._local.outputs, self._out_q):
            y = it.get_tensor(index)
            outs[o.name] = ((y.astype(np.float32) - q[1]) * q[0]) if q is not None else y.copy()
        return [outs[n] for n in (output_names or [o.name for o in self._outputs])]
