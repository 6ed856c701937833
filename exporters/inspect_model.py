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
from edgexfer.runtime.errors import MetadataError
from edgexfer.runtime.metadata import META_KEY, ModelMeta

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "ConvInteger", "MatMulInteger", "QGemm"}
COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def _dims(t) -> list:
    return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]


def inspect(path: str | Path) -> dict:
    path = Path(path)
    m = onnx.load(str(path))
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
                         f"on {mt.get('n')} {mt.get('split')} images")
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
