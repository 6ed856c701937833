"""OpenVINO IR files (`model.xml` + `model.bin`, written by `edgexfer.exporters.openvino`) behind the small part
of ONNX Runtime's `InferenceSession` interface that `EdgeModel` uses, so an IR file loads, checks its
metadata against its graph, predicts, benchmarks and serves exactly as an ONNX file does.

The edgexfer metadata travels in the IR's `rt_info` (`edgexfer` → `meta`: the same JSON as the ONNX file's
`edgexfer.meta`), with the sha256 of the ONNX file it was converted from (`edgexfer` → `source_sha256`).
The `openvino` package is imported only here, and only when an IR file is opened (`pip install
"edgexfer[openvino]"`).

OpenVINO's CPU plugin may compute in bfloat16 on CPUs that have it (its default `INFERENCE_PRECISION_HINT`);
this backend asks for f32 (`precision="f32"`), so an FP32 file answers as the ONNX file does and an INT8
file's non-quantized layers stay FP32, as ONNX Runtime computes them.
"""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from edgexfer.runtime.backends import Session
from edgexfer.runtime.errors import MetadataError

RT_INFO = "edgexfer"  # rt_info section: "meta" (the metadata JSON), "source_sha256", "source"
MISSING = 'opening an OpenVINO IR file needs the openvino package (pip install "edgexfer[openvino]")'


def openvino():
    """The openvino module, or a one-line error naming the extra that brings it."""
    try:
        import openvino as ov
    except ImportError:
        raise MetadataError(MISSING) from None
    return ov


def config(threads: int | None, precision: str = "f32") -> dict:
    """The CPU plugin's settings: the thread count, latency first, and the precision (f32: as ONNX Runtime)."""
    c = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        c["INFERENCE_NUM_THREADS"] = int(threads)
    return c


def rt_props(model) -> dict[str, str]:
    """The edgexfer rt_info of a read `openvino.Model` as ONNX-style metadata props ({"edgexfer.meta": JSON})."""
    from edgexfer.runtime.metadata import META_KEY

    if not model.has_rt_info([RT_INFO, "meta"]):
        return {}
    return {META_KEY: str(model.get_rt_info([RT_INFO, "meta"]).astype(str))}


def _tensor_type(element_type) -> str:
    return {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)",
            "u8": "tensor(uint8)", "i8": "tensor(int8)", "i64": "tensor(int64)"}.get(
        element_type.get_type_name(), f"tensor({element_type.get_type_name()})")


def _shape(port) -> list:
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


class OpenVINOSession(Session):
    """An IR file compiled for a device (CPU), with `get_inputs`, `get_outputs`, `get_modelmeta`, `run` and
    `get_providers` as `onnxruntime.InferenceSession` has them. Each `run` uses an infer request of its own
    thread, so the servers' threads may share one session."""

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "f32",
                 device: str = "CPU"):
        ov = openvino()
        path = Path(path)
        if not path.with_suffix(".bin").is_file():
            raise MetadataError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing beside it")
        try:
            model = ov.Core().read_model(str(path))
            self._compiled = ov.Core().compile_model(model, device, config(threads, precision))
        except Exception as e:  # openvino raises its own RuntimeError subclasses, "Exception from FILE:LINE:" first
            said = [ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.startswith("Exception from ")]
            raise MetadataError(f"cannot load {path} as an OpenVINO IR model: "
                                f"{(said or [type(e).__name__])[0][:300]}") from None
        self._props = rt_props(model)
        self._device = device
        self._local = threading.local()
        self.provider = f"OpenVINO:{device}"
        self._inputs = [SimpleNamespace(name=p.get_any_name(), type=_tensor_type(p.get_element_type()), shape=_shape(p))
                        for p in model.inputs]
        self._outputs = [SimpleNamespace(name=p.get_any_name(), type=_tensor_type(p.get_element_type()),
                                         shape=_shape(p)) for p in model.outputs]
        self._out_index = {o.name: i for i, o in enumerate(self._outputs)}

    def run(self, output_names, feed: dict) -> list:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self._compiled.create_infer_request()
        (x,) = feed.values()
        res = req.infer({0: x})
        outs = [res[self._compiled.output(i)] for i in range(len(self._outputs))]
        names = output_names or [o.name for o in self._outputs]
        return [outs[self._out_index[n]].copy() for n in names]
