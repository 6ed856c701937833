"""A screenshot of examples/web classifying a photo in headless Chromium, with a run's model:
benchmarks/results/web_page.png. Needs `make web browser` (onnxruntime-web vendored, Debian's chromium,
the playwright Python package).

    .venv/bin/python benchmarks/web_screenshot.py runs/demo photo.jpg [--file model.int8.onnx]
"""
from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "examples" / "web"
OUT = ROOT / "benchmarks" / "results" / "web_page.png"


class Quiet(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript"}

    def log_message(self, *args):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--file", default="model.int8.onnx")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from edgexfer.exporters.e2e import write

    with tempfile.TemporaryDirectory() as td:
        site = Path(td) / "site"
        shutil.copytree(WEB, site, ignore=shutil.ignore_patterns("node_modules"))
        write(a.run / a.file, site / "model.e2e.onnx")  # built afresh: the file's current metrics
        shutil.copyfile(a.image, site / ("photo" + a.image.suffix))
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 900, "height": 560})
                page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html?images=photo{a.image.suffix}")
                page.wait_for_function("document.body.dataset.done === '1'", timeout=120_000)
                print(page.evaluate("JSON.stringify(window.edgexferResults)"))
                page.screenshot(path=str(a.out))
                browser.close()
        finally:
            httpd.shutdown()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
