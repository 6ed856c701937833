"""Which weighted layers INT8 hurts most, and what keeping each in FP32 costs: the guard's fallback order.

Two measured rankings, on a few hundred label-free images (`rank`; the guard gives it up to
`QuantizeConfig.rank_images` of the calibration images):

- "revert" (NNCF accuracy control's): for each weighted layer, the INT8 file with only that layer kept
  in FP32; its harm is how much of plain INT8's output error (the logits' normalized squared error
  against FP32, summed over tasks) that removes. Each such file is the plain QDQ graph with that
  layer's inputs read before quantization and its FP32 weights put back (`revert_one`), not a new
  quantization.
- "qdq" (ONNX Runtime's `qdq_loss_debug`): the quantization noise each layer adds where it is, the
  noise-to-signal ratio of its quantized input activation plus that of its weights, from one run of
  the FP32 and plain INT8 files with every intermediate tensor as an output. Cheap, but blind to how
  much of the noise reaches the output.

The cost of keeping a layer in FP32 is estimated from its multiply-accumulates: its share of the
weighted layers' MACs times the measured latency INT8 saves over FP32 (plain INT8 against FP32, batch 1,
interleaved); it leaves out the quantize/dequantize boundaries each kept layer adds, so it flatters
scattered layers. `candidates` turns a ranking into the guard's candidates: the top k of the harm ranking,
of the harm per millisecond and of graph order, cheapest first.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("revert", "qdq")


def _logits(path: Path, x: np.ndarray, threads: int | None) -> list[np.ndarray]:
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads or 1),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + 32]}) for i in range(0, len(x), 32)]
    return [np.concatenate([o[t] for o in outs]).astype(np.float64) for t in range(len(outs[0]))]


def output_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """Squared error of the outputs against FP32's over FP32's own energy, summed over outputs."""
    return float(sum(((o - r) ** 2).sum() / max((r ** 2).sum(), 1e-12) for r, o in zip(ref, out)))


def layer_macs(model_path: Path) -> dict[str, int]:
    """Multiply-accumulates per weighted node of a shape-inferred ONNX file, at batch 1."""
    import onnx

    m = onnx.load(str(model_path))
    g = m.graph
    shapes = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    inits = {t.name: list(t.dims) for t in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or not n.name:
            continue
        w = inits.get(n.input[1])
        o = shapes.get(n.output[0])
        if w is None or not o:
            out[n.name] = 0
            continue
        if n.op_type == "Conv":  # [N, Cout, H, W...] x Cin/g * k
            out[n.name] = int(np.prod(o[1:]) * np.prod(w[1:]))
        else:  # [.., M, N] from K: output elements x K
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = w[1] if trans_b else w[0]
            out[n.name] = int(np.prod(o[1:] if len(o) > 1 else o) * k)
    return out


def _latency(paths: dict[str, Path], shape, threads: int | None, iters: int = 40) -> dict[str, float]:
    from edgexfer.runtime.bench import interleaved, onnx_candidate

    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    lat = interleaved([onnx_candidate(k, p, threads or 1) for k, p in paths.items()], x, warmup=5, iters=iters)
    return {k: v["p50"] for k, v in lat.items()}


def _logits_of(model, x: np.ndarray, threads: int | None) -> list[np.ndarray]:
    """`_logits` of an in-memory ModelProto."""
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads or 1),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + 32]}) for i in range(0, len(x), 32)]
    return [np.concatenate([o[t] for o in outs]).astype(np.float64) for t in range(len(outs[0]))]


def revert_one(plain, floats: dict, node_name: str, fproducers: dict | None = None):
    """A copy of the plain QDQ ModelProto with `node_name` computed in FP32: its activation input read
    before its QuantizeLinear (with the Relu/Clip the quantizer folded into that range put back, from
    `fproducers`: tensor -> node of the FP32 graph), its weight and bias from the FP32 initializers and
    constants `floats` (name -> TensorProto of the pre-processed FP32 file). The same as quantizing with that node excluded, without the 2 s of
    re-quantization per layer; None when the graph is not shaped as expected."""
    import onnx
    import onnx.helper

    fproducers = fproducers or {}
    m = onnx.ModelProto()
    m.CopyFrom(plain)
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    node = next((n for n in g.node if n.name == node_name), None)
    if node is None:
        return None
    for i, name in enumerate(list(node.input)):
        dq = prod.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        src = prod.get(dq.input[0])
        if src is not None and src.op_type == "QuantizeLinear":  # an activation: read it unquantized
            act = src.input[0]
            fnode, pnode = fproducers.get(act), prod.get(act)
            if fnode is not None and fnode.op_type in ("Relu", "Clip") and (pnode is None or pnode.op_type != fnode.op_type):
                # the quantizer folded this activation into the quantization range: apply it again
                extra = []
                for j, c in enumerate(fnode.input[1:], start=1):
                    if not c:
                        extra.append("")
                        continue
                    if c not in floats:
                        return None
                    t = onnx.TensorProto()
                    t.CopyFrom(floats[c])
                    t.name = f"{node_name}_kept_{fnode.op_type}_{j}"
                    g.initializer.append(t)
                    extra.append(t.name)
                out = f"{act}_kept_fp32"
                g.node.append(onnx.helper.make_node(fnode.op_type, [act, *extra], [out], name=f"{node_name}_kept_act"))
                act = out
            node.input[i] = act
            continue
        original = dq.input[0][:-len("_quantized")] if dq.input[0].endswith("_quantized") else None
        if original is None or original not in floats:
            return None
        t = onnx.TensorProto()
        t.CopyFrom(floats[original])
        t.name = original + "_fp32_kept"
        g.initializer.append(t)
        node.input[i] = t.name
    return m


def float_graph(path: Path) -> tuple[dict, dict]:
    """The FP32 file's initializers and Constant node values (name -> TensorProto), and its producers
    (tensor -> node): what `revert_one` puts back."""
    import onnx

    g = onnx.load(str(path)).graph
    floats = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            v = next((a.t for a in n.attribute if a.name == "value"), None)
            if v is not None:
                floats[n.output[0]] = v
    return floats, {o: n for n in g.node for o in n.output}


def _revert_harm(cal, x, threads) -> dict[str, float]:
    import dataclasses

    import onnx

    from edgexfer.exporters.quantize import quantize

    ref = _logits(cal.model, x, threads)
    e0 = output_error(ref, _logits(cal.plain, x, threads))
    plain = onnx.load(str(cal.plain))
    floats, fproducers = float_graph(cal.model)
    harm = {}
    with tempfile.TemporaryDirectory(dir=cal.plain.parent, prefix=".revert-") as td:
        for i, n in enumerate(cal.nodes):
            m = revert_one(plain, floats, n, fproducers)
            if m is not None:
                harm[n] = e0 - output_error(ref, _logits_of(m, x, threads))
                continue
            p = Path(td) / f"r{i}.onnx"  # not the expected QDQ shape: quantize with the layer excluded
            quantize(cal.source, p, cal, dataclasses.replace(cal.recipe, nodes_to_exclude=(n,)))
            harm[n] = e0 - output_error(ref, _logits(p, x, threads))
            p.unlink()
    return harm


def _nsr(a, b) -> float:
    """Noise-to-signal power of `b` against `a` (concatenated over images)."""
    a = np.concatenate([np.asarray(t, np.float64).ravel() for t in a])
    b = np.concatenate([np.asarray(t, np.float64).ravel() for t in b])
    return float(((a - b) ** 2).sum() / max((a ** 2).sum(), 1e-12))


def _qdq_harm(cal, x, threads) -> dict[str, float]:
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                          create_weight_matching,
                                                          modify_model_output_intermediate_tensors)

    from edgexfer.exporters.quantize import ArrayReader

    name = onnx.load(str(cal.model)).graph.input[0].name
    with tempfile.TemporaryDirectory(dir=cal.plain.parent, prefix=".qdq-") as td:
        aug_f, aug_q = Path(td) / "f.onnx", Path(td) / "q.onnx"
        modify_model_output_intermediate_tensors(str(cal.model), str(aug_f))
        modify_model_output_intermediate_tensors(str(cal.plain), str(aug_q))
        acts = create_activation_matching(collect_activations(str(aug_q), ArrayReader(name, x)),
                                          collect_activations(str(aug_f), ArrayReader(name, x)))
        weights = create_weight_matching(str(cal.model), str(cal.plain))
    harm = {}
    for n in onnx.load(str(cal.model)).graph.node:
        if n.name not in cal.nodes:
            continue
        h = 0.0
        a = acts.get(n.input[0])
        if a is not None and a.get("pre_qdq") is not None and a.get("post_qdq") is not None:
            h += _nsr(a["pre_qdq"], a["post_qdq"])
        w = weights.get(n.input[1])
        if w is not None:
            h += _nsr([w["float"]], [w["dequantized"]])
        harm[n.name] = h
    return harm


def rank(cal, x: np.ndarray, *, method: str = "revert", threads: int | None = None) -> dict:
    """The weighted layers of `cal` (a `quantize.Calibration`) ranked by harm on images `x`, most harmful
    first, each with its estimated latency cost in FP32. Returns {"layers": [...], "report": {...}}."""
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity ranking {method!r}; choose one of {METHODS}")
    t0 = time.perf_counter()
    harm = (_revert_harm if method == "revert" else _qdq_harm)(cal, x, threads)
    macs = layer_macs(cal.model)
    total = max(1, sum(macs.get(n, 0) for n in cal.nodes))
    lat = _latency({"fp32": cal.model, "int8": cal.plain}, x.shape[1:], threads)
    saved = max(0.0, lat["fp32"] - lat["int8"])
    layers = [{"name": n, "harm": float(harm.get(n, 0.0)), "macs": int(macs.get(n, 0)),
               "cost_ms": saved * macs.get(n, 0) / total, "graph_index": i} for i, n in enumerate(cal.nodes)]
    layers.sort(key=lambda r: (-r["harm"], r["graph_index"]))
    report = {"method": method, "images": int(len(x)), "seconds": time.perf_counter() - t0,
              "harm": ("output error removed by keeping the layer alone in FP32 (normalized squared error of the "
                       "logits against FP32)" if method == "revert" else
                       "noise-to-signal ratio of the layer's quantized input plus its weights (qdq_loss_debug)"),
              "latency_ms": {"fp32": lat["fp32"], "int8_plain": lat["int8"], "threads": threads or 1,
                             "batch": 1},
              "cost_ms": "estimated: the layer's share of the weighted layers' MACs times the latency INT8 saves",
              "ranking": layers}
    return {"layers": layers, "report": report, "latency": lat}


def candidates(sens: dict, steps) -> list[dict]:
    """The guard's candidates from a ranking: the top k layers by harm, by harm per millisecond of cost,
    and (the old search, which still wins where the harmful layers are the first ones and keeping them
    together costs fewer quantize/dequantize boundaries) the first k in graph order; k in `steps`, without
    repeats, cheapest (estimated) first."""
    layers = sens["layers"]
    lat = sens["latency"]
    per_ms = sorted([r for r in layers if r["harm"] > 0], key=lambda r: -r["harm"] / max(r["cost_ms"], 1e-6))
    per_ms += [r for r in layers if r["harm"] <= 0]
    prefix = sorted(layers, key=lambda r: r["graph_index"])
    seen, out = set(), []
    for order, seq in (("ranked by harm", layers), ("ranked by harm per ms", per_ms), ("graph prefix", prefix)):
        for k in sorted({min(s, len(seq)) for s in steps}):
            names = tuple(r["name"] for r in seq[:k])
            if frozenset(names) in seen:
                continue
            seen.add(frozenset(names))
            cost = sum(r["cost_ms"] for r in seq[:k])
            out.append({"fp32_layers": k, "nodes": names, "order": order, "est_cost_ms": cost,
                        "est_speedup": lat["fp32"] / max(lat["int8"] + cost, 1e-9)})
    out.sort(key=lambda c: (c["est_cost_ms"], c["fp32_layers"]))
    return out
