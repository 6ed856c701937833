"""The self-contained ("end-to-end") model file: decoded image in, probabilities and top-k out.

``model.onnx`` takes the preprocessed float32 NCHW tensor, so every application that is not Python
has to re-implement the resize, crop, colour conversion and normalisation from the metadata. The
end-to-end file (``model.e2e.onnx`` beside ``model.onnx``, ``model.int8.e2e.onnx`` beside
``model.int8.onnx``) puts that preprocessing into the graph with standard ONNX operators only
(opset 18; no custom-op library), so any ONNX Runtime binding (C/C++, C#, Java/Kotlin, Swift,
JavaScript in Node.js or the browser, Python) runs it as it is.

The I/O contract (also stored in the file, metadata entry ``edgexfer.e2e``):

input ``image``: uint8, HWC (height, width, channels) as image decoders give it, any height and
    width; batch optional: a rank-4 NHWC tensor of N images of one size also works. Channels: 3 (RGB),
    1 (grey) or 4 (RGBA; alpha is dropped, as Pillow's RGBA->RGB conversion drops it).
outputs ``probabilities`` float32 [N, classes] (softmax of the model's logits; N = 1 for an HWC
    input), ``top_k_indices`` int64 [N, k] and ``top_k_scores`` float32 [N, k], best first (k = min(5,
    classes)). Multi-task models get these three per task, named ``<task>/probabilities`` etc.
metadata ``labels``: the class names, one per line, in index order (the first task's); ``edgexfer.meta``
    is the source file's metadata unchanged (so its preprocessing and input describe the inner model).

In-graph steps, matching `edgexfer.runtime.preprocess` (the Python reference): RGB -> grey with
Pillow's exact integer ITU-R 601-2 weights (grey models only); shorter-side resize to
``preprocessing.resize`` on the uint8 NHWC image (Resize opset 18, antialias=1, half-pixel: ONNX Runtime's
uint8 path computes Pillow's filter in fixed point with a rounded uint8 pass per axis; the longer side
becomes floor(resize * long / short) as in `resize_crop`); centre crop with Python's round-half-even
offsets and channels 0..2 (RGBA -> RGB); grey -> RGB by replication (RGB models); NCHW float32 by one
DequantizeLinear, (x - mean / scale) * (scale / std) (and an Add when mean / scale is no whole number); a
Reshape to the static [N, C, crop, crop]. Pixels match Pillow's but for a few in a thousand one level apart
(ONNX Runtime's resize weights are computed in float, Pillow's in double; tests/test_e2e.py holds pixels and
probabilities against the reference).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgexfer.exporters.errors import ExportError
from edgexfer.exporters.metadata_io import content_sha256, save_model
from edgexfer.runtime.e2e import E2E_KEY, E2E_SCHEMA, INPUT_NAME, LABELS_KEY, e2e_path, meta_key  # noqa: F401
from edgexfer.runtime.metadata import META_KEY, ModelMeta

log = logging.getLogger(__name__)

OPSET = 18
TOP_K = 5
_PREFIX = "e2e_"
_RESIZE_MODES = {"bilinear": ("linear", {}), "bicubic": ("cubic", {"cubic_coeff_a": -0.5}),
                 "nearest": ("nearest", {"nearest_mode": "floor"})}


def _bump_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at default-domain opset >= 18 (Resize's antialias). When no operator of the graph
    changed between its opset and 18 (Conv, Clip, Add, Q/DQ, Gemm ...: the exported backbones), only the
    import is raised; otherwise onnx's version converter rewrites it."""
    imports = {o.domain: o.version for o in model.opset_import}
    old = imports.get("", imports.get("ai.onnx", 0))
    if old >= OPSET:
        return model
    same = True
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            same = (onnx.defs.get_schema(n.op_type, old, "").since_version
                    == onnx.defs.get_schema(n.op_type, OPSET, "").since_version)
        except Exception:  # onnx.defs.SchemaError: an operator onnx does not know
            same = False
        if not same:
            break
    if same:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = OPSET
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, OPSET)
    except Exception as e:
        raise ExportError(f"cannot raise the model to ONNX opset {OPSET} for the end-to-end file: "
                          f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None


def _const(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), _PREFIX + name)


def preprocessing_nodes(meta: ModelMeta, out: str):
    """Nodes and initializers turning the uint8 HWC/NHWC input `image` into the model's float32 NCHW
    input `out`."""
    pp = meta.preprocessing
    if pp.interpolation not in _RESIZE_MODES:
        raise ExportError(f"the end-to-end file supports {sorted(_RESIZE_MODES)} resizing; this model's "
                          f"preprocessing uses {pp.interpolation!r}")
    P = _PREFIX
    nodes, inits = [], []

    def node(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, [P + o for o in outputs], name=P + outputs[0], **attrs))
        return P + outputs[0]

    def const(name, value, dtype):
        inits.append(_const(name, value, dtype))
        return P + name

    # HWC or NHWC -> NHWC: reshape to [-1, H, W, C] from the last three dimensions of the shape.
    shape = node("Shape", [INPUT_NAME], ["shape"])
    hwc = node("Slice", [shape, const("m3", [-3], np.int64), const("big", [2 ** 31], np.int64)], ["hwc"])
    nhwc_shape = node("Concat", [const("minus1", [-1], np.int64), hwc], ["nhwc_shape"], axis=0)
    x = node("Reshape", [INPUT_NAME, nhwc_shape], ["nhwc"])
    ones3 = const("ones3", [1, 1, 1, 3], np.int64)
    if pp.color == "L":  # Pillow: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, exact in float32
        x = node("Slice", [x, const("zero", [0], np.int64), const("three", [3], np.int64), const("axis3", [3], np.int64)],
                 ["rgb_or_grey"])  # RGBA -> RGB
        x = node("Expand", [node("Cast", [x], ["float_in"], to=TensorProto.FLOAT), ones3], ["rgb_in"])
        w = const("grey_weights", np.array([19595, 38470, 7471], np.float32).reshape(1, 1, 1, 3), np.float32)
        x = node("ReduceSum", [node("Mul", [x, w], ["grey_weighted"]), const("axis3r", [3], np.int64)], ["grey_sum"],
                 keepdims=1)
        x = node("Add", [x, const("half", 32768.0, np.float32)], ["grey_rounded"])
        x = node("Floor", [node("Div", [x, const("two16", 65536.0, np.float32)], ["grey_scaled"])], ["grey_f"])
        x = node("Cast", [x], ["grey"], to=TensorProto.UINT8)
    # shorter side -> resize, longer side -> floor(resize * long / short): resize * [h, w] // short gives both
    hw = node("Slice", [shape, const("m3b", [-3], np.int64), const("m1", [-1], np.int64)], ["hw"])
    short = node("ReduceMin", [hw], ["short"], keepdims=1)
    sizes = node("Div", [node("Mul", [const("resize", [pp.resize], np.int64), hw], ["r_hw"]), short], ["sizes"])
    mode, extra = _RESIZE_MODES[pp.interpolation]
    # on uint8 values, NHWC, every channel as it comes (RGBA's alpha is dropped after): ONNX Runtime's
    # antialiased uint8 resize is Pillow's (two fixed-point passes rounded to uint8), and the decoded image
    # needs no copy into float or another layout
    x = node("Resize", [x, "", "", sizes], ["resized"], mode=mode, antialias=1 if mode != "nearest" else 0,
             axes=[1, 2], coordinate_transformation_mode="half_pixel" if mode != "nearest" else "asymmetric", **extra)
    # centre crop, offsets round(margin / 2) half to even like Python's round(): (m + (m // 2) % 2) // 2 in
    # integers; and channels 0..2
    two = const("two_i", [2], np.int64)
    margin = node("Sub", [sizes, const("cc", [pp.crop, pp.crop], np.int64)], ["margin"])
    odd_half = node("Mod", [node("Div", [margin, two], ["half_margin"]), two], ["odd_half"])
    top_left = node("Div", [node("Add", [margin, odd_half], ["margin_even"]), two], ["offset"])
    start = node("Concat", [top_left, const("c0", [0], np.int64)], ["crop_start"], axis=0)
    end = node("Add", [start, const("crop_extent", [pp.crop, pp.crop, 3], np.int64)], ["crop_end"])
    x = node("Slice", [x, start, end, const("axes123", [1, 2, 3], np.int64)], ["cropped"])
    if pp.color == "RGB":  # a grey image -> RGB by replication (commutes with the resize)
        x = node("Expand", [x, ones3], ["rgb"])
    x = node("Transpose", [x], ["nchw_u8"], perm=[0, 3, 1, 2])
    # (x * scale - mean) / std = (x - mean / scale) * (scale / std): one DequantizeLinear per channel from
    # uint8, whose zero point is mean / scale when that is a whole number (EfficientNet-Lite's 127), else 0
    # and an Add of -mean / std
    ch = pp.channels
    a_ = np.float32(pp.scale) / np.asarray(pp.std, np.float32)
    zp = np.asarray(pp.mean, np.float64) / float(pp.scale)
    whole = bool(np.all(np.abs(zp - np.round(zp)) < 1e-6) and np.all((np.round(zp) >= 0) & (np.round(zp) <= 255)))
    zp_ = np.round(zp).astype(np.uint8) if whole else np.zeros(ch, np.uint8)
    x = node("DequantizeLinear", [x, const("norm_a", a_, np.float32), const("norm_zp", zp_, np.uint8)],
             ["scaled"], axis=1)
    if not whole:
        b_ = -np.asarray(pp.mean, np.float32) / np.asarray(pp.std, np.float32)
        x = node("Add", [x, const("norm_b", b_.reshape(1, ch, 1, 1), np.float32)], ["normalized_dyn"])
    nodes.append(helper.make_node("Reshape", [x, const("static_shape", [-1, ch, pp.crop, pp.crop], np.int64)], [out],
                                  name=P + "normalized"))
    return nodes, inits


def build(src: str | Path, top_k: int = TOP_K) -> onnx.ModelProto:
    """The end-to-end model of the edgexfer ONNX file `src` (plain or quantized)."""
    src = Path(src)
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMeta.from_props(props, str(src))
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise ExportError(f"{src}: {len(inputs)} graph inputs, one expected")
    if any("\n" in label for label in meta.labels):
        raise ExportError(f"{src}: a label holds a line break; the end-to-end file's 'labels' entry is one per line")
    model = _bump_opset(model)
    g = model.graph
    old_in = inputs[0].name
    inner = _PREFIX + "normalized_input"
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == old_in:
                n.input[k] = inner
    pre_nodes, pre_inits = preprocessing_nodes(meta, inner)
    post_nodes, outputs, contract = [], [], {}
    single = len(meta.tasks) == 1
    for t in meta.tasks:
        if t.output not in {o.name for o in g.output}:
            raise ExportError(f"{src}: task {t.name!r} names output {t.output!r}, not in the graph")
        k = max(1, min(top_k, len(t.labels)))
        pre = "" if single else f"{t.name}/"
        logits = _PREFIX + f"{t.name}_logits_f32"
        post_nodes.append(helper.make_node("Cast", [t.output], [logits], to=TensorProto.FLOAT, name=logits))
        probs, scores, idx = pre + "probabilities", pre + "top_k_scores", pre + "top_k_indices"
        post_nodes.append(helper.make_node("Softmax", [logits], [probs], axis=-1, name=_PREFIX + probs))
        kname = _PREFIX + f"{t.name}_k"
        pre_inits.append(numpy_helper.from_array(np.array([k], np.int64), kname))
        post_nodes.append(helper.make_node("TopK", [probs, kname], [scores, idx], axis=-1, largest=1, sorted=1,
                                           name=_PREFIX + idx))
        n = len(t.labels)
        outputs += [helper.make_tensor_value_info(probs, TensorProto.FLOAT, ["N", n]),
                    helper.make_tensor_value_info(idx, TensorProto.INT64, ["N", k]),
                    helper.make_tensor_value_info(scores, TensorProto.FLOAT, ["N", k])]
        contract[t.name] = {"probabilities": probs, "top_k_indices": idx, "top_k_scores": scores, "k": k,
                            "classes": n}
    new_nodes = pre_nodes + list(g.node) + post_nodes
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(pre_inits)
    del g.input[:]
    # rank left open: HWC (one image) or NHWC (a batch of one size)
    g.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, None))
    del g.output[:]
    g.output.extend(outputs)
    e2e = {
        "schema": E2E_SCHEMA,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "HWC or NHWC", "channels": [1, 3, 4],
                  "color": "RGB (grey and RGBA also accepted)"},
        "tasks": contract,
        "source_file": src.name,
        "source_meta_sha256": meta_key(props[META_KEY]),
        "source_content_sha256": content_sha256(src),
    }
    keep = [p for p in model.metadata_props if p.key not in (E2E_KEY, LABELS_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=E2E_KEY, value=json.dumps(e2e, sort_keys=True))
    model.metadata_props.add(key=LABELS_KEY, value="\n".join(meta.labels))
    try:
        _check(model)
    except Exception as e:
        raise ExportError(f"{src}: the end-to-end graph does not check: {(str(e).splitlines() or [''])[0][:200]}") from None
    return model


def _check(model: onnx.ModelProto) -> None:
    """onnx's checker, on a copy whose input has a rank (the checker wants one; the file leaves the rank
    open so that HWC and NHWC both load)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.input[0].CopyFrom(helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", "H", "W", "C"]))
    onnx.checker.check_model(probe)


def write(src: str | Path, out: str | Path | None = None, top_k: int = TOP_K) -> Path:
    """Build the end-to-end file of `src` and save it (atomically) at `out` (default: beside it, see
    `e2e_path`)."""
    out = Path(out) if out else e2e_path(src)
    save_model(build(src, top_k), out)
    return out


def write_beside(src: str | Path) -> dict:
    """What the export and quantize stages call after writing `src`: its end-to-end file beside it. A
    model the end-to-end graph cannot express (another resize filter) gets none and a warning; the stage
    goes on. Returns the record for report.json."""
    try:
        out = write(src)
    except (ExportError, ValueError) as e:  # MetadataError is a ValueError
        log.warning("no end-to-end file for %s: %s", Path(src).name, e)
        return {"file": None, "why_not": str(e)}
    return {"file": out.name, "bytes": out.stat().st_size}


def refresh_metrics(src: str | Path) -> bool:
    """Copy `src`'s metadata (its metrics, which `evaluate` writes after the end-to-end file was made) into
    the current end-to-end file beside it, so that applications reading the end-to-end file alone (the web
    page's headline figures) see them. False (nothing written) when there is none, or it is stale."""
    out = e2e_path(src)
    if not out.is_file():
        return False
    raw = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}.get(META_KEY)
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    try:
        current = raw is not None and json.loads(props.get(E2E_KEY, "{}")).get("source_meta_sha256") == meta_key(raw)
    except ValueError:
        current = False
    if not current:
        return False
    for p in model.metadata_props:
        if p.key == META_KEY:
            p.value = raw
    save_model(model, out)
    return True
