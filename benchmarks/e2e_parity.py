"""The end-to-end files against the Python preprocessing on a folder of real photos: top-1 agreement and
the largest class-probability difference, for ONNX Runtime in Python (EdgeModel with and without the
end-to-end file), in Node.js (examples/node, when `make node` has run) and in headless Chromium
(examples/web with onnxruntime-web's WASM, when `make browser` has run), FP32 and INT8. Each decodes the
photos its own way: Pillow in Python, sharp (libjpeg-turbo) in Node.js, the browser's own decoder in
Chromium.

    .venv/bin/python benchmarks/e2e_parity.py runs/bench-photos-flowers-dev-default /work/shared/data/flowers-dev/test
        # -> benchmarks/results/e2e_parity.json
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "e2e_parity.json"
IMAGE_EXT = {".jpg", ".jpeg", ".png"}
WEB_DIR = ROOT / "examples" / "web"


def chromium_predictions(e2e_file: Path, images: Path, paths: list[Path], top_k: int) -> list[list[dict]]:
    """The page (examples/web) in headless Chromium, served from a temporary folder holding the page, the
    end-to-end file and a link to the photos: each photo's `top_k` predictions, in the order of `paths`."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as td:
        site = Path(td) / "site"
        shutil.copytree(WEB_DIR, site, ignore=shutil.ignore_patterns("node_modules"))
        shutil.copyfile(e2e_file, site / "model.e2e.onnx")
        (site / "photos").symlink_to(images.resolve(), target_is_directory=True)

        class Quiet(SimpleHTTPRequestHandler):
            extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                              ".mjs": "text/javascript", ".js": "text/javascript"}

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        urls = ",".join("photos/" + quote(p.relative_to(images).as_posix()) for p in paths)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(f"{base}index.html?top_k={top_k}&images={urls}")
                page.wait_for_function("document.body.dataset.done === '1'", timeout=1_800_000)
                results = page.evaluate("window.edgexferResults")
                browser.close()
        finally:
            httpd.shutdown()
    if not isinstance(results, list) or len(results) != len(paths) or any("error" in r for r in results):
        raise SystemExit(f"the page did not classify every photo: {str(results)[:300]}")
    return [r["predictions"] for r in results]


def chromium_missing() -> str | None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium binary (make browser)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not (WEB_DIR / "vendor" / "ort.wasm.min.js").is_file():
        return "examples/web/vendor has no onnxruntime-web build (make web)"
    return None


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
    from render_results import provenance

    doc = {"command": f"python benchmarks/e2e_parity.py {a.run} {a.images}", **provenance(), "run": str(a.run),
           "images": f"{len(paths)} files under {a.images}", "models": {}}
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
        def agreement(other):
            return {"top1_agreement": float(np.mean(pr.argmax(1) == other.argmax(1))),
                    "max_abs_probability_difference": float(np.abs(pr - other).max())}

        if node_ok:
            p = subprocess.run(["node", str(ROOT / "examples/node/classify.js"), str(src), *map(str, paths),
                                "--top-k", "1000"], capture_output=True, text=True, check=True)
            rec["node_e2e"] = agreement(probs([json.loads(line)["predictions"] for line in p.stdout.splitlines()]))
        else:
            rec["node_e2e"] = "not measured: node or examples/node/node_modules missing (make node)"
        why = chromium_missing()
        rec["chromium_e2e"] = (f"not measured: {why}" if why else
                               agreement(probs(chromium_predictions(e2e_path(src), a.images, paths, pr.shape[1]))))
        doc["models"][name] = rec
        print(name, json.dumps(rec))
    atomic.write_json(a.out, doc)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
