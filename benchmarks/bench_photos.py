"""edgexfer on real photos against the twenty-line baseline a user could write instead, in one go:

- `edgexfer run --data DIR` with no other option (the default a user gets),
- `edgexfer run --data DIR --strategy linear` (the probe alone, edgexfer's way),
- the twenty-line probe: frozen ImageNet EfficientNet-Lite0 at 224 px (shorter side 224, centre crop),
  pooled features, scikit-learn's LogisticRegressionCV; no fine-tuning.

    .venv/bin/python benchmarks/bench_photos.py                 # -> benchmarks/results/photos.json
    .venv/bin/python benchmarks/bench_photos.py --data DIR      # any train/ test/ ImageFolder of photos

The data defaults to ../shared/data/flowers-dev (five flower classes, 30 training + 70 test photos per
class), read where it lies and never copied. Accuracies are on each data set's own test split, with
their binomial standard errors. Bounds (issue 12): the default run >= the probe + 3 points, INT8 within 1
point of FP32 and shipped, the default run within 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flowers-dev"
OUT = ROOT / "benchmarks" / "results" / "photos.json"


def twenty_line_probe(data: Path) -> dict:
    """What a user writes in twenty lines: frozen Lite0 features + LogisticRegressionCV."""
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegressionCV
    from torchvision.transforms import v2 as T

    from edgexfer.backbones import build_backbone

    t0 = time.perf_counter()
    net = build_backbone("efficientnet_lite0", weights="imagenet", image_size=224).eval()
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([127 / 255] * 3, [128 / 255] * 3)])
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())

    def features(split):
        items = [(f, k) for k, c in enumerate(classes) for f in sorted((data / split / c).iterdir())]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f, _ in items])
        with torch.inference_mode():
            return torch.cat([net(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy(), np.array([k for _, k in items])

    (ftr, ytr), (fte, yte) = features("train"), features("test")
    clf = LogisticRegressionCV(max_iter=5000).fit(ftr, ytr)
    acc = float((clf.predict(fte) == yte).mean())
    return {"test_accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(yte)), "test_images": len(yte),
            "train_images": len(ytr), "C": float(clf.C_[0]), "seconds": round(time.perf_counter() - t0, 1)}


def edgexfer_run(data: Path, name: str, *extra: str) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgexfer", "run", "--data", str(data), "--runs", "runs", "--name", name,
                    "--force", *extra], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    rep = json.loads((ROOT / "runs" / name / "report.json").read_text())
    out = {"command": " ".join(["edgexfer run --data", str(data), *extra]), "wall_seconds": round(wall, 1),
           "image_size": rep["backbone"]["image_size"], "strategy": rep["backbone"]["strategy"],
           "train": rep["data"]["train"], "val": rep["data"]["val"], "test": rep["data"]["test"]}
    for k, m in rep["models"].items():
        acc = m["accuracy"]
        out[k] = {"test_accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / m["n"]),
                  "latency_p50_ms": m["latency_ms"]["p50"], "size_bytes": m["size_bytes"]}
    g = rep.get("quantize", {}).get("guard", {})
    out["int8_layers_kept_fp32"] = g.get("chosen_fp32_layers")
    if "fp32" in out and "int8" in out:
        out["int8_drop_points"] = round(100 * (out["fp32"]["test_accuracy"] - out["int8"]["test_accuracy"]), 2)
        out["int8_speedup_p50"] = out["fp32"]["latency_p50_ms"] / out["int8"]["latency_p50_ms"]
    return out


def markdown(res: dict) -> str:
    """The RESULTS.md section, made from the results JSON (`--markdown`)."""
    p, d, lin = res["probe_twenty_lines"], res["default"], res["linear"]
    row = lambda name, r: (f"| {name} | {r['image_size']} | {r['strategy']} | {r['fp32']['test_accuracy']:.3f} ± "  # noqa: E731
                           f"{r['fp32']['stderr']:.3f} | {r['int8']['test_accuracy']:.3f} | {r['int8_layers_kept_fp32']} | "
                           f"{r['int8_speedup_p50']:.2f}x | {r['wall_seconds']:.0f} s |")
    lines = [f"`python benchmarks/bench_photos.py` on `{Path(res['data']).name}` ({d['train']} train + {d['val']} val "
             f"labelled photos, {d['test']} test photos), {res['machine'].get('cpu')} "
             f"({', '.join(f for f in ('avx2', 'avx512f', 'avx512_vnni') if f in res['machine'].get('flags', []))}), "
             f"{res.get('cores', 2)} cores; ± is the binomial standard error. {res.get('note', '')}", "",
             "| what | px | strategy | FP32 test | INT8 test | layers kept FP32 | INT8 speed-up (p50) | wall |",
             "|---|---|---|---|---|---|---|---|",
             row("`edgexfer run --data DIR` (default)", d), row("`--strategy linear`", lin),
             f"| twenty-line probe (LogisticRegressionCV, C={p['C']:.3g}) | 224 | linear | {p['test_accuracy']:.3f} ± "
             f"{p['stderr']:.3f} | – | – | – | {p['seconds']:.0f} s |", "",
             f"Default minus probe: {res['default_minus_probe_points']:+.2f} points. Bounds: "
             + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in res["bounds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from the results JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())), end="")
        return 0
    if not (args.data / "train").is_dir():
        print(f"bench_photos: {args.data} has no train/ folder (flowers-dev lives in ../shared/data)", file=sys.stderr)
        return 2
    from edgexfer.runtime.machine import cpu_info

    import os

    res = {"command": "python benchmarks/bench_photos.py", "data": str(args.data), "machine": cpu_info(),
           "cores": os.cpu_count(),
           "probe_twenty_lines": twenty_line_probe(args.data),
           "default": edgexfer_run(args.data, "bench-photos-default"),
           "linear": edgexfer_run(args.data, "bench-photos-linear", "--strategy", "linear")}
    d, p = res["default"], res["probe_twenty_lines"]
    res["default_minus_probe_points"] = round(100 * (d["fp32"]["test_accuracy"] - p["test_accuracy"]), 2)
    res["bounds"] = {"default >= probe + 3 points": res["default_minus_probe_points"] >= 3,
                     "INT8 within 1 point of FP32": d.get("int8_drop_points", 99) <= 1,
                     "INT8 faster than FP32 at batch 1": d.get("int8_speedup_p50", 0) > 1,
                     "default run <= 300 s": d["wall_seconds"] <= 300}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    return 0 if all(res["bounds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
