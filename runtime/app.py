"""An application embedding the edgexfer runtime: classify images, or watch a folder as a camera loop would.

    python example.py model.int8.onnx photo.jpg [more.jpg|folder/ ...]   # classify, one JSON line each
    python example.py model.int8.onnx --watch incoming/            # loop: classify new images as they land

Needs numpy, onnxruntime and Pillow only. `edgexfer bundle` copies this file next to the model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a bundle carries edgexfer/runtime beside this file

from edgexfer.runtime import EdgeModel, ImageError, MetadataError  # noqa: E402
from edgexfer.runtime.preprocess import IMAGE_SUFFIXES, image_files  # noqa: E402,F401  (IMAGE_SUFFIXES: importable here)


def classify(model: EdgeModel, paths: list[Path], top_k: int) -> int:
    failures = 0
    for p in paths:
        t0 = time.perf_counter()
        try:
            pred = model.predict(p, top_k=top_k)
        except ImageError as e:
            print(json.dumps({"image": str(p), "error": str(e)}))
            failures += 1
            continue
        print(json.dumps({"image": str(p), "predictions": pred, "ms": round(1e3 * (time.perf_counter() - t0), 2)}),
              flush=True)
    return failures


def watch(model: EdgeModel, folder: Path, top_k: int, interval: float, max_seconds: float | None) -> None:
    """Poll `folder` and classify each new image once — the shape of a camera or sensor loop."""
    seen: set[Path] = set()
    start = time.monotonic()
    while max_seconds is None or time.monotonic() - start < max_seconds:
        new = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p not in seen)
        classify(model, new, top_k)
        seen.update(new)
        time.sleep(interval)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("images", nargs="*", type=Path)
    ap.add_argument("--watch", type=Path, help="folder to poll for new images")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop watching after this long")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        model = EdgeModel(a.model, threads=a.threads)
    except (FileNotFoundError, MetadataError) as e:  # a missing file, or metadata that does not fit its graph
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"# {a.model.name}: {len(model.labels)} classes, input {model.input_shape}, providers {model.providers}",
          file=sys.stderr)
    if a.watch:
        watch(model, a.watch, a.top_k, a.interval, a.max_seconds)
        return 0
    if not a.images:
        ap.error("give images to classify, or --watch FOLDER")
    images = [f for p in a.images for f in (image_files(p) if p.is_dir() else [p])]  # folders: their images
    return 1 if classify(model, images, a.top_k) else 0


if __name__ == "__main__":
    sys.exit(main())
