"""Would a frozen backbone read photos better at a larger input than it was pretrained at? (issue 28: a lever for
the default's lead over the twenty-line probe, measured before it joins `--backbone auto`.)

EfficientNet-Lite was pretrained with random-resized crops, which show objects larger than a centre crop at the
same size does; testing at about 1.15x the training size compensates (Touvron et al., "Fixing the train-test
resolution discrepancy", NeurIPS 2019). `--backbone auto` compares each backbone at its pretraining size only.
For each development set and each EfficientNet-Lite backbone at its pretraining size and at 1.15x it (rounded to a
multiple of 4), on the same images:

- the leave-one-out accuracy of the ridge probe `--backbone auto` ranks by (`transfer.probe_cv`, pooled
  features of the labelled images: what would choose),
- the test accuracy of scikit-learn's LogisticRegressionCV on the same features (the twenty-line probe's head:
  what it would buy; the test split only reports),
- the batch-1 latency of each (`transfer._latencies_ms`, interleaved: what it would cost).

    .venv/bin/python benchmarks/bench_fixres.py               # -> benchmarks/results/fixres.json
    .venv/bin/python benchmarks/bench_fixres.py --markdown    # the RESULTS.md paragraph from the JSON
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fixres.json"
SETS = ("flowers-dev", "aerial-dev")
BACKBONES = (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260))
sys.path.insert(0, str(ROOT))
from edgexfer.data import FIXRES_FACTOR as FACTOR  # noqa: E402 - the factor `--backbone auto` now uses
from edgexfer.data import fixres_size as larger  # noqa: E402


def split(root: Path, part: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    rows = [(f, k) for k, c in enumerate(classes) for f in sorted((root / part / c).iterdir())]
    return [f for f, _ in rows], np.array([k for _, k in rows])


def measure(root: Path) -> list[dict]:
    import torch
    from sklearn.linear_model import LogisticRegressionCV

    from edgexfer.backbones import build_backbone, preprocessing_for
    from edgexfer.features import OnnxFeatures
    from edgexfer.runtime.preprocess import preprocess
    from edgexfer.transfer import _latencies_ms, probe_cv

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    (xtr, ytr), (xte, yte) = split(root, "train", classes), split(root, "test", classes)
    rows, nets = [], {}
    for name, native in BACKBONES:
        for size in (native, larger(native)):
            t0 = time.perf_counter()
            net = build_backbone(name, weights="imagenet", image_size=size).eval()
            pp = preprocessing_for(name, size)
            feats = OnnxFeatures(net, size, 3, what=f"{name} at {size} px")
            ftr = feats(torch.from_numpy(np.stack([preprocess(str(p), pp) for p in xtr])), 32)[0].numpy()
            fte = feats(torch.from_numpy(np.stack([preprocess(str(p), pp) for p in xte])), 32)[0].numpy()
            cv = probe_cv(ftr, ytr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                clf = LogisticRegressionCV(max_iter=5000).fit(ftr, ytr)
            acc = float((clf.predict(fte) == yte).mean())
            key = f"{name}@{size}"
            nets[key] = (net, size)
            rows.append({"backbone": name, "image_size": size, "pretrained_size": native, "loo_accuracy": cv["cv_accuracy"],
                         "loo_stderr": cv["cv_stderr"], "test_accuracy": acc,
                         "test_stderr": math.sqrt(acc * (1 - acc) / len(yte)), "labelled": len(ytr), "test": len(yte),
                         "seconds": round(time.perf_counter() - t0, 1), "_correct": cv["correct"]})
            print(key, round(cv["cv_accuracy"], 4), round(acc, 4), flush=True)
    lat = _latencies_ms(nets, 2)
    for r in rows:
        r["latency_p50_ms"] = lat[f"{r['backbone']}@{r['image_size']}"]
    for r in rows:  # each larger size against its backbone's pretraining size, paired over the same images
        if r["image_size"] != r["pretrained_size"]:
            base = next(b for b in rows if b["backbone"] == r["backbone"] and b["image_size"] == b["pretrained_size"])
            d = r["_correct"] - base["_correct"]
            r["loo_lead_points"] = round(100 * float(d.mean()), 2)
            r["loo_lead_stderr_points"] = round(100 * float(d.std(ddof=1) / math.sqrt(len(d))), 2)
            r["test_lead_points"] = round(100 * (r["test_accuracy"] - base["test_accuracy"]), 2)
            r["latency_ratio"] = round(r["latency_p50_ms"] / base["latency_p50_ms"], 2)
    for r in rows:
        r.pop("_correct")
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"`{res['command']}` at {res['commit']}, {m.get('cpu')}, {res['cores']} cores: each backbone at its "
           f"pretraining size and at {FACTOR}x it. Leave-one-out: the ridge probe `--backbone auto` ranks by, on the "
           "labelled images; test: LogisticRegressionCV on the same pooled features (it only reports). Leads are "
           "over the same backbone at its pretraining size (leave-one-out: paired over the same images).", ""]
    for name, rows in res["sets"].items():
        out += [f"**{name}**", "", "| backbone | px | leave-one-out ± s.e. | lead ± paired s.e. | test ± s.e. | test lead "
                "| p50 latency | latency ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lead = (f"{r['loo_lead_points']:+.1f} ± {r['loo_lead_stderr_points']:.1f}" if "loo_lead_points" in r else "–")
            out.append(f"| {r['backbone']} | {r['image_size']} | {r['loo_accuracy']:.3f} ± {r['loo_stderr']:.3f} | {lead} | "
                       f"{r['test_accuracy']:.3f} ± {r['test_stderr']:.3f} | "
                       + (f"{r['test_lead_points']:+.1f} |" if "test_lead_points" in r else "– |")
                       + f" {r['latency_p50_ms']:.2f} ms | " + (f"{r['latency_ratio']:.2f}x |" if "latency_ratio" in r else "– |"))
        best = max(rows, key=lambda r: (r["loo_accuracy"], -r["latency_p50_ms"]))
        out += ["", f"Leave-one-out would choose {best['backbone']} at {best['image_size']} px (test "
                    f"{best['test_accuracy']:.3f}).", ""]
    return "\n".join(out).rstrip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md paragraph from the JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    torch.set_num_threads(2)
    data = ROOT.parent / "shared" / "data"
    res = {"command": "python benchmarks/bench_fixres.py", **provenance(), "cores": os.cpu_count(),
           "load_average_start": os.getloadavg()[0], "factor": FACTOR,
           "sets": {s: measure(data / s) for s in SETS}}
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
