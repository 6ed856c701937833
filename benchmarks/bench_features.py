"""The frozen backbone's features, PyTorch eager against ONNX Runtime (issue 28: the probe's views and the backbone
selection compute them; `edgexfer.features`).

For each EfficientNet-Lite backbone at its default size, on the labelled images of a photo set (train + val, centre
crops, as the probe sees them): every block's pooled output computed by PyTorch eager (the probe's former path) and
by `edgexfer.features.OnnxFeatures` (export and its check included), one after the other, with the largest difference between the
two relative to the features' scale, and whether a leave-one-out ridge probe on the last layer (`--backbone
auto`'s) gives every image the same answer from both.

    .venv/bin/python benchmarks/bench_features.py [--data DIR]     # -> benchmarks/results/features.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "features.json"
BACKBONES = (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers-dev"))
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md paragraph from the JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    import torch

    from edgexfer.backbones import build_backbone, preprocessing_for
    from edgexfer.data import load_image_folder
    from edgexfer.features import BlockPools, OnnxFeatures
    from edgexfer.probe import extract_block_features
    from edgexfer.model import EdgeNet
    from edgexfer.runtime.preprocess import preprocess
    from edgexfer.transfer import probe_cv

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    torch.set_num_threads(2)
    ds = load_image_folder(args.data, seed=0)
    images = list(ds.train.images) + list(ds.val.images)
    labels = np.concatenate([ds.train.labels, ds.val.labels])
    rows = []
    for name, size in BACKBONES:
        pp = preprocessing_for(name, size)
        x = torch.from_numpy(np.stack([preprocess(im, pp) for im in images]).astype(np.float32))
        net = build_backbone(name, weights="imagenet", image_size=size).eval()
        model = EdgeNet(net, 1280, {"label": len(ds.classes)}).eval()
        t0 = time.perf_counter()
        ref = extract_block_features(model, x)
        t_torch = time.perf_counter() - t0
        t0 = time.perf_counter()
        ext = OnnxFeatures(BlockPools(net), size)
        t_export = time.perf_counter() - t0
        got = ext(x)
        t_ort = time.perf_counter() - t0
        rel = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref))
        a = probe_cv(ref[-1].numpy(), labels)["correct"]
        b = probe_cv(got[-1].numpy(), labels)["correct"]
        rows.append({"backbone": name, "image_size": size, "images": len(x), "engine": ext.engine,
                     "pytorch_seconds": round(t_torch, 2), "onnxruntime_seconds": round(t_ort, 2),
                     "onnxruntime_export_seconds": round(t_export, 2), "speedup": round(t_torch / t_ort, 2),
                     "max_relative_difference": rel, "loo_answers_differing": int((a != b).sum())})
        print(rows[-1], flush=True)
    res = {"command": "python benchmarks/bench_features.py --data " + args.data, **provenance(), "cores": os.cpu_count(),
           "load_average_start": os.getloadavg()[0], "data": args.data, "rows": rows}
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    lines = ["| backbone | px | images | PyTorch eager | ONNX Runtime (export included) | speed-up | largest relative "
             "difference | leave-one-out answers differing |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['backbone']} | {r['image_size']} | {r['images']} | {r['pytorch_seconds']:.1f} s | "
                     f"{r['onnxruntime_seconds']:.1f} s ({r['onnxruntime_export_seconds']:.1f} s export) | "
                     f"{r['speedup']:.1f}x | {r['max_relative_difference']:.1e} | {r['loo_answers_differing']} |")
    m = res["machine"]
    return (f"`{res['command']}` at {res['commit']}, {m.get('cpu')}, {res['cores']} cores (load average "
            f"{res['load_average_start']:.2f} at the start): every block's pooled output of the labelled images, "
            "PyTorch eager against ONNX Runtime.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
