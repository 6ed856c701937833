"""The end-to-end files against the Python preprocessing on a folder of real photos: top-1 agreement and
the largest class-probability difference, for ONNX Runtime in Python (EdgeModel with and without the
end-to-end file) and in Node.js (examples/node, when `make node` has run), FP32 and INT8.

    .venv/bin/python benchmarks/e2e_parity.py runs/bench-photos-flowers-dev-default /work/shared/data/flowers-dev/test
        # -> benchmarks/results/e2e_parity.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "e2e_parity.json"
IMAGE_EXT = {".jpg", ".jpeg", ".png"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    from edgexfer.exporters.e2e import e2e_path, write
    from edgexfer.runtime import atomic
    from edgexfer.runtime.model import EdgeModel

    paths = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in IMAGE_EXT)
    node_ok = shutil.which("node") and (ROOT / "examples/node/node_modules/onnxruntime-node").is_dir()
    doc = {"run": str(a.run), "images": f"{len(paths)} files under {a.images}", "models": {}}
    for name in ("model.onnx", "model.int8.onnx"):
        src = a.run / name
        if not src.is_file():
            continue
        if not e2e_path(src).is_file():
            write(src)
        ref = EdgeModel(src, threads=2, e2e=False).predict(paths, top_k=1000)
        got = EdgeModel(src, threads=2, e2e=True).predict(paths, top_k=1000)

        def probs(pred):
            p = np.zeros((len(pred), len(pred[0])))
            for i, r in enumerate(pred):
                for x in r:
                    p[i, x["index"]] = x["score"]
            return p

        pr, pg = probs(ref), probs(got)
        rec = {"python_e2e": {"top1_agreement": float(np.mean(pr.argmax(1) == pg.argmax(1))),
                              "max_abs_probability_difference": float(np.abs(pr - pg).max())}}
        if node_ok:
            p = subprocess.run(["node", str(ROOT / "examples/node/classify.js"), str(src), *map(str, paths),
                                "--top-k", "1000"], capture_output=True, text=True, check=True)
            pn = probs([json.loads(line)["predictions"] for line in p.stdout.splitlines()])
            rec["node_e2e"] = {"top1_agreement": float(np.mean(pr.argmax(1) == pn.argmax(1))),
                               "max_abs_probability_difference": float(np.abs(pr - pn).max())}
        else:
            rec["node_e2e"] = "not measured: node or examples/node/node_modules missing (make node)"
        doc["models"][name] = rec
        print(name, json.dumps(rec))
    atomic.write_json(a.out, doc)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
