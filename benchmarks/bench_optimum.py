"""optimum's ORTQuantizer against edgexfer's own static INT8 path (issue 17 item 4), from the same FP32 file,
the same calibration images and the same target preset (this host's: AVX-512 VNNI -> optimum's
`AutoQuantizationConfig.avx512_vnni(is_static=True, per_channel=True)`, min/max calibration as `AutoCalibrationConfig.minmax` sets it):
test accuracy (a subset, report only), top-1 agreement with FP32, and batch-1 latency at 2 threads,
interleaved. Run folders: those of `bench_quantize.py --ranked` (runs/h17-*-224).

optimum 2.1 pins transformers 4.57, which pins huggingface_hub < 1.0, while the project's environment has
huggingface_hub 2.x (timm, dev extra): so optimum is installed apart, with its own transformers and hub,
and this script puts that folder first on sys.path (EDGEXFER_OPTIMUM_SITE, default /tmp/h17/optimum-site):

    pip install --target DIR --no-deps optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6 \\
        huggingface_hub==0.36.2 tokenizers==0.22.2 regex safetensors
    EDGEXFER_OPTIMUM_SITE=DIR .venv/bin/python benchmarks/bench_optimum.py   # -> results/quantize_optimum.json
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
SITE = os.environ.get("EDGEXFER_OPTIMUM_SITE", "/tmp/h17/optimum-site")


def case(run: Path, test_images: int = 400, iters: int = 150) -> dict:
    import numpy as np

    from bench_quantize import load_case
    from edgexfer.evaluate import mean_task_accuracy, onnx_logits
    from edgexfer.exporters.quantize import quantize_int8
    from edgexfer.runtime.bench import interleaved, onnx_candidate
    from optimum.onnxruntime import ORTQuantizer
    from onnxruntime.quantization import CalibrationMethod
    from optimum.onnxruntime.configuration import AutoQuantizationConfig, CalibrationConfig

    _, ws, fp32, recipe, target, calib = load_case(run)
    xt, yt = ws.tensors("test")
    idx = np.random.default_rng(0).permutation(len(yt))[:test_images]
    xt, yt = xt[idx], yt[idx]
    res = {"run": f"runs/{run.name}", "target": target["target"], "test_images": int(len(yt)), "files": {}}
    with tempfile.TemporaryDirectory(dir=run) as td:
        td = Path(td)
        t0 = time.perf_counter()
        quantize_int8(fp32, td / "edgexfer.onnx", calib, recipe)
        res["files"]["edgexfer_int8"] = {"seconds": time.perf_counter() - t0, "recipe": recipe.to_dict()}
        preset = getattr(AutoQuantizationConfig, target["target"] if target["target"] != "arm64" else "arm64")
        qconfig = preset(is_static=True, per_channel=True)
        t0 = time.perf_counter()
        q = ORTQuantizer(fp32)
        data = [{"input": calib[i]} for i in range(len(calib))]
        # AutoCalibrationConfig.minmax reads a Hugging Face Dataset's info: the same min/max config, by hand
        calibration = CalibrationConfig(dataset_name="edgexfer calibration images", dataset_config_name="",
                                        dataset_split="train", dataset_num_samples=len(data),
                                        method=CalibrationMethod.MinMax, moving_average=False)
        ranges = q.fit(dataset=data, calibration_config=calibration,
                       onnx_augmented_model_name=td / "augmented.onnx")
        out = q.quantize(qconfig, td / "optimum", calibration_tensors_range=ranges)
        res["files"]["optimum_int8"] = {"seconds": time.perf_counter() - t0, "config": str(qconfig),
                                        "reduce_range": bool(qconfig.reduce_range)}
        files = {"fp32": fp32, "edgexfer_int8": td / "edgexfer.onnx", "optimum_int8": next(Path(out).glob("*.onnx"))}  # quantize() returns its save_dir
        ref = onnx_logits(fp32, xt, threads=2)
        for name, path in files.items():
            lg = ref if name == "fp32" else onnx_logits(path, xt, threads=2)
            res["files"].setdefault(name, {}).update(
                test_accuracy=mean_task_accuracy(lg, yt),
                test_agreement_with_fp32=float(np.mean(lg[0].argmax(1) == ref[0].argmax(1))))
        x1 = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        lat = interleaved([onnx_candidate(n, p, 2) for n, p in files.items()], x1, warmup=10, iters=iters)
    for n, v in lat.items():
        res["files"][n].update(p50_ms=v["p50"], speedup_vs_fp32=lat["fp32"]["p50"] / v["p50"])
    return res


def main() -> int:
    sys.path.insert(0, SITE)
    import optimum.onnxruntime  # noqa: F401  (fails here, with the reason, when not installed)
    from importlib.metadata import version

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    t0 = time.perf_counter()
    res = {"command": "python benchmarks/bench_optimum.py", **provenance(),
           "load_average_at_start": os.getloadavg(),
           "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "onnxruntime")},
           "cases": [case(ROOT / "runs" / n) for n in ("h17-fmnist-224", "h17-flowers-224")
                     if (ROOT / "runs" / n / "model.onnx").is_file()]}
    res["seconds"] = time.perf_counter() - t0
    (OUT / "quantize_optimum.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps([{n: {k: v for k, v in f.items() if k in ("test_accuracy", "p50_ms", "speedup_vs_fp32")}
                       for n, f in c["files"].items()} for c in res["cases"]], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
