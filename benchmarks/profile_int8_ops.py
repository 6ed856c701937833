"""Where the batch-1 time of an FP32 file and of its INT8 file goes, by kind of layer: ONNX Runtime's
profiler (kernel time per node, 2 threads, its default spinning session) on the two files of a run folder,
the nodes grouped by what they compute in an EfficientNet (stem, expand 1x1, depthwise, project 1x1, head,
classifier) or else by operator type. Says which layers INT8 speeds up and which it does not.

    .venv/bin/python benchmarks/profile_int8_ops.py runs/h17-flowers-224    # -> results/int8_ops.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "int8_ops.json"
PARTS = ("_conv_stem", "_expand_conv", "_depthwise_conv", "_project_conv", "_conv_head")


def group(node: str, op: str) -> str:
    """An EfficientNet node's part from its name. ONNX Runtime names a Conv it fused with the activation
    after the activation (`_blocks.N/_swish/Clip`: the expand conv, `_swish_1`: the depthwise one; block 0 has
    no expand conv, the stem's and head's are `/backbone/_swish` and `/backbone/_swish_1`). Quantize and
    dequantize nodes, named after the tensors they convert, count as their operator type."""
    if op in ("QuantizeLinear", "DequantizeLinear", "Transpose", "Add", "QLinearAdd"):
        return op
    for p in PARTS:
        if p in node:
            return p
    b = re.search(r"_blocks\.(\d+)/(_swish_1|_swish)/", node)
    if b:
        return "_depthwise_conv" if b.group(2) == "_swish_1" or b.group(1) == "0" else "_expand_conv"
    if "/backbone/_swish/" in node:
        return "_conv_stem"
    if "/backbone/_swish_1/" in node:
        return "_conv_head"
    return op


def profile(path: Path, calls: int = 40) -> dict:
    """Kernel microseconds per call by group: each node's median over `calls` profiled calls (the first
    calls' allocations fall out of the median), summed by group."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(td) / "p")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        i = s.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
        for _ in range(calls):
            s.run(None, {i.name: x})
        ev = json.loads(Path(s.end_profiling()).read_text())
    per_node = defaultdict(list)
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["name"][:-len("_kernel_time")], e["args"].get("op_name", "?"))].append(e["dur"])
    by = defaultdict(float)
    for (node, op), d in per_node.items():
        by[group(node, op)] += float(np.median(d))
    return {k: round(v, 1) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    files = {"fp32": a.run / "model.onnx", "int8": a.run / "model.int8.onnx"}
    res = {"command": f"python benchmarks/profile_int8_ops.py {a.run}", **provenance(), "run": str(a.run),
           "unit": "microseconds of kernel time per batch-1 call (each node's median over 40 profiled calls), 2 threads",
           "files": {k: profile(p) for k, p in files.items()}}
    fp, q = res["files"]["fp32"], res["files"]["int8"]
    res["speedup_by_part"] = {p: round(fp[p] / q[p], 2) for p in PARTS if p in fp and q.get(p)}
    res["total_us"] = {k: round(sum(v.values()), 1) for k, v in res["files"].items()}
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("speedup_by_part", "total_us")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
