"""`edgexfer inspect MODEL`: what is inside an ONNX file — metadata, opset, tensors, size, operators.

Operators are counted as quantized (QuantizeLinear/DequantizeLinear, QLinear*, *Integer) or float, and
weights by storage type, so a half-quantized graph (float Conv between Q/DQ pairs) is plain to see.
For a derived file (INT8, FP16, dynamic) whose source file lies beside it, whether the source hash it
recorded still matches that file (`source_check`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from edgexfer.runtime import fmt
from edgexfer.runtime.errors import MetadataError, ModelFileError
from edgexfer.runtime.metadata import META_KEY, ModelMeta

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger", "QGemm"}
COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def _dims(t) -> list:
    return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]


def load_model(path: Path) -> onnx.ModelProto:
    """The ONNX file at `path`, its external data left unread (inspect reads shapes and types only).
    ModelFileError, one line, for a file that is empty, not ONNX, truncated, or whose external data lies
    outside its folder, is missing, or is shorter than the tensor says: a hostile file is refused, not read."""
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): not an ONNX model")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001  protobuf's DecodeError and friends: whatever it is, not a model
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelFileError(f"{path} is not a readable ONNX model (truncated or corrupt: {why})") from None
    if m.ir_version < 1 or not m.opset_import or not m.graph.output:
        raise ModelFileError(f"{path} is not a readable ONNX model (no IR version, opset or graph output: "
                             "truncated, or another kind of file)")
    check_external_data(m, path)
    return m


def check_external_data(m: onnx.ModelProto, path: Path) -> None:
    """ModelFileError unless every tensor kept outside the file lies in a file inside the model's folder,
    long enough for it (ONNX's own loader would read any path the file names)."""
    from onnx.external_data_helper import _get_all_tensors

    folder = path.parent.resolve()
    for t in _get_all_tensors(m):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = (folder / loc).resolve()
        if not loc or Path(loc).is_absolute() or (where != folder and folder not in where.parents):
            raise ModelFileError(f"{path}: tensor {t.name!r} keeps its data in {loc!r}, outside the model's folder; "
                                 "refusing to read it")
        if not where.is_file():
            raise ModelFileError(f"{path}: tensor {t.name!r} keeps its data in {loc!r}, which is not beside it")
        try:
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        except ValueError:
            raise ModelFileError(f"{path}: tensor {t.name!r} has a malformed external-data offset or length") from None
        if end > where.stat().st_size:
            raise ModelFileError(f"{path}: tensor {t.name!r} needs bytes up to {end} of {loc!r}, which holds "
                                 f"{where.stat().st_size} (truncated)")


def inspect(path: str | Path) -> dict:
    path = Path(path)
    m = load_model(path)
    props = {p.key: p.value for p in m.metadata_props}
    try:
        meta = ModelMeta.from_props(props, str(path)).to_dict()
    except MetadataError as e:
        meta = {"error": str(e)}
    ops = Counter(n.op_type for n in m.graph.node)
    # a weighted op is "quantized" when its weight input comes through DequantizeLinear (QDQ) or it is
    # an integer op itself (QOperator)
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_compute = [n.name for n in m.graph.node if n.op_type in COMPUTE_OPS
                     and not (len(n.input) > 1 and n.input[1] in dq_out)]
    quant_compute = sum(1 for n in m.graph.node if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in dq_out)
    quant_compute += sum(ops[o] for o in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"))
    weights = Counter()
    for t in m.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        weights[onnx.TensorProto.DataType.Name(t.data_type).lower()] += n
    return {
        "file": str(path), "size_bytes": path.stat().st_size,
        "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import
                  if not o.domain or o.domain in {n.domain for n in m.graph.node}},  # the domains in use
        "ir_version": m.ir_version, "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "inputs": [{"name": t.name, "shape": _dims(t), "dtype": onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type)}
                   for t in m.graph.input if t.name not in {i.name for i in m.graph.initializer}],
        "outputs": [{"name": t.name, "shape": _dims(t), "dtype": onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type)}
                    for t in m.graph.output],
        "nodes": sum(ops.values()),
        "operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "weighted_ops": {"quantized": quant_compute, "float": len(float_compute), "float_names": float_compute},
        "quant_nodes": sum(ops[o] for o in QUANT_OPS if o in ops),
        "weight_elements_by_type": dict(weights),
        "metadata": meta,
        "has_edgexfer_metadata": META_KEY in props,
        "source_check": source_check(path, meta.get("quantization")),
    }


def source_check(path: Path, q: dict | None) -> dict | None:
    """Whether a derived file's recorded source hash matches its source file, when that file is beside it:
    {"file", "status": "matches" | "differs" | "not found" | "no hash recorded", "recorded", "actual"}.
    `source_content_sha256` (edgexfer >= this change) is compared with `metadata_io.content_sha256`, the
    source less its metrics; files made before it recorded `source_sha256`, the source's bytes, which
    `evaluate` changed by writing the source's metrics into it (so an older file can read "differs" although
    only the metrics changed). None for a file with no quantization record (not derived)."""
    if not q:
        return None
    from edgexfer.exporters.metadata_io import content_sha256
    from edgexfer.runtime.atomic import sha256_file

    name = q.get("source_file") or "model.onnx"  # older files did not record the name: a run folder's FP32 file
    src = path.parent / name
    out = {"file": name}
    if "source_content_sha256" in q:
        recorded, how, hash_of = q["source_content_sha256"], content_sha256, "content less metrics"
    elif "source_sha256" in q:
        recorded, how, hash_of = q["source_sha256"], sha256_file, "file bytes"
    else:
        return {**out, "status": "no hash recorded"}
    out.update(recorded=recorded, hash_of=hash_of)
    if not src.is_file() or src.resolve() == path.resolve():
        return {**out, "status": "not found"}
    try:
        actual = how(src)
    except Exception as e:  # noqa: BLE001  a broken source file is a finding, not a crash of inspect
        return {**out, "status": f"unreadable ({type(e).__name__})"}
    return {**out, "actual": actual, "status": "matches" if actual == recorded else "differs"}


def _floats(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def format_text(info: dict) -> str:
    meta = info["metadata"]
    w = info["weighted_ops"]
    lines = [
        f"{info['file']}  ({info['size_bytes'] / 1e6:.2f} MB, opset {info['opset']}, IR {info['ir_version']}, {info['producer']})",
        "inputs:  " + ", ".join(f"{t['name']} {t['dtype']} {t['shape']}" for t in info["inputs"]),
        "outputs: " + ", ".join(f"{t['name']} {t['dtype']} {t['shape']}" for t in info["outputs"]),
        f"nodes: {info['nodes']}; weighted ops: {w['quantized']} quantized, {w['float']} float; "
        f"{info['quant_nodes']} quantization nodes",
        "operators: " + ", ".join(f"{k} {v}" for k, v in info["operators"].items()),
        "weights: " + ", ".join(f"{k} {v:,}" for k, v in info["weight_elements_by_type"].items()),
    ]
    if "error" in meta:
        lines.append(f"metadata: none ({meta['error']})")
    else:
        pp, prov = meta["preprocessing"], meta["provenance"]
        lines += [
            "labels: " + ", ".join(meta["labels"]),
            f"preprocessing: {pp['color']}, resize {pp['resize']} ({pp['interpolation']}), crop {pp['crop']}, "
            f"scale {pp['scale']:.6g}, mean {_floats(pp['mean'])}, std {_floats(pp['std'])}",
            f"provenance: {prov.get('backbone')} ({prov.get('weights')} weights), edgexfer {prov.get('edgexfer_version')}, "
            f"checkpoint {str(prov.get('checkpoint_sha256'))[:12]}…, {prov.get('created')}",
        ]
        if meta.get("metrics"):
            mt = meta["metrics"]
            lines.append(f"metrics: accuracy {fmt.accuracy(mt.get('accuracy'))}, macro-F1 {fmt.accuracy(mt.get('macro_f1'))} "
                         f"on {fmt.count(mt.get('n'), str(mt.get('split')) + ' image')}")
        q = meta.get("quantization")
        if q:
            lines.append("quantization: " + ", ".join(f"{k}={v}" for k, v in q.items()
                                                      if k not in ("nodes_to_exclude", "extra_options",
                                                                   "source_content_sha256", "source_sha256")))
            if q.get("nodes_to_exclude"):
                lines.append(f"kept in FP32: {len(q['nodes_to_exclude'])} layers ({', '.join(q['nodes_to_exclude'][:4])}…)")
        sc = info.get("source_check")
        if sc and sc["status"] == "differs" and sc.get("hash_of") == "file bytes":  # made before content hashes
            lines.append(f"source: {sc['file']} beside it differs from the recorded sha256 of its bytes; this file "
                         "predates source_content_sha256, and evaluate rewrites the source's bytes when it writes "
                         "metrics, so a mismatch proves nothing either way; quantize again to record a hash that "
                         "can be checked")
        elif sc:
            lines.append("source: " + {
                "matches": f"{sc['file']} beside it matches the recorded sha256 {sc['recorded'][:12]}… "
                           f"({sc['hash_of']})",
                "differs": f"{sc['file']} beside it DOES NOT MATCH the recorded sha256 ({sc['hash_of']}): it changed "
                           "after this file was derived from it; derive this file again",
                "not found": f"{sc['file']} is not beside it: the recorded sha256 is not checked",
                "no hash recorded": "no source hash recorded",
            }.get(sc["status"], f"{sc['file']}: {sc['status']}"))
    return "\n".join(lines)
