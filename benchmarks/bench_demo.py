"""The demo's acceptance numbers, measured in one run: wall time of `edgexfer run`, accuracy of FP32
and INT8 on the held-out test split, file-size ratio, and batch-1 latency of ONNX FP32, ONNX INT8 and
PyTorch eager interleaved on the same threads.

    .venv/bin/python benchmarks/bench_demo.py          # (make bench) -> benchmarks/results/demo.json

It runs the default pipeline into runs/bench-demo from scratch (`--force`), so it takes what
`make demo` takes (about 5 minutes on 2 cores).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "demo.json"


def main() -> int:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "edgexfer", "run", "--name", "bench-demo", "--force"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    rep = json.loads((ROOT / "runs" / "bench-demo" / "report.json").read_text())
    fp, q = rep["models"]["fp32"], rep["models"]["int8"]
    eager = rep["reference"]["pytorch_eager"]["latency_ms"]
    res = {
        "command": "python benchmarks/bench_demo.py",
        "wall_seconds": round(wall, 1),
        "stage_seconds": {k: v["seconds"] for k, v in rep["stages"].items()},
        "labels_per_class": rep["data"]["train"] // len(rep["data"]["classes"]) +
                            rep["data"]["val"] // len(rep["data"]["classes"]),
        "test_images": rep["data"]["test"],
        "fp32_accuracy": fp["accuracy"], "int8_accuracy": q["accuracy"],
        "int8_accuracy_drop": fp["accuracy"] - q["accuracy"],
        "probe_val_accuracy": rep["training"]["probe_val_accuracy"],
        "int8_size_ratio": q["size_bytes"] / fp["size_bytes"],
        "latency_p50_ms": {"onnx_fp32": fp["latency_ms"]["p50"], "onnx_int8": q["latency_ms"]["p50"],
                           "pytorch_eager": eager["p50"]},
        "fp32_over_eager_p50": fp["latency_ms"]["p50"] / eager["p50"],
        "int8_speedup_over_fp32_p50": fp["latency_ms"]["p50"] / q["latency_ms"]["p50"],
        "throughput_img_s": {k: m["throughput"]["images_per_s"] for k, m in rep["models"].items()},
        "per_class_recall_delta_points": rep["quantization_impact"]["recall_delta_points"],
        "machine": rep["machine"],
        "checks": rep["checks"],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "per_class_recall_delta_points")}, indent=2))
    bounds = [res["fp32_accuracy"] >= 0.80, res["int8_accuracy_drop"] <= 0.010, res["int8_size_ratio"] <= 0.35,
              res["fp32_over_eager_p50"] <= 0.5, wall < 600]
    print("all bounds hold" if all(bounds) else f"BOUND BROKEN: {bounds}")
    return 0 if all(bounds) else 1


if __name__ == "__main__":
    sys.exit(main())
