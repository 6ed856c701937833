"""Every runtime a board runs, side by side (issue 24): the same model as ONNX (ONNX Runtime), OpenVINO IR,
ExecuTorch (XNNPACK) and LiteRT, FP32 and INT8, on this host, in one interleaved benchmark.

On flowers-dev (read where it lies, never copied) at the default settings, this runs as a user would:

    edgexfer run --data ../shared/data/flowers-dev --name bench-formats --format openvino,executorch,litert
    edgexfer bench runs/bench-formats --formats all

then, for every model file of the run folder: its size, its top-1 agreement with the FP32 ONNX model and its
accuracy on the run's test split (which nothing fitted or chose on), batch-1 latency (p50, p90) and batch-8
throughput from the one interleaved run, whether the run offers it as shippable and why (report.json
`quantize.guard` for the INT8 ONNX file, `formats` for the converted ones), and `edgexfer bench`'s recommendation:
the fastest shippable file on this host, where it is faster beyond the noise (`runtime.bench.recommend`: a sign
test over the interleaved rounds; ties go to the smallest file, then to ONNX Runtime).

    .venv/bin/python benchmarks/bench_formats.py                # -> benchmarks/results/formats.json
    .venv/bin/python benchmarks/bench_formats.py --markdown     # the RESULTS.md section from the JSON

Bounds (issue 24): every FP32 file agrees with the FP32 ONNX model on >= 99.5% of the test photos; every INT8
file offered as shippable is within the guard's bound; the table has ONNX Runtime, OpenVINO, ExecuTorch and
LiteRT rows from one interleaved run; the recommended row is the fastest shippable one, or tied with it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flowers-dev"
OUT = ROOT / "benchmarks" / "results" / "formats.json"
RUN = ROOT / "runs" / "bench-formats"
FORMATS = "openvino,executorch,litert"
MIN_FP32_AGREEMENT = 0.995  # issue 24's bound


def edgexfer(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edgexfer", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def measure(iters: int) -> dict:
    from edgexfer.runfolder import RunFolder, Workspace
    from edgexfer.runtime import EdgeModel

    import os

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    edgexfer("run", "--data", str(DATA), "--name", RUN.name, "--runs", str(RUN.parent), "--format", FORMATS)
    run_seconds = time.perf_counter() - t0
    bench = RUN / "bench_formats.json"
    edgexfer("bench", str(RUN), "--formats", "all", "--iters", str(iters), "--batches", "1,8", "--no-e2e",
             "--no-reference", "--json-out", str(bench))
    b = json.loads(bench.read_text())
    rf = RunFolder(RUN)
    x, y = Workspace(rf, rf.config()).tensors("test")
    logits = {}
    rows = []
    for r in b["models"].values():
        f = Path(r["file"])
        m = EdgeModel(f, threads=2, e2e=False)
        lg = np.concatenate([m.run(np.ascontiguousarray(x[i:i + 32]))[m.meta.tasks[0].name] for i in range(0, len(x), 32)])
        logits[f.name] = lg.argmax(1)
        ok, why = r["shippable"], r["verdict"]  # the run's verdict, as `edgexfer bench` read it
        rows.append({"file": f.name, "runtime": r["backend"], "precision": "int8" if ".int8." in f.name else "fp32",
                     "size_bytes": r["size_bytes"], "p50_ms": r["latency_ms"]["p50"], "p90_ms": r["latency_ms"]["p90"],
                     "images_per_s_batch8": r["throughput_img_s"].get("8"), "test_accuracy": float(np.mean(logits[f.name] == y)),
                     "shippable": ok, "why": why})
    ref = logits["model.onnx"]
    for row in rows:
        row["agreement_with_fp32_onnx"] = float(np.mean(logits[row["file"]] == ref))
    rec = b.get("recommended")  # `edgexfer bench`'s own: the fastest shippable file beyond the noise, ties decided
    best = next((r for r in rows if rec and Path(rec["file"]).name == r["file"]), None)
    fastest = min((r for r in rows if r["shippable"]), key=lambda r: r["p50_ms"], default=None)
    fp32_ok = all(r["agreement_with_fp32_onnx"] >= MIN_FP32_AGREEMENT for r in rows if r["precision"] == "fp32")
    runtimes = {r["runtime"].split()[0] for r in rows}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    return {"command": "python benchmarks/bench_formats.py", **provenance(), "machine": b.get("machine"),
            "data": "flowers-dev", "formats": FORMATS, "test_images": int(len(y)), "run_seconds": round(run_seconds, 1),
            "run_stage_seconds": {k: v.get("seconds") for k, v in json.loads((RUN / "report.json").read_text())["stages"].items()},
            "load_average": {"start": load_start, "end": os.getloadavg()[0]},
            "bench": {k: b["config"][k] for k in ("threads", "iters", "warmup") if k in b.get("config", {})},
            "rows": rows, "recommended": best["file"] if best else None,
            "recommendation": rec and {"why": rec["why"], "tied_with": [Path(t).name for t in rec["tied_with"]]},
            "not_measured": {},
            "bounds": {"every FP32 file agrees with FP32 ONNX on >= 99.5% of the test photos": fp32_ok,
                       "every shippable INT8 file within the guard's bound": all(
                           r["shippable"] is False or r["precision"] == "fp32" or "within" in r["why"] or
                           r["file"] == "model.int8.onnx" for r in rows),
                       "ONNX Runtime, OpenVINO, ExecuTorch and LiteRT rows in one interleaved run":
                           {"onnxruntime", "openvino", "executorch", "litert"} <= runtimes,
                       "the recommended row is the fastest shippable one, or tied with it within the noise":
                           best is not None and (best is fastest
                                                 or fastest["file"] in [Path(t).name for t in rec["tied_with"]])}}


def markdown(res: dict) -> str:
    lines = ["| file | runtime | precision | size MB | p50 ms | p90 ms | img/s @8 | agreement with FP32 ONNX | "
             "test accuracy | shippable |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = " **(recommended)**" if r["file"] == res["recommended"] else ""
        lines.append(f"| {r['file']}{mark} | {r['runtime']} | {r['precision']} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s_batch8'] or 0:.0f} | "
                     f"{100 * r['agreement_with_fp32_onnx']:.1f}% | {r['test_accuracy']:.3f} | "
                     f"{'yes' if r['shippable'] else 'no'} |")
    rec = res.get("recommendation")
    if rec:
        lines += ["", f"Recommended: {res['recommended']}: {rec['why']}."]
    lines += ["", "Why not shippable: " + "; ".join(f"{r['file']}: {r['why']}" for r in res["rows"] if not r["shippable"])
              if any(not r["shippable"] for r in res["rows"]) else "Every file is shippable.",
              *(["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in res["not_measured"].items()) + "."]
                if res["not_measured"] else []),
              "", "Bounds: " + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in res["bounds"].items()) + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200, help="interleaved batch-1 rounds per file")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from the results JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    res = measure(args.iters)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
