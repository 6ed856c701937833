"""edgexfer on real photos (and on the Fashion-MNIST 100-shot demo) against the twenty-line baseline a user
could write instead, in one go, on each data set:

- `edgexfer run --data DIR` with no other option (the default a user gets; no --data for Fashion-MNIST),
- `edgexfer run --data DIR --strategy linear` (the probe alone, edgexfer's way; not run again when the default
  already chose it: the same command),
- the twenty-line probe: frozen ImageNet EfficientNet-Lite0 at 224 px (shorter side 224, centre crop),
  pooled features, scikit-learn's LogisticRegressionCV on every labelled image; no fine-tuning.

    .venv/bin/python benchmarks/bench_photos.py                 # -> benchmarks/results/photos.json
    .venv/bin/python benchmarks/bench_photos.py --data DIR      # any train/ test/ ImageFolder of photos (repeatable)
    .venv/bin/python benchmarks/bench_photos.py --markdown      # the RESULTS.md section from the JSON

The photos default to the two development sets in ../shared/data: flowers-dev (five flower classes, 30
training + 70 test photos per class) and aerial-dev (seven aerial-scene classes, 30 + 70 per class, the domain
farthest from ImageNet), read where they lie and never copied. For each, the default run's cross-validated probe
records which features its head reads and every candidate's CV accuracy (report.json
`training.probe_selection.candidates`, issue 28), and each stage's wall time. Accuracies are on each data set's own test split, with
their binomial standard errors. Bounds (issues 12 and 28): on the photos, the default run >= the probe + 3
points, INT8 recommended only where the guard proves it (and, where it is, within 1 point of FP32 on the test
split), the default run within 5 minutes on 2 cores; on Fashion-MNIST 100-shot, FP32 >= 0.857 and INT8 within
1 point. INT8's test drop and speed-up are reported beside them whichever file ships.
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
DEFAULT_DATA = [ROOT.parent / "shared" / "data" / "flowers-dev", ROOT.parent / "shared" / "data" / "aerial-dev"]
OUT = ROOT / "benchmarks" / "results" / "photos.json"


def _labelled(data: Path | None):
    """(labelled images, labels, test images, test labels, classes): flowers-dev's train/ and test/ folders, or
    (data None) the Fashion-MNIST 100-shot split edgexfer itself draws (train + val labelled, 2,000 test)."""
    if data is None:
        from edgexfer.data import load_fashion_mnist

        ds = load_fashion_mnist(shots=100, test_size=2000, seed=0)
        return (list(ds.train.images) + list(ds.val.images), np.concatenate([ds.train.labels, ds.val.labels]),
                list(ds.test.images), ds.test.labels, ds.classes)
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    split = lambda s: [(f, k) for k, c in enumerate(classes) for f in sorted((data / s / c).iterdir())]  # noqa: E731
    tr, te = split("train"), split("test")
    return [f for f, _ in tr], np.array([k for _, k in tr]), [f for f, _ in te], np.array([k for _, k in te]), classes


def twenty_line_probe(data: Path | None) -> dict:
    """What a user writes in twenty lines: frozen Lite0 features at 224 px (shorter side 224, centre crop) +
    scikit-learn's LogisticRegressionCV on every labelled image."""
    return twenty_line_predictions(data)[0]


def twenty_line_predictions(data: Path | None) -> tuple[dict, np.ndarray]:
    """twenty_line_probe's result, and its prediction for each test image (for paired comparisons)."""
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegressionCV
    from torchvision.transforms import v2 as T

    from edgexfer.backbones import build_backbone

    t0 = time.perf_counter()
    net = build_backbone("efficientnet_lite0", weights="imagenet", image_size=224).eval()
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([127 / 255] * 3, [128 / 255] * 3)])
    xtr, ytr, xte, yte, _ = _labelled(data)
    load = lambda im: (Image.open(im) if isinstance(im, (str, Path)) else Image.fromarray(im)).convert("RGB")  # noqa: E731

    def features(images):
        out = []
        for i in range(0, len(images), 64):
            with torch.inference_mode():
                out.append(net(torch.stack([tf(load(im)) for im in images[i:i + 64]])))
        return torch.cat(out).numpy()

    clf = LogisticRegressionCV(max_iter=5000).fit(features(xtr), ytr)
    pred = clf.predict(features(xte))
    acc = float((pred == yte).mean())
    return ({"test_accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(yte)), "test_images": len(yte),
             "train_images": len(ytr), "C": float(clf.C_[0]), "seconds": round(time.perf_counter() - t0, 1)}, pred)


def edgexfer_run(data: Path | None, name: str, *extra: str) -> dict:
    t0 = time.perf_counter()
    src = ["--data", str(data)] if data else []
    subprocess.run([sys.executable, "-m", "edgexfer", "run", *src, "--runs", "runs", "--name", name,
                    "--force", *extra], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    rep = json.loads((ROOT / "runs" / name / "report.json").read_text())
    out = {"command": " ".join(["edgexfer run", *src, *extra]), "wall_seconds": round(wall, 1),
           "backbone": rep["backbone"]["name"], "backbone_selection": rep["backbone"].get("selection"),
           "image_size": rep["backbone"]["image_size"], "strategy": rep["backbone"]["strategy"],
           "train": rep["data"]["train"], "val": rep["data"]["val"], "test": rep["data"]["test"]}
    for k, m in rep["models"].items():
        acc = m["accuracy"]
        out[k] = {"test_accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / m["n"]),
                  "latency_p50_ms": m["latency_ms"]["p50"], "size_bytes": m["size_bytes"]}
    g = rep.get("quantize", {}).get("guard", {})
    out["int8_layers_kept_fp32"] = g.get("chosen_fp32_layers")
    out["int8_guard"] = {"shippable": g.get("shippable"), "verdict": g.get("verdict"), "tuner": g.get("tuner"),
                         "search_skipped": bool(g.get("search_skipped"))}
    out["recommended"] = (rep.get("recommendation") or {}).get("model")
    out["stage_seconds"] = {k: v.get("seconds") for k, v in (rep.get("stages") or {}).items() if isinstance(v, dict)}
    sel = rep["training"].get("probe_selection") or {}
    if sel:
        out["probe"] = {"C": sel.get("C"), "cv_accuracy": sel.get("cv_accuracy"), "cv_stderr": sel.get("cv_stderr"),
                        "features": sel.get("features"), "candidates": sel.get("candidates")}
    if "fp32" in out and "int8" in out:
        out["int8_drop_points"] = round(100 * (out["fp32"]["test_accuracy"] - out["int8"]["test_accuracy"]), 2)
        out["int8_speedup_p50"] = out["fp32"]["latency_p50_ms"] / out["int8"]["latency_p50_ms"]
    return out


def _section(name: str, r: dict) -> list[str]:
    p, d, lin = r["probe_twenty_lines"], r["default"], r.get("linear") or {}
    row = lambda what, x: (f"| {what} | {x['backbone']} | {x['image_size']} | {x['strategy']} | "  # noqa: E731
                           f"{x['fp32']['test_accuracy']:.3f} ± {x['fp32']['stderr']:.3f} | {x['int8']['test_accuracy']:.3f} | "
                           f"{x['int8_layers_kept_fp32']} | {x['int8_speedup_p50']:.2f}x | {x['wall_seconds']:.0f} s |")
    lines = [f"**{name}** ({d['train']} train + {d['val']} val labelled images, {d['test']} test images)", "",
             "| what | backbone | px | strategy | FP32 test | INT8 test | layers kept FP32 | INT8 speed-up (p50) | wall |",
             "|---|---|---|---|---|---|---|---|---|",
             row("`edgexfer run` (default)", d),
             *([row("`--strategy linear`", lin)] if "fp32" in lin else []),
             f"| twenty-line probe (LogisticRegressionCV, C={p['C']:.3g}) | efficientnet_lite0 | 224 | linear | "
             f"{p['test_accuracy']:.3f} ± {p['stderr']:.3f} | – | – | – | {p['seconds']:.0f} s |", "",
             f"Default minus probe: {r['default_minus_probe_points']:+.2f} points. Bounds: "
             + "; ".join(f"{k}: {'n/a' if v is None else 'met' if v else '**not met**'}" for k, v in r["bounds"].items())
             + "."
             + (f" Recommended: {d['recommended']}; the INT8 guard: {d['int8_guard']['verdict']}."
                if d.get("int8_guard") else "")
             + (f" `--strategy linear` not run again: {lin['same_as']}." if lin.get("same_as") else ""), ""]
    cands = (d.get("probe") or {}).get("candidates")
    if cands:
        f = d["probe"]["features"]
        lines += [f"The default's cross-validated probe ({d['backbone']} at {d['image_size']} px) read `{f['name']}` "
                  f"({f['count']} features, blocks {', '.join(map(str, f['taps']))}): {f['reason']}. Candidates, "
                  "CV accuracy on the labelled images (the test split only reports):", "",
                  "| features | blocks | count | C | CV accuracy ± s.e. | best's lead ± paired s.e. |",
                  "|---|---|---|---|---|---|",
                  *[f"| {c['name']}{' (chosen)' if c['name'] == f['name'] else ''} | {', '.join(map(str, c['taps']))} | "
                    f"{c['features']} | {c['C']:.3g} | {c['cv_accuracy']:.3f} ± {c['cv_stderr']:.3f} | "
                    f"{100 * c['lead_of_best']:+.1f} ± {100 * c['lead_stderr']:.1f} points |" for c in cands], ""]
    if d.get("stage_seconds"):
        lines += ["Default run, wall time by stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in d["stage_seconds"].items()
                                                               if v is not None) + ".", ""]
    sel = d.get("backbone_selection")
    if sel:
        lines += ["`--backbone auto` on the labelled images: " + ", ".join(
            f"{c['backbone']} at {c['image_size']} px {c['cv_accuracy']:.3f} ± {c['cv_stderr']:.3f} "
            f"(p50 {c['latency_p50_ms']:.1f} ms)" for c in sel["candidates"] if "cv_accuracy" in c)
            + f" -> {sel['chosen']} at {sel['image_size']} px.", ""]
    return lines


def markdown(res: dict) -> str:
    """The RESULTS.md section, made from the results JSON (`--markdown`)."""
    m = res["machine"]
    lines = [f"`python benchmarks/bench_photos.py`, {m.get('cpu')} "
             f"({', '.join(f for f in ('avx2', 'avx512f', 'avx512_vnni') if f in m.get('flags', []))}), "
             f"{res.get('cores', 2)} cores; ± is the binomial standard error of the test accuracy. "
             f"{res.get('note', '')}", ""]
    for name, r in res["sets"].items():
        lines += _section(name, r)
    return "\n".join(lines)


def measure(data: Path | None) -> dict:
    tag = data.name if data else "fashion-mnist"
    r = {"probe_twenty_lines": twenty_line_probe(data), "default": edgexfer_run(data, f"bench-photos-{tag}-default")}
    r["linear"] = ({"same_as": "the default run, whose --strategy auto chose linear"}
                   if r["default"]["strategy"] == "linear" and data is not None else
                   edgexfer_run(data, f"bench-photos-{tag}-linear", "--strategy", "linear"))
    d, p = r["default"], r["probe_twenty_lines"]
    r["default_minus_probe_points"] = round(100 * (d["fp32"]["test_accuracy"] - p["test_accuracy"]), 2)
    if data is None:  # the demo's bounds
        r["bounds"] = {"FP32 >= 0.857": d["fp32"]["test_accuracy"] >= 0.857,
                       "INT8 within 1 point of FP32": d.get("int8_drop_points", 99) <= 1}
    else:
        # issue 28: INT8 is shipped (recommended) where it is faster and within the guard, never outside it;
        # None: not applicable (no INT8 file proven, or FP32 ships), said so in the table
        ships, proven = d.get("recommended") == "int8", bool(d["int8_guard"]["shippable"])
        r["bounds"] = {"default >= probe + 3 points": r["default_minus_probe_points"] >= 3,
                       "INT8 shipped where it is faster and within the guard":
                           (ships or d.get("int8_speedup_p50", 0) <= 1) if proven else (None if not ships else False),
                       "the shipped INT8 file within 1 point of FP32": d.get("int8_drop_points", 99) <= 1 if ships else None,
                       "default run <= 300 s": d["wall_seconds"] <= 300}
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, action="append",
                    help="a train/ test/ ImageFolder of photos; repeat for several (default: flowers-dev and aerial-dev)")
    ap.add_argument("--no-fashion-mnist", action="store_true", help="photos only (skip the Fashion-MNIST rows)")
    ap.add_argument("--note", default="", help="a sentence for the results (e.g. what else ran on the host)")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from the results JSON")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the results JSON (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())), end="")
        return 0
    datas = args.data or DEFAULT_DATA
    for data in datas:
        if not (data / "train").is_dir():
            print(f"bench_photos: {data} has no train/ folder (the development sets live in ../shared/data)",
                  file=sys.stderr)
            return 2
    import os

    from edgexfer.runtime.machine import cpu_info

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    res = {"command": "python benchmarks/bench_photos.py" + "".join(f" --data {d}" for d in (args.data or [])),
           "data": [str(d) for d in datas], "commit": commit.strip() or None, "machine": cpu_info(),
           "cores": os.cpu_count(), "note": args.note, "sets": {}}
    for data in datas:
        res["sets"][data.name] = measure(data)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")  # each set as it finishes
    if not args.no_fashion_mnist:
        res["sets"]["Fashion-MNIST 100-shot"] = measure(None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0 if all(v is not False for r in res["sets"].values() for v in r["bounds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
