"""Quantization, measured: INT8 speed-up at the backbone's native 224x224, and the accuracy guard at work.

1. `edgexfer run --name lite0-224 --image-size 224 --strategy linear`: EfficientNet-Lite0 (ImageNet) at
   224x224 with a linear probe on 100 Fashion-MNIST labels per class, exported, INT8 under the guard,
   evaluated and benchmarked; the chosen INT8 file's batch-1 p50 against ONNX FP32 (bound: >= 1.3x),
   interleaved in one run, plus S8S8 and U8S8-without-reduce_range beside it for reference.
2. On runs/demo (make demo): plain INT8 (every layer quantized) against the guarded file, both scored on
   the held-out test split — the layers the guard kept in FP32 and what they bought.

3. Issue 17 (`--ranked`): at 224 on Fashion-MNIST and on ../shared/data/flowers-dev (EfficientNet-Lite0,
   linear probe; run folders runs/h17-fmnist-224 and runs/h17-flowers-224, trained when missing), from
   one FP32 file each: plain INT8, the guard's old graph-prefix fallback, the sensitivity-ranked fallback
   (ranking "revert" and "qdq"), and OpenVINO INT8 quantized by NNCF (the peer). Guard scores on a small
   agreement set (EDGEXFER_BENCH_GUARD_IMAGES, default 300) to fit ~15 minutes on 2 shared cores; test
   accuracy on a subset (report only); batch-1 latency at 2 threads, interleaved.

    .venv/bin/python benchmarks/bench_quantize.py            # -> benchmarks/results/quantize.json
    .venv/bin/python benchmarks/bench_quantize.py --ranked   # -> benchmarks/results/quantize_ranked.json
"""
from __future__ import annotations

import json
import os
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
    calib, _ = ws.tensors("train", limit=cfg.quantize.recipe.calibration_samples)
    rep = run.report()
    with tempfile.TemporaryDirectory() as td:
        plain = Path(td) / "plain.onnx"
        recipe, _ = recipe_for(cfg.quantize.target, cfg.quantize.recipe)
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


RANKED_RUNS = {"fashion-mnist": ("h17-fmnist-224", []),
               "flowers-dev": ("h17-flowers-224", ["--data", str(ROOT.parent / "shared" / "data" / "flowers-dev")])}


def _ensure_run(name: str, data_args: list[str]) -> Path:
    run = ROOT / "runs" / name
    if not (run / "model.onnx").is_file():
        for stage in (["finetune", "--out", str(run), *data_args, "--backbone", "efficientnet_lite0",
                       "--image-size", "224", "--strategy", "linear"], ["export", str(run)]):
            subprocess.run([sys.executable, "-m", "edgexfer", *stage], cwd=ROOT, check=True)
    return run


def _nncf_int8(fp32: Path, calib, out_dir: Path):
    """OpenVINO INT8 by NNCF post-training quantization of the same FP32 ONNX file (its default: mixed
    preset, per-channel weights), saved as OpenVINO IR; None with the reason when not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        return None, f"not installed: {e}"
    import time

    t0 = time.perf_counter()
    model = ov.Core().read_model(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]), subset_size=len(calib))
    path = out_dir / "nncf_int8.xml"
    ov.save_model(q, str(path))
    return path, {"seconds": time.perf_counter() - t0, "nncf": nncf.__version__, "openvino": ov.__version__,
                  "calibration_images": int(len(calib))}


def _ov_logits(path: Path, x, threads: int):
    import numpy as np
    import openvino as ov

    c = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    req = c.create_infer_request()
    return [np.concatenate([req.infer({0: x[i:i + 1]})[c.output(0)] for i in range(len(x))])]


def load_case(run: Path):
    """A run folder's config, data, FP32 file, this host's INT8 recipe and 100 calibration images (shared with
    bench_optimum.py, so both quantize from the same inputs)."""
    import dataclasses

    from edgexfer.exporters.quantize import recipe_for
    from edgexfer.pipeline import RunFolder, Workspace

    rf = RunFolder(run)
    cfg = rf.config()
    ws = Workspace(rf, cfg)
    recipe, target = recipe_for("host", cfg.quantize.recipe)
    recipe = dataclasses.replace(recipe, calibration_samples=100)
    calib, _ = ws.tensors("train", limit=recipe.calibration_samples)
    return cfg, ws, run / "model.onnx", recipe, target, calib


def _qat_row(run: Path, cfg, ws, fp32: Path, out: Path, recipe, calib, agree) -> dict:
    """Quantization-aware fine-tuning from the run's checkpoint, as the quantize stage runs it (edgexfer/qat.py:
    the labelled training images and augmented views of them), scored by the same agreement set."""
    import time

    from edgexfer.bounds import within
    from edgexfer.qat import make_qat_int8, training_images

    xl, yl, views = training_images(cfg, ws)
    t0 = time.perf_counter()
    info = make_qat_int8(run / "checkpoint.pt", fp32, out, recipe, x_lab=xl, y_lab=yl, x_unlab=views, calib=calib,
                         epochs=cfg.quantize.qat_epochs, seed=cfg.data.seed, threads=2)
    a = agree(out)
    return {"guard_seconds": time.perf_counter() - t0, "fp32_layers": 0, "agreement": a,
            "within_bound": within(1.0 - a, cfg.max_accuracy_drop), "calibrations": 1,
            "qat": {k: info.get(k) for k in ("epochs", "steps", "images", "seconds")}}


def ranked_case(dataset: str, guard_images: int, test_images: int, iters: int) -> dict:
    import time

    import numpy as np

    from edgexfer.evaluate import mean_task_accuracy, onnx_logits
    from edgexfer.guard import Judge, Scorer, agreement_set, describe, guarded_quantize
    from edgexfer.pipeline import agreement_with
    from edgexfer.runtime.bench import BenchConfig, interleaved, onnx_candidate, openvino_candidate

    run = _ensure_run(*RANKED_RUNS[dataset])
    cfg, ws, fp32, recipe, target, calib = load_case(run)
    xg, _, info = agreement_set(ws, seed=cfg.data.seed, min_images=guard_images,
                                max_bytes=guard_images * 4 * 3 * 224 * 224)
    xt, yt = ws.tensors("test")
    idx = np.random.default_rng(0).permutation(len(yt))[:test_images]
    xt, yt = xt[idx], yt[idx]
    agree = agreement_with(fp32, xg, 2)
    rank_on = xg[np.random.default_rng(1).permutation(len(xg))[:128]]
    res = {"dataset": dataset, "run": f"runs/{run.name}", "target": target, "guard_set": describe(info),
           "test_images": int(len(yt)), "max_accuracy_drop": cfg.max_accuracy_drop, "files": {}}
    with tempfile.TemporaryDirectory(dir=run) as td:
        td = Path(td)
        files = {"fp32": fp32}
        for name, kw in {"plain_int8": dict(steps=(0,), rank_on=None),
                         "prefix_fallback": dict(rank_on=None),
                         "ranked_revert": dict(rank_on=rank_on, ranking="revert"),
                         "ranked_qdq": dict(rank_on=rank_on[:8], ranking="qdq")}.items():
            t0 = time.perf_counter()
            rec = guarded_quantize(fp32, td / f"{name}.onnx", calib, recipe,
                                   Judge([Scorer("agreement", agree, "decides")], cfg.max_accuracy_drop),
                                   threads=2, **kw)
            g = rec["guard"]
            files[name] = td / f"{name}.onnx"
            res["files"][name] = {"guard_seconds": time.perf_counter() - t0, "within_bound": g["within_bound"],
                                  "fp32_layers": g["chosen_fp32_layers"], "layers_kept_fp32": g["layers_kept_fp32"],
                                  "agreement": g["shipped_accuracy"], "candidates": len(g["candidates"]),
                                  "calibrations": g["calibration"]["calibrations"],
                                  **({"sensitivity": {k: v for k, v in g["sensitivity"].items() if k != "ranking"},
                                      "top10": [{k: r[k] for k in ("name", "harm", "cost_ms")}
                                                for r in g["sensitivity"]["ranking"][:10]],
                                      "estimated_speedup": g.get("estimated_speedup")}
                                     if g.get("sensitivity") else {})}  # null: plain INT8 passed, nothing ranked
        if os.environ.get("EDGEXFER_BENCH_QAT", "1") == "1":
            files["qat"] = td / "qat.onnx"
            res["files"]["qat"] = _qat_row(run, cfg, ws, fp32, files["qat"], recipe, calib, agree)
        for name, path in files.items():
            lg = onnx_logits(path, xt, threads=2)
            res["files"].setdefault(name, {})["test_accuracy"] = mean_task_accuracy(lg, yt)
        ov_path, ov_info = _nncf_int8(fp32, calib, td)
        res["files"]["openvino_nncf_int8"] = {"quantize": ov_info}
        if ov_path is not None:
            res["files"]["openvino_nncf_int8"]["test_accuracy"] = mean_task_accuracy(_ov_logits(ov_path, xt, 2), yt)
            ref = [lg.argmax(1) for lg in onnx_logits(fp32, xg, threads=2)]
            res["files"]["openvino_nncf_int8"]["agreement"] = float(np.mean(_ov_logits(ov_path, xg, 2)[0].argmax(1) == ref[0]))
        ov = [c for c in (openvino_candidate("openvino_fp32", fp32, 2), openvino_candidate("openvino_nncf_int8", ov_path, 2))
              if c is not None] if ov_path is not None else []
        x1 = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        # as applications run ONNX Runtime (its default: worker threads spin between calls), each file timed in
        # alternating blocks of calls; and, beside it, call by call with spinning off (this script's former way)
        bc = BenchConfig()
        lat = interleaved([onnx_candidate(n, p, 2, spinning=True) for n, p in files.items()] + ov, x1, warmup=10,
                          iters=iters, **bc.timing())
        lat0 = interleaved([onnx_candidate(n, p, 2) for n, p in files.items()] + ov, x1, warmup=10, iters=iters)
    res["latency"] = {"p50_ms": f"ONNX Runtime's default session (spinning threads), each file in blocks of {bc.block} "
                                f"calls after a {1000 * bc.pause:g} ms pause, {iters} calls each",
                      "p50_ms_no_spinning": f"spinning off, the files called in turn, {iters} rounds"}
    for n, v in lat.items():
        res["files"].setdefault(n, {}).update(p50_ms=v["p50"], p90_ms=v["p90"], speedup_vs_ort_fp32=lat["fp32"]["p50"] / v["p50"])
    for n, v in lat0.items():
        res["files"].setdefault(n, {}).update(p50_ms_no_spinning=v["p50"],
                                              speedup_no_spinning=lat0["fp32"]["p50"] / v["p50"])
    return res


def ranked(guard_images: int | None = None) -> int:
    import os
    import time

    guard_images = guard_images or int(os.environ.get("EDGEXFER_BENCH_GUARD_IMAGES", "300"))
    t0 = time.perf_counter()
    load = os.getloadavg()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    res = {"command": "python benchmarks/bench_quantize.py --ranked", **provenance(),
           "contended": {"load_average_at_start": load, "cpus": os.cpu_count(),
                         "note": "2 cores shared with other work: ratios within one interleaved run are what to trust"},
           "cases": [ranked_case(d, guard_images, 400, 150) for d in RANKED_RUNS]}
    res["seconds"] = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantize_ranked.json").write_text(json.dumps(res, indent=2) + "\n")
    for c in res["cases"]:
        print(c["dataset"], json.dumps({n: {k: v for k, v in f.items() if k in ("fp32_layers", "agreement", "test_accuracy",
                                                                                  "speedup_vs_ort_fp32", "guard_seconds")}
                                        for n, f in c["files"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    if "--ranked" in sys.argv:
        sys.exit(ranked())
    if "--guard-only" in sys.argv:
        sys.exit(guard_only())
    sys.exit(main())
