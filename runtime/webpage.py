"""The in-browser page (examples/web) as a server serves it: `edgexfer serve` answers GET / with the page,
which runs the first model's end-to-end file in the browser with onnxruntime-web (WASM) loaded from the
same server (vendor/, `make web`): nothing comes from a CDN.

Framework-free: a server adapter calls `static_file(path, first_model)` for a GET it has no route for,
and answers the (body, content type) it returns, or its own 404 on None. Only the page's own files are
served, by exact name (no path from the request reaches the file system)."""
from __future__ import annotations

import os
from pathlib import Path

from edgexfer.runtime.e2e import e2e_path

WEB_DIR_ENV = "EDGEXFER_WEB_DIR"
PAGE_FILES = {  # URL path -> (file under examples/web, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/onnx-meta.js": ("onnx-meta.js", "text/javascript; charset=utf-8"),
    "/vendor/ort.wasm.min.js": ("vendor/ort.wasm.min.js", "text/javascript; charset=utf-8"),
    "/vendor/ort-wasm-simd-threaded.mjs": ("vendor/ort-wasm-simd-threaded.mjs", "text/javascript; charset=utf-8"),
    "/vendor/ort-wasm-simd-threaded.wasm": ("vendor/ort-wasm-simd-threaded.wasm", "application/wasm"),
}
MODEL_PATH = "/model.e2e.onnx"
PAGE_MISSING = ("the browser page is not installed with this edgexfer: in a clone of its repository run `make web`, "
                "then serve from the clone or set EDGEXFER_WEB_DIR to its examples/web folder (the API is under /v2)")


def web_dir() -> Path | None:
    """examples/web of this checkout (or $EDGEXFER_WEB_DIR), when its onnxruntime-web build is vendored."""
    d = Path(os.environ.get(WEB_DIR_ENV) or Path(__file__).resolve().parents[1] / "examples" / "web")
    return d if (d / "index.html").is_file() and (d / "vendor" / "ort.wasm.min.js").is_file() else None


def static_file(path: str, first_model: str | os.PathLike | None) -> tuple[bytes, str] | None:
    """(body, content type) for a GET of the page's `path` (query string removed), or None: not a page
    file, no vendored page here, or (for /model.e2e.onnx) no end-to-end file beside `first_model`."""
    d = web_dir()
    if d is None:
        return None
    if path == MODEL_PATH:
        if first_model is None:
            return None
        f = e2e_path(first_model)
        return (f.read_bytes(), "application/octet-stream") if f.is_file() else None
    entry = PAGE_FILES.get(path)
    if entry is None:
        return None
    return (d / entry[0]).read_bytes(), entry[1]
