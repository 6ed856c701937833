"""Static INT8 (QDQ) quantization with ONNX Runtime, calibrated through the artifact's own preprocessing.

The default recipe is U8S8 (uint8 activations, int8 weights), per-channel weights, reduce_range:
measured on AVX2 CPUs without VNNI it keeps accuracy, where U8S8 without reduce_range saturates and
S8S8 runs slower than FP32. `edgexfer quantize` then evaluates the file that ships with ONNX Runtime.
"""
from __future__ import annotations

import dataclasses
import os
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


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray,
                  recipe: Int8Recipe = Int8Recipe()) -> dict:
    """Write a static INT8 QDQ copy of `fp32_path` to `out_path`, calibrated on `calib` (N, C, H, W).

    The metadata of the FP32 file is carried over (less its metrics: `derived_meta`) with the recipe
    added under "quantization".
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    if recipe.calibration_method not in METHODS:
        raise ValueError(f"unknown calibration method {recipe.calibration_method!r}; choose one of {METHODS}")
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.calibration_method]
    meta = read_meta(fp32_path)
    out_path = Path(out_path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as td:
        pre, q = Path(td) / "pre.onnx", Path(td) / "q.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre), str(q), ArrayReader(meta.input.name, calib[:recipe.calibration_samples]),
            quant_format=QuantFormat.QDQ if recipe.format == "QDQ" else QuantFormat.QOperator,
            per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
            activation_type=qtype[recipe.activation_type], weight_type=qtype[recipe.weight_type],
            calibrate_method=method, nodes_to_exclude=list(recipe.nodes_to_exclude) or None,
            extra_options=dict(recipe.extra_options) or None,
        )
        proto = onnx.load(str(q))
        meta = derived_meta(fp32_path, {**recipe.to_dict(),
                                        "calibration_samples": int(min(len(calib), recipe.calibration_samples))})
        save_model(set_props(proto, meta), out_path)
    return {**meta.quantization, "seconds": time.perf_counter() - t0}



def quantizable_nodes(fp32_path: str | Path) -> list[str]:
    """Conv/Gemm/MatMul node names in graph order, as `quantize_static` sees them (after pre-processing)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        g = onnx.load(str(pre)).graph
    return [n.name for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name]


# -- how sure the guard is -----------------------------------------------------------------------------
# The guard decides on INT8/FP32 top-1 agreement over many images, not on labelled accuracy over a few:
# where INT8 gives FP32's top-1 it scores what FP32 scores, so each disagreement costs at most one correct
# answer, and an accuracy drop cannot exceed the disagreement rate. Labelled validation accuracy is
# measured beside it, and only a significant drop (below) overrules agreement.

SIGNIFICANT_SE = 2.0  # a labelled drop counts as evidence past max_drop by this many standard errors


def wilson_upper(rate: float, n: int, z: float = 1.96) -> float:
    """The upper end of the Wilson score interval (95% for z=1.96) of a proportion `rate` seen on `n`
    trials: with 0 of 1000 images disagreeing it is 0.38%, not 0."""
    if n <= 0:
        return 1.0
    d = 1 + z * z / n
    c = rate + z * z / (2 * n)
    h = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return float(min(1.0, (c + h) / d))


def paired_drop(ref: list[np.ndarray], cand: list[np.ndarray], y: np.ndarray) -> tuple[float, float]:
    """FP32 accuracy minus the candidate's on the same labelled images (averaged over tasks, each over its
    labelled images; -1: unlabelled), and the standard error of that paired difference. Per image the
    difference d = correct(candidate) - correct(FP32) is -1, 0 or +1; its binomial variance over n images
    is (b + c)/n - ((c - b)/n)^2 for b losses and c gains, so the standard error is sqrt(that / n): one
    flip on 4 images is a 25-point drop with a 22-point standard error."""
    y2 = y[:, None] if y.ndim == 1 else y
    drops, var = [], 0.0
    for t, (r, c) in enumerate(zip(ref, cand)):
        m = y2[:, t] >= 0
        if not m.any():
            continue
        d = (c[m].argmax(1) == y2[m, t]).astype(np.float64) - (r[m].argmax(1) == y2[m, t])
        drops.append(-float(d.mean()))
        var += float(d.var()) / len(d)
    if not drops:
        return 0.0, 0.0
    return float(np.mean(drops)), float(np.sqrt(var) / len(drops))


def guard_decision(disagreement: float, max_drop: float, val_drop: float | None = None,
                   val_drop_se: float | None = None) -> tuple[bool, str]:
    """Whether an INT8 candidate ships, and why, from its top-1 disagreement rate with FP32 on the
    agreement set and (optionally) its labelled validation drop with that drop's standard error.

    It passes when the disagreement rate is within `max_drop`: the accuracy drop cannot be larger, on
    images like those of the set. Labelled validation can still reject it, but only on evidence: a drop
    beyond `max_drop` by more than SIGNIFICANT_SE (2) standard errors of the paired difference (about a
    one-sided 2.5% test). On a 4-image split one flipped image is a 25-point drop with a ~22-point standard
    error: noise, not a reason to throw INT8 away; on 30 images, 10 losses and no gains are evidence
    (33 points with a 9-point standard error), though agreement on the whole set may look fine when the
    augmented views outnumber the real images.
    """
    if disagreement > max_drop + 1e-9:  # one image at the bound is in
        return False, f"disagrees with FP32 on {disagreement:.2%} of the agreement set, over {max_drop:.2%}"
    if val_drop is not None and val_drop > max_drop + SIGNIFICANT_SE * (val_drop_se or 0.0) + 1e-9:
        return False, (f"validation drop {val_drop:+.2%} is beyond {max_drop:.2%} by more than "
                       f"{SIGNIFICANT_SE:g} standard errors ({val_drop_se:.2%})")
    return True, f"disagrees with FP32 on {disagreement:.2%} of the agreement set, within {max_drop:.2%}"


def guarded_quantize(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, recipe: Int8Recipe, *,
                     accuracy: Callable[[Path], float], fp32_accuracy: float, max_drop: float,
                     steps: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 10**6),
                     also: dict[str, Callable[[Path], float]] | None = None, measured_on: str = "this host",
                     at_least: tuple[str, Callable[[Path], float], float] | None = None,
                     evidence: Callable[[Path], dict] | None = None) -> dict:
    """Static INT8 under an accuracy bound: keep the first k weighted layers in FP32 until it holds.

    Early layers see raw pixels and are, in CNNs, the most sensitive to 8-bit activations (measured
    on the demo: leaving the stem and first four blocks of EfficientNet-Lite0 in FP32 took the INT8
    drop from 1.4 to -0.5 points). `accuracy(path)` scores a candidate file with ONNX Runtime on a
    guard set: the pipeline passes top-1 agreement with FP32 on its agreement set (FP32 scores 1.0 on
    it, so `drop` is the disagreement rate; see `guard_decision`), the arm64 guard labelled accuracy on
    a validation sample. The first candidate within `max_drop` of `fp32_accuracy` is written to
    `out_path`. If none is, the most accurate one is written and `within_bound` is False.

    `measured_on` says where `accuracy` runs (e.g. "arm64 (emulated)" scoring `emulated_logits`); each
    function of `also` is recorded beside it for every candidate (e.g. this host's accuracy), never decides.
    `at_least` = (name, score, minimum) is a second bound a candidate must also meet (e.g. INT8/FP32 top-1
    agreement on unlabelled target-domain images, where no labels exist to score accuracy).
    `evidence(path)` returns labelled validation figures recorded in the candidate's row ("val_drop" and
    "val_drop_se" among them); they reject a candidate only when `guard_decision` finds the drop significant.
    """
    nodes = quantizable_nodes(fp32_path)
    out_path = Path(out_path)
    tried, best = [], None
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".guard-") as td:
        for k in sorted({min(s, len(nodes)) for s in steps}):
            cand = dataclasses.replace(recipe, nodes_to_exclude=tuple(nodes[:k]))
            path = Path(td) / f"k{k}.onnx"
            info = quantize_int8(fp32_path, path, calib, cand)
            acc = accuracy(path)
            row = {"fp32_layers": k, "guard_accuracy": acc, "drop": fp32_accuracy - acc,
                   "within_bound": fp32_accuracy - acc <= max_drop + 1e-9,  # one image at the bound is in
                   "seconds": info["seconds"]}
            row.update({k: f(path) for k, f in (also or {}).items()})
            if evidence is not None:
                row.update(evidence(path))
                row["within_bound"], row["decision"] = guard_decision(row["drop"], max_drop, row.get("val_drop"),
                                                                      row.get("val_drop_se"))
            if at_least is not None:
                row[at_least[0]] = at_least[1](path)
                row["within_bound"] = row["within_bound"] and row[at_least[0]] >= at_least[2] - 1e-9
            tried.append(row)
            if best is None or acc > best[0]["guard_accuracy"]:
                best = (row, path, cand)
            if row["within_bound"]:
                best = (row, path, cand)
                break
        row, path, cand = best
        os.replace(path, out_path)
    return {**read_meta(out_path).quantization, "guard": {
        "fp32_accuracy": fp32_accuracy, "max_accuracy_drop": max_drop, "candidates": tried,
        "chosen_fp32_layers": row["fp32_layers"], "layers_kept_fp32": list(cand.nodes_to_exclude),
        "shipped_accuracy": row["guard_accuracy"], "measured_on": measured_on,
        "within_bound": row["within_bound"], "quantizable_layers": len(nodes),
        **({"at_least": {at_least[0]: at_least[2]}} if at_least else {})}}


# Emulation runs ~250x slower than the host: the arm64 guard scores a seeded sample of the validation split.
ARM64_GUARD_SAMPLES = int(os.environ.get("EDGEXFER_ARM64_GUARD_SAMPLES", "100"))


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


def finish_tuned(tuned_path: str | Path, fp32_path: str | Path, out_path: str | Path, recipe: Int8Recipe,
                 tuner: dict) -> None:
    """Give a file quantized by another tool (INC) the FP32 file's metadata (less its metrics) plus the
    recipe and tuner."""
    import onnx

    meta = derived_meta(fp32_path, {**recipe.to_dict(), "tuner": tuner.get("tuner")})
    save_model(set_props(onnx.load(str(tuned_path)), meta), out_path)
