"""Quantization, measured: INT8 speed-up at the backbone's native 224x224, and the accuracy guard at work.

1. `edgexfer run --name lite0-224 --image-size 224 --strategy linear`: EfficientNet-Lite0 (ImageNet) at
   224x224 with a linear probe on 100 Fashion-MNIST labels per class, exported, INT8 under the guard,
   evaluated and benchmarked; the chosen INT8 file's batch-1 p50 against ONNX FP32 (bound: >= 1.3x),
   interleaved in one run, plus S8S8 and U8S8-without-reduce_range beside it for reference.
2. On runs/demo (make demo): plain INT8 (every layer quantized) against the guarded file, both scored on
   the held-out test split — the layers the guard kept in FP32 and what they bought.

    .venv/bin/python benchmarks/bench_quantize.py     # -> benchmarks/results/quantize.json
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def run_224() -> dict:
    subprocess.run([sys.executable, "-m", "edgexfer", "run", "--name", "lite0-224", "--image-size", "224",
                    "--strategy", "linear", "--bench-iters", "300", "--force"], cwd=ROOT, check=True)
    run = ROOT / "runs" / "lite0-224"
    rep = json.loads((run / "report.json").read_text())
    from edgexfer.exporters.quantize import Int8Recipe, quantize_int8
    from edgexfer.pipeline import RunFolder, Workspace
    from edgexfer.runtime.bench import interleaved, onnx_candidate
    import numpy as np

    rf = RunFolder(run)
    cfg = rf.config()
    calib, _ = Workspace(rf, cfg).tensors("train", limit=200)
    variants = {}
    with tempfile.TemporaryDirectory() as td:
        for name, r in {"s8s8": Int8Recipe(activation_type="int8", reduce_range=False),
                        "u8s8_no_reduce_range": Int8Recipe(reduce_range=False)}.items():
            quantize_int8(run / "model.onnx", Path(td) / f"{name}.onnx", calib, r)
            variants[name] = Path(td) / f"{name}.onnx"
        cands = [onnx_candidate("fp32", run / "model.onnx", 2), onnx_candidate("int8_chosen", run / "model.int8.onnx", 2)]
        cands += [onnx_candidate(k, p, 2) for k, p in variants.items()]
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        lat = interleaved(cands, x, warmup=20, iters=300)
    p50 = {k: v["p50"] for k, v in lat.items()}
    return {
        "command": "edgexfer run --name lite0-224 --image-size 224 --strategy linear --bench-iters 300 --force",
        "fp32_accuracy": rep["models"]["fp32"]["accuracy"], "int8_accuracy": rep["models"]["int8"]["accuracy"],
        "int8_size_ratio": rep["models"]["int8"]["size_bytes"] / rep["models"]["fp32"]["size_bytes"],
        "guard_fp32_layers": rep["quantize"]["guard"]["chosen_fp32_layers"],
        "p50_ms_interleaved": p50,
        "speedup_int8_chosen": p50["fp32"] / p50["int8_chosen"],
        "speedup_s8s8": p50["fp32"] / p50["s8s8"],
        "speedup_u8s8_no_reduce_range": p50["fp32"] / p50["u8s8_no_reduce_range"],
        "report_speedup": rep["models"]["fp32"]["latency_ms"]["p50"] / rep["models"]["int8"]["latency_ms"]["p50"],
    }


def guard_case(name: str = "demo") -> dict:
    from edgexfer.evaluate import evaluate_file
    from edgexfer.exporters.quantize import quantize_int8
    from edgexfer.exporters.quantize import recipe_for
    from edgexfer.pipeline import RunFolder, Workspace

    run = RunFolder(ROOT / "runs" / name)
    cfg = run.config()
    ws = Workspace(run, cfg)
    x, y = ws.tensors("test")
    calib, _ = ws.tensors("train", limit=cfg.quantize.calibration_samples)
    rep = run.report()
    with tempfile.TemporaryDirectory() as td:
        plain = Path(td) / "plain.onnx"
        recipe, _ = recipe_for(cfg.target, cfg.quantize)
        quantize_int8(run.file("model.onnx"), plain, calib, recipe)
        acc_plain = evaluate_file(plain, x, y, ws.dataset.classes, threads=2)["accuracy"]
    fp32 = rep["models"]["fp32"]["accuracy"]
    g = rep["quantize"]["guard"]
    return {"run": f"runs/{name}", "fp32_test_accuracy": fp32, "plain_int8_test_accuracy": acc_plain, "plain_drop": fp32 - acc_plain,
            "guarded_int8_test_accuracy": rep["models"]["int8"]["accuracy"],
            "guarded_drop": fp32 - rep["models"]["int8"]["accuracy"], "bound": g["max_accuracy_drop"],
            "guard_set": g["guard_set"], "candidates": g["candidates"], "layers_kept_fp32": g["layers_kept_fp32"]}


def main() -> int:
    from edgexfer.runtime.machine import machine_info

    res = {"command": "python benchmarks/bench_quantize.py", "machine": machine_info(),
           "guard_case_demo": guard_case() if (ROOT / "runs" / "demo" / "report.json").is_file() else None,
           "lite0_224": run_224(), "guard_case_lite0_224": guard_case("lite0-224")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantize.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    return 0


def guard_only() -> int:
    """`bench_quantize.py --guard-only`: just the guard cases, on the run folders already there."""
    res = {n: guard_case(n) for n in ("demo", "lite0-224") if (ROOT / "runs" / n / "report.json").is_file()}
    (OUT / "guard_case.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({n: {k: v for k, v in r.items() if k not in ("candidates", "layers_kept_fp32")}
                      for n, r in res.items()}, indent=2))
    return 0


if __name__ == "__main__":
    if "--guard-only" in sys.argv:
        sys.exit(guard_only())
    sys.exit(main())
