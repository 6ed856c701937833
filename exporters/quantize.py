"""Static INT8 (QDQ) quantization with ONNX Runtime, calibrated through the artifact's own preprocessing, at
the level of recipes, as optimum's quantizer is (`fit` -> `quantize`):

    cal = calibrate(fp32, images, recipe, workdir)     # pre-processed once, activation ranges computed once
    quantize(fp32, out, cal, recipe_with_exclusions)   # the QDQ file from a recipe + those ranges

plus the targets' recipes (`recipe_for`), FP16 and dynamic INT8, and the finishing of a file another tool
(INC) quantized. Which candidate ships, and how sure that is, is the accuracy guard's (`edgexfer.guard`):
nothing here judges accuracy.

The default recipe is U8S8 (uint8 activations, int8 weights), per-channel weights, reduce_range:
measured on AVX2 CPUs without VNNI it keeps accuracy, where U8S8 without reduce_range saturates and
S8S8 runs slower than FP32. `edgexfer quantize` then evaluates the file that ships with ONNX Runtime.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgexfer.exporters.metadata_io import content_sha256, read_meta, save_model, set_props
from edgexfer.runtime.metadata import ModelMeta

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Recipe:
    format: str = "QDQ"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = True
    calibration_method: str = "minmax"
    calibration_samples: int = 200
    nodes_to_exclude: tuple[str, ...] = ()   # kept in FP32 (e.g. by the accuracy guard)
    extra_options: tuple[tuple[str, object], ...] = ()  # onnxruntime quantize_static extra_options
    preprocess: str = "onnxruntime.quantization.quant_pre_process"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["nodes_to_exclude"] = list(self.nodes_to_exclude)
        d["extra_options"] = dict(self.extra_options)
        return d


class ArrayReader:
    """onnxruntime `CalibrationDataReader`: one method, `get_next() -> dict | None`."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 1):
        # equal-sized batches: ORT's histogram calibrators (entropy, percentile) cannot stack ragged ones
        n = len(x) - len(x) % batch
        self._batches = iter([{input_name: x[i:i + batch]} for i in range(0, n, batch)])

    def get_next(self):
        return next(self._batches, None)

    def __iter__(self):  # qdq_loss_debug.collect_activations iterates instead of calling get_next
        return self._batches


def derived_meta(source: str | Path, quantization: dict) -> ModelMeta:
    """The metadata of a file derived from `source`: the source's labels, input, preprocessing and
    provenance, no metrics (a file's metrics are its own, written by `evaluate` after it scored that
    file), and `quantization` plus where it came from: `source_file` (the source's name; `edgexfer
    inspect` checks it when that file is beside this one) and `source_content_sha256`
    (`metadata_io.content_sha256`: the source less its metrics, so it still matches after `evaluate`
    has written the source's own metrics into it)."""
    return dataclasses.replace(read_meta(source), metrics={}, quantization={
        **quantization, "source_file": Path(source).name, "source_content_sha256": content_sha256(source)})


@dataclass
class Calibration:
    """An FP32 file pre-processed and calibrated once, for every INT8 candidate made from it (optimum's
    `fit` -> `quantize`): `model` is ONNX Runtime's `quant_pre_process` output, `ranges` the activation
    ranges ONNX Runtime computed on the calibration images (its calibration cache, `TensorsData` as JSON),
    `plain` the INT8 file with every weighted layer quantized, made on the way. Candidates differ only in
    the layers they keep in FP32, which the ranges do not depend on. With an ONNX Runtime that cannot
    reuse ranges (no `calibration_cache_path`, before 1.2x), `ranges` is None and each candidate
    calibrates again."""
    source: Path
    model: Path
    ranges: Path | None
    plain: Path
    calib: np.ndarray
    recipe: "Int8Recipe"
    nodes: list[str]
    seconds: float

    def check(self, recipe: "Int8Recipe") -> None:
        """The ranges fit `recipe` only if it calibrates the same way."""
        mine = dataclasses.replace(self.recipe, nodes_to_exclude=())
        theirs = dataclasses.replace(recipe, nodes_to_exclude=())
        if mine != theirs:
            raise ValueError("this calibration was made for another recipe: "
                             f"{mine.to_dict()} vs {theirs.to_dict()}")


def _reuses_ranges() -> bool:
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _quantize_static(model: Path, out: Path, calib: np.ndarray | None, recipe: "Int8Recipe", input_name: str,
                     ranges: Path | None = None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if recipe.calibration_method not in METHODS:
        raise ValueError(f"unknown calibration method {recipe.calibration_method!r}; choose one of {METHODS}")
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.calibration_method]
    kw = {"calibration_cache_path": str(ranges)} if ranges is not None else {}
    reader = None if ranges is not None and ranges.is_file() else \
        ArrayReader(input_name, calib[:recipe.calibration_samples])
    quantize_static(
        str(model), str(out), reader,
        quant_format=QuantFormat.QDQ if recipe.format == "QDQ" else QuantFormat.QOperator,
        per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
        activation_type=qtype[recipe.activation_type], weight_type=qtype[recipe.weight_type],
        calibrate_method=method, nodes_to_exclude=list(recipe.nodes_to_exclude) or None,
        extra_options=dict(recipe.extra_options) or None, **kw)


def _weighted(graph) -> list[str]:
    return [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name]


def calibrate(fp32_path: str | Path, calib: np.ndarray, recipe: "Int8Recipe", workdir: str | Path) -> Calibration:
    """Pre-process `fp32_path` and compute its activation ranges on `calib`, once, into `workdir` (which
    the caller owns and removes): every `quantize(..., calibration, ...)` after it reuses both."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    t0 = time.perf_counter()
    workdir = Path(workdir)
    pre, plain = workdir / "pre.onnx", workdir / "plain.int8.onnx"
    quant_pre_process(str(fp32_path), str(pre))
    ranges = workdir / "ranges.json" if _reuses_ranges() else None
    base = dataclasses.replace(recipe, nodes_to_exclude=())
    _quantize_static(pre, plain, calib, base, read_meta(fp32_path).input.name, ranges)
    return Calibration(Path(fp32_path), pre, ranges, plain, calib, base, _weighted(onnx.load(str(pre)).graph),
                       time.perf_counter() - t0)


def quantize(fp32_path: str | Path, out_path: str | Path, calib: "np.ndarray | Calibration",
             recipe: Int8Recipe = Int8Recipe()) -> dict:
    """Write a static INT8 QDQ copy of `fp32_path` to `out_path`, calibrated on `calib` (N, C, H, W images,
    pre-processed and calibrated here), or on a `Calibration` of it made once (`calibrate`: its ranges
    are reused, only the quantization runs).

    The metadata of the FP32 file is carried over (less its metrics: `derived_meta`) with the recipe
    added under "quantization".
    """
    import shutil

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as td:
        q = Path(td) / "q.onnx"
        if isinstance(calib, Calibration):
            calib.check(recipe)
            if recipe.nodes_to_exclude:
                _quantize_static(calib.model, q, calib.calib, recipe, read_meta(fp32_path).input.name, calib.ranges)
            else:
                shutil.copyfile(calib.plain, q)
            n = len(calib.calib)
        else:
            pre = Path(td) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(pre))
            _quantize_static(pre, q, calib, recipe, read_meta(fp32_path).input.name)
            n = len(calib)
        proto = onnx.load(str(q))
        meta = derived_meta(fp32_path, {**recipe.to_dict(), "calibration_samples": int(min(n, recipe.calibration_samples))})
        save_model(set_props(proto, meta), out_path)
    return {**meta.quantization, "seconds": time.perf_counter() - t0}


quantize_int8 = quantize  # by the name of the other formats' functions (convert_fp16, quantize_dynamic_int8)


def quantizable_nodes(fp32_path: str | Path) -> list[str]:
    """Conv/Gemm/MatMul node names in graph order, as `quantize_static` sees them (after pre-processing)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        return _weighted(onnx.load(str(pre)).graph)


def emulated_logits(x: np.ndarray, *, threads: int = 1) -> Callable[[Path], list[np.ndarray]]:
    """logits(path): every output of the file, in task order, computed by the arm64 runtime (aarch64
    onnxruntime under qemu, see edgexfer.runtime.emulate) on the preprocessed images `x` (N, C, H, W)."""
    from edgexfer.runtime import emulate

    def logits(path) -> list[np.ndarray]:
        out = emulate.run_models([Path(path)], x=x, threads=threads)["outputs"][0]
        return [out[t.name] for t in read_meta(path).tasks]

    return logits


def arm64_emulation_available() -> tuple[bool, str]:
    """Whether the arm64 accuracy can be measured here (emulated root filesystem set up), and why not."""
    from edgexfer.runtime import emulate

    if emulate.native():
        return False, "this host is arm64: its own measurement is faithful"
    if emulate.ready():
        return True, "arm64 root filesystem ready"
    return False, (emulate.missing() or f"the arm64 root filesystem is not set up in {emulate.cache_dir()}") + \
        "; set it up with `make arm64` (as root) to measure arm64 accuracy under emulation"


# -- targets -------------------------------------------------------------------------------------------
# The recipes of optimum's AutoQuantizationConfig presets, for static CNN quantization (QDQ):
# avx2/avx512 with reduce_range (7-bit weights, against VPMADDUBSW saturation on CPUs without VNNI),
# avx512_vnni and arm64 without it (VPDPBUSD / SDOT do not saturate).
TARGETS = {
    "avx2": dict(activation_type="uint8", weight_type="int8", per_channel=True, reduce_range=True),
    "avx512": dict(activation_type="uint8", weight_type="int8", per_channel=True, reduce_range=True),
    "avx512_vnni": dict(activation_type="uint8", weight_type="int8", per_channel=True, reduce_range=False),
    "arm64": dict(activation_type="uint8", weight_type="int8", per_channel=True, reduce_range=False),
}
WHY = {
    "avx2": "U8S8 per-channel with reduce_range: AVX2 without VNNI saturates 8-bit products (VPMADDUBSW); "
            "7-bit weights avoid it. S8S8 measured slower than FP32 here.",
    "avx512": "U8S8 per-channel with reduce_range: AVX-512 without VNNI saturates like AVX2.",
    "avx512_vnni": "U8S8 per-channel, full 8-bit range: VNNI (VPDPBUSD) accumulates without saturation.",
    "arm64": "U8S8 per-channel, full 8-bit range: ARM dot-product kernels do not saturate.",
}


def host_target(flags: set[str] | None = None, arch: str | None = None) -> str:
    """The target that describes this machine's CPU."""
    import platform

    from edgexfer.runtime.machine import cpu_info

    flags = set(cpu_info()["flags"]) if flags is None else flags
    arch = arch or platform.machine()
    if arch in ("aarch64", "arm64"):
        return "arm64"
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def recipe_for(target: str, base: Int8Recipe = Int8Recipe()) -> tuple[Int8Recipe, dict]:
    """The INT8 recipe for `target` (host|avx2|avx512|avx512_vnni|arm64), and whether this host can
    measure its accuracy faithfully."""
    host = host_target()
    resolved = host if target == "host" else target
    if resolved not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose host, {', '.join(TARGETS)}")
    recipe = dataclasses.replace(base, **TARGETS[resolved])
    faithful = recipe.reduce_range or host in ("avx512_vnni", "arm64")
    note = {"target": resolved, "requested": target, "host": host, "why": WHY[resolved],
            "host_measures_faithfully": faithful}
    if not faithful:
        note["warning"] = (f"this {host} host has no VNNI: U8S8 without reduce_range can saturate here, so the "
                           f"accuracy measured on this host understates what a {resolved} device gets; "
                           f"measure it on the device (edgexfer bench / evaluate there)")
    return recipe, note


# -- FP16 and dynamic INT8 ----------------------------------------------------------------------------

def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict:
    """FP16 weights and activations with FP32 inputs and outputs. Halves the file; ONNX Runtime's CPU
    provider computes it in FP32 (casting back), so it is no faster on CPUs — use it for GPU providers."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    t0 = time.perf_counter()
    m16 = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    meta = derived_meta(fp32_path, {
        "format": "fp16", "keep_io_types": True,
        "note": "ONNX Runtime's CPU provider computes FP16 models in FP32: smaller file, same speed on CPU"})
    save_model(set_props(m16, meta), out_path)
    return {**meta.quantization, "seconds": time.perf_counter() - t0}


def quantize_dynamic_int8(fp32_path: str | Path, out_path: str | Path) -> dict:
    """Dynamic INT8 (weights int8, activations quantized at run time). No calibration, but slow for CNNs:
    ONNX Runtime computes each activation's range on every call and quantizes Conv through ConvInteger."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".dynamic-") as td:
        pre, q = Path(td) / "pre.onnx", Path(td) / "q.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_dynamic(str(pre), str(q), weight_type=QuantType.QInt8, per_channel=True)
        meta = derived_meta(fp32_path, {
            "format": "dynamic", "weight_type": "int8", "per_channel": True,
            "note": "activations quantized at run time: slow for CNNs; prefer static INT8"})
        save_model(set_props(onnx.load(str(q)), meta), out_path)
    return {**meta.quantization, "seconds": time.perf_counter() - t0}


def quantize_float_residuals(model) -> int:
    """Give every float Add that reads a tensor another node quantizes that tensor's quantized value instead
    (a DequantizeLinear of the existing QuantizeLinear), when the Add's other inputs are dequantized already.
    INC's QDQ files leave a residual stream in float where two residual Adds follow each other (the first
    Add's output feeds the next Add directly and a QuantizeLinear for the next conv), so ONNX Runtime can
    fuse neither into QLinearAdd and runs both Adds in float between a DequantizeLinear and a
    QuantizeLinear; onnxruntime's own quantizer writes those edges through Q/DQ. Rewrites `model` (an
    onnx.ModelProto) in place; returns how many inputs it rewired."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    dq_of: dict[str, str] = {}
    new_nodes: dict[int, list] = {}  # index of the QuantizeLinear -> the DequantizeLinear to put after it
    rewired = 0
    for i, q in enumerate(g.node):
        if q.op_type != "QuantizeLinear":
            continue
        t = q.input[0]
        for c in consumers.get(t, []):
            if c.op_type != "Add" or c is q:
                continue
            others = [x for x in c.input if x != t]
            if not others or not all(x in producer and producer[x].op_type == "DequantizeLinear" for x in others):
                continue
            if t not in dq_of:
                dq_of[t] = f"{t}_requantized"
                new_nodes[i] = [helper.make_node("DequantizeLinear", [q.output[0], *q.input[1:]], [dq_of[t]],
                                                 name=f"{t}_DequantizeLinear_residual",
                                                 **{a.name: helper.get_attribute_value(a) for a in q.attribute})]
            for k, x in enumerate(c.input):
                if x == t:
                    c.input[k] = dq_of[t]
                    rewired += 1
    if new_nodes:
        nodes = []
        for i, n in enumerate(g.node):
            nodes.append(n)
            nodes += new_nodes.get(i, [])
        del g.node[:]
        g.node.extend(nodes)
    return rewired


def finish_tuned(tuned_path: str | Path, fp32_path: str | Path, out_path: str | Path, recipe: Int8Recipe,
                 tuner: dict, requantize_residuals: bool = True) -> None:
    """Give a file quantized by another tool (INC) the FP32 file's metadata (less its metrics) plus the
    recipe and tuner, with its float residual Adds fed quantized values (`quantize_float_residuals`), as
    onnxruntime's quantizer writes them; the caller scores the result, which is what ships."""
    import onnx

    model = onnx.load(str(tuned_path))
    fixed = quantize_float_residuals(model) if requantize_residuals else 0
    meta = derived_meta(fp32_path, {**recipe.to_dict(), "tuner": tuner.get("tuner"),
                                    **({"residual_adds_requantized": fixed} if fixed else {})})
    save_model(set_props(model, meta), out_path)
