"""Target-faithful INT8 for arm64: the accuracy guard deciding on the arm64 runtime's own figure.

optimum's arm64 preset is U8S8 per-channel *without* reduce_range: right for ARM's dot-product kernels,
but on an x86 host without VNNI the same file saturates (VPMADDUBSW), so a guard scored on this host
judges a file the board never runs. On a copy of runs/demo (make demo):

1. `edgexfer quantize RUN --target arm64 --tuner builtin` with the emulated arm64 root filesystem hidden
   (EDGEXFER_ARM64_CACHE -> an empty folder): the guard scores candidates on this host (the old way).
2. The same with the emulated root filesystem (make arm64): the guard scores each candidate with the
   aarch64 onnxruntime under qemu on a seeded sample of the validation split, this host's accuracy beside.
3. `edgexfer verify --arch arm64` of the file the arm64 guard shipped, on held-out test images: host
   and arm64 accuracy of the same file, side by side.

Needs root and `make arm64`. About 10 min on 2 shared cores (emulation is ~250x slower than the host).

    .venv/bin/python benchmarks/bench_arm64.py     # -> benchmarks/results/arm64_guard.json
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
SOURCE = ROOT / "runs" / "demo"
TEST_SAMPLES = 200


def copy_run(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in ("checkpoint.pt", "config.json", "model.onnx", "report.json"):
        shutil.copy2(SOURCE / f, dest / f)
    return dest


def quantize(run: Path, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgexfer", "quantize", str(run), "--target", "arm64", "--tuner", "builtin"],
                   cwd=ROOT, check=True, env={**os.environ, **(env or {})})
    rep = json.loads((run / "report.json").read_text())["quantize"]
    g = rep["guard"]
    return {"measured_on": g.get("measured_on"), "guard_set": g["guard_set"], "fp32_accuracy": g["fp32_accuracy"],
            "fp32_host_accuracy": g.get("fp32_host_accuracy"), "shipped_accuracy": g["shipped_accuracy"],
            "shipped_host_accuracy": g.get("shipped_host_accuracy"), "chosen_fp32_layers": g["chosen_fp32_layers"],
            "within_bound": g["within_bound"], "max_accuracy_drop": g["max_accuracy_drop"],
            "candidates": g["candidates"], "reduce_range": rep["reduce_range"], "target": rep["target"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from edgexfer.runtime import emulate

    if not emulate.ready():
        sys.exit(f"needs the emulated arm64 root filesystem: {emulate.missing() or 'run make arm64 (as root)'}")
    if not (SOURCE / "model.onnx").is_file():
        sys.exit("runs/demo not found: make demo")
    res: dict = {"command": "python benchmarks/bench_arm64.py", "source_run": "runs/demo",
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-arm64-", dir=ROOT / "runs") as td:
        empty = Path(td) / "no-arm64-cache"
        empty.mkdir()
        print("==> 1. guard scored on this host (emulation hidden)", file=sys.stderr)
        res["host_guard"] = quantize(copy_run(Path(td) / "host"), env={"EDGEXFER_ARM64_CACHE": str(empty)})
        print("==> 2. guard scored on arm64 (emulated)", file=sys.stderr)
        arm = copy_run(Path(td) / "arm64")
        res["arm64_guard"] = quantize(arm)
        print(f"==> 3. edgexfer verify --arch arm64 of the shipped file on {TEST_SAMPLES} test images", file=sys.stderr)
        out = Path(td) / "verify.json"
        subprocess.run([sys.executable, "-m", "edgexfer", "verify", "--arch", "arm64", str(arm), "--samples",
                        str(TEST_SAMPLES), "--min-agreement", "0", "--json-out", str(out)], cwd=ROOT, check=True)
        v = json.loads(out.read_text())
        res["test_verify"] = {k: v[k] for k in ("sample", "models", "check_seconds", "arm64", "note")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "arm64_guard.json").write_text(json.dumps(res, indent=2) + "\n")
    h, a = res["host_guard"], res["arm64_guard"]
    print(f"host guard:  FP32 {h['fp32_accuracy']:.4f}, kept {h['chosen_fp32_layers']} layers in FP32, "
          f"shipped {h['shipped_accuracy']:.4f} ({h['guard_set']})")
    print(f"arm64 guard: FP32 {a['fp32_accuracy']:.4f} (host {a['fp32_host_accuracy']:.4f}), kept "
          f"{a['chosen_fp32_layers']} layers in FP32, shipped {a['shipped_accuracy']:.4f} on arm64 vs "
          f"{a['shipped_host_accuracy']:.4f} on this host ({a['guard_set']})")
    for name, m in res["test_verify"]["models"].items():
        print(f"test split, {name}: arm64 {m.get('accuracy_arm64')}, host {m.get('accuracy_host')}, "
              f"agreement {m['top1_agreement']:.4f}, max abs diff {m['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
